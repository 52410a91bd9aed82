"""Resume and faults on 2 CPU ranks with FSDP: DCP checkpoints continue a run bit for bit.

One straight 6-step fp32 run (checkpoints at steps 3 and 6; ``fsdp_run`` in tests/checkpoint/conftest.py) is
the reference. Interrupted runs use the same seed and schedule; after the interruption the same command
resumes from the last complete checkpoint.
"Bit-exact" is checked twice: the logged losses, and every tensor of the step-6 checkpoints (model with
its fp32 islands and buffers, AdamW state, LR schedule, dataloader position, train state).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.titan_runs import RESUMABLE, checkpoint_state, differences, run_with_fault
from titan_dsv4.launch import losses, run_train

EXIT_BOUND_S = 60  # a killed rank must bring the whole job down within this (measured: about 1 s)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_optimizer_state_completed_for_a_save_changes_no_training():
    """A parameter without gradients gets the entry the optimizer would create itself, and no value moves."""
    from titan_dsv4.infra.optimizer import complete_optimizer_state

    def train(complete: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        a, late = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
        opt = torch.optim.AdamW([a, late], lr=0.1, weight_decay=0.1)
        container = type("Container", (), {"optimizers": [opt]})
        for step in range(4):
            opt.zero_grad()
            (
                (a * a).sum() + ((late * late).sum() if step >= 2 else 0)
            ).backward()  # `late` learns from step 2
            opt.step()
            if step == 0 and complete:
                complete_optimizer_state(container)
                assert float(opt.state[late]["step"]) == 0 and not opt.state[late]["exp_avg"].any()
        return [a.detach(), late.detach()]

    assert all(torch.equal(x, y) for x, y in zip(train(False), train(True)))


@pytest.fixture(scope="module")
def straight(fsdp_run, tmp_path_factory):
    dump, logged = fsdp_run
    assert sorted(logged) == list(range(1, 7)), logged
    return dump, logged, checkpoint_state(dump / "checkpoint" / "step-6", tmp_path_factory.mktemp("pt"))


def _resume_matches(dump: Path, straight, tmp: Path) -> str:
    ref_dump, ref_losses, ref_state = straight
    step3 = _digest(dump / "checkpoint" / "step-3")
    rc, log = run_train([*RESUMABLE, "--job.dump_folder", str(dump)])
    assert rc == 0, log[-4000:]
    assert "Training starts at step 4" in log, log[-3000:]
    resumed = losses(log)
    assert sorted(resumed) == [4, 5, 6]
    assert resumed == {s: ref_losses[s] for s in range(4, 7)}, (resumed, ref_losses)
    assert _digest(dump / "checkpoint" / "step-3") == step3  # the checkpoint resumed from is left as it was
    state = checkpoint_state(dump / "checkpoint" / "step-6", tmp)
    assert not differences(state, ref_state), differences(state, ref_state)[:10]
    return log


@pytest.mark.slow
def test_checkpoint_holds_everything_a_resume_needs(straight):
    _, _, state = straight
    assert {"optimizer", "lr_scheduler", "dataloader", "train_state"} <= set(state)
    assert state["train_state"] == {"step": 6, "ntokens_seen": 6 * 2 * 512}  # per rank: local batch 2 x 512
    # the learned routers' load-balance bias moved during training; the hash tables are stored
    assert all(state[f"layers.{i}.moe.expert_bias"].abs().sum() > 0 for i in (2, 3))
    assert all(state[f"layers.{i}.moe.router.tid2eid"].dtype == torch.int64 for i in (0, 1))
    # fp32 islands (mHC, HyperHead, sinks, compressor position bias) and their AdamW moments
    for key in (
        "layers.0.attn_hc.fn",
        "hc_head.hc_fn",
        "layers.0.self_attn.sinks_param.weight",
        "layers.1.self_attn.compressor.ape_param.weight",
    ):
        assert state[key].dtype == torch.float32, key
        assert state["optimizer"][f"state.{key}.exp_avg_sq"].abs().sum() > 0, key
    # the debug config trains the indexer (indexer_loss_weight 1): fp32, with its AdamW moments saved
    assert state["layers.1.self_attn.compressor.indexer.wkv.weight"].dtype == torch.float32
    assert (
        state["optimizer"]["state.layers.1.self_attn.compressor.indexer.wkv.weight.exp_avg"].abs().sum() > 0
    )
    assert set(state["dataloader"]) == {"dp_rank_0", "dp_rank_1", "world_size"}


def _killed_run(dump: Path, fault: str) -> str:
    """The resumable run with rank 1 killed at ``fault``: the job fails, within EXIT_BOUND_S of the kill."""
    mark = dump / "killed_at"
    rc, log = run_with_fault([*RESUMABLE, "--job.dump_folder", str(dump)], fault, mark)
    exited = time.time()
    assert rc != 0, log[-3000:]
    assert mark.exists(), log[-3000:]
    assert exited - float(mark.read_text()) < EXIT_BOUND_S
    return log


@pytest.mark.slow
def test_rank_killed_while_saving_leaves_a_half_written_folder_that_is_never_loaded(straight, tmp_path):
    """A job stopped by a kill during its step-6 save resumes from step 3, bit-exactly (the stopped job's
    steps 1-6 were the straight run's)."""
    log = _killed_run(tmp_path, "save:6")
    assert losses(log) == {s: straight[1][s] for s in range(1, 7)}
    half = tmp_path / "checkpoint" / "step-6"
    assert (half / "__1_0.distcp").exists() and not (half / ".metadata").exists()
    log = _resume_matches(tmp_path, straight, tmp_path)
    assert (
        "Loading the checkpoint from" in log
        and "step-3" in log.split("Loading the checkpoint from", 1)[1][:200]
    )


@pytest.mark.slow
def test_rank_killed_mid_step_ends_the_job_within_the_bound(straight, tmp_path):
    log = _killed_run(tmp_path, "step:5")
    assert sorted(losses(log)) == [1, 2, 3, 4]  # step 5 never completed
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["step-3"]
    assert (tmp_path / "checkpoint" / "step-3" / ".metadata").exists()


@pytest.mark.slow
def test_bad_degrees_on_a_folder_with_checkpoints_stop_before_anything_is_written(straight):
    dump = straight[0]
    before = {step: _digest(dump / "checkpoint" / step) for step in ("step-3", "step-6")}
    rc, log = run_train(
        [*RESUMABLE, "--parallelism.data_parallel_shard_degree", "3", "--job.dump_folder", str(dump)],
        timeout=120,
        env={"TITAN_DSV4_PREFLIGHT": "1"},  # refused once, before any rank starts
    )
    assert rc == 2 and "DeepSeek-V4 refused this job before any work" in log
    assert (
        "parallelism degrees do not match the world size: data_parallel_shard_degree=3 x 1 = 3 "
        "ranks, but the job has 2. Set --parallelism.data_parallel_shard_degree -1"
    ) in log
    assert not losses(log)
    assert before == {step: _digest(dump / "checkpoint" / step) for step in ("step-3", "step-6")}
