"""Checkpoints under expert parallelism, on 2 CPU ranks through ./run_train.sh.

DCP resume at EP 2 is bit-exact, and DCP checkpoints move between EP 1 and EP 2 in both directions. (The HF
load at EP 2, each rank reading its own experts, and its export: tests/checkpoint/test_checkpoint_hf_e2e.py.)
"""

from __future__ import annotations

import shutil

import pytest

from tests.helpers.titan_runs import RESUMABLE, checkpoint_state, differences
from titan_dsv4.launch import losses, run_train

EP2 = ["--parallelism.expert_parallel_degree", "2"]


@pytest.fixture(scope="module")
def straight(fsdp_run, tmp_path_factory):
    """6 seeded fp32 steps at EP 1 (the shared FSDP run) and at EP 2, checkpoints at steps 3 and 6."""
    dump = tmp_path_factory.mktemp("ep2")
    rc, log = run_train([*RESUMABLE, *EP2, "--job.dump_folder", str(dump)])
    assert rc == 0, log[-4000:]
    return {"ep1": fsdp_run, "ep2": (dump, losses(log))}


@pytest.mark.slow
def test_ep_2_trains_as_ep_1(straight):
    """fp32, same seed and data: EP 2's losses are EP 1's (the experts' per-rank gradients sum as FSDP's)."""
    ep1, ep2 = straight["ep1"][1], straight["ep2"][1]
    assert sorted(ep1) == list(range(1, 7))
    assert max(abs(ep1[s] - ep2[s]) for s in ep1) <= 1e-5, (ep1, ep2)


@pytest.mark.slow
def test_resume_at_ep_2_is_bit_exact(straight, tmp_path):
    dump, ref = straight["ep2"]
    args = [*RESUMABLE, *EP2, "--job.dump_folder", str(tmp_path)]
    # a job stopped after step 3: the straight run's step-3 checkpoint, alone in a fresh dump folder
    shutil.copytree(dump / "checkpoint" / "step-3", tmp_path / "checkpoint" / "step-3")
    rc, log = run_train(args)
    assert rc == 0, log[-4000:]
    assert "Training starts at step 4" in log
    assert losses(log) == {s: ref[s] for s in range(4, 7)}
    resumed = checkpoint_state(tmp_path / "checkpoint" / "step-6", tmp_path)
    (tmp_path / "ref").mkdir()
    reference = checkpoint_state(dump / "checkpoint" / "step-6", tmp_path / "ref")
    assert not differences(resumed, reference), differences(resumed, reference)[:10]


@pytest.mark.slow
@pytest.mark.parametrize("saved, resumed", [("ep1", "ep2"), ("ep2", "ep1")])
def test_dcp_checkpoints_move_between_ep_1_and_ep_2(straight, tmp_path, saved, resumed):
    source, ref = straight[saved]
    target = tmp_path / "run"
    shutil.copytree(source / "checkpoint" / "step-3", target / "checkpoint" / "step-3")
    extra = EP2 if resumed == "ep2" else []
    rc, log = run_train([*RESUMABLE, *extra, "--job.dump_folder", str(target)])
    assert rc == 0, log[-4000:]
    assert "Training starts at step 4" in log
    got = losses(log)
    assert sorted(got) == [4, 5, 6] and max(abs(got[s] - ref[s]) for s in got) <= 1e-5, (got, ref)
