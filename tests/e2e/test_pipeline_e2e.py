"""Pipeline parallelism through TorchTitan's Trainer on 2 CPU ranks (every launch is ``./run_train.sh``): pp 2
gives the single process's losses and logged figures over 8 steps (fp32, MTP 1, the indexer's dense warm-up
then its KL, packed documents, hash and learned-router MoE layers), and checkpoints resume across pp degrees
(bit-exact at the same degree).

Launches are shared: the pp 1 -> pp 2 resume runs the V-shaped zero-bubble schedule (two stages per rank, the
first and last on rank 0). Every other enabled schedule's step is checked, gradient by gradient, in
tests/distributed/test_pipeline.py; a launch here costs about 12 s, mostly start-up."""

from __future__ import annotations

import shutil

import pytest

from titan_dsv4.launch import run_train, step_metrics, validation_losses

pytestmark = pytest.mark.slow
FIGURES = ("loss", "mtp_loss", "indexer_kl", "indexer_recall")
STEPS = 8
PP2 = ["--parallelism.pipeline_parallel_degree", "2"]
ONE_RANK = {"NGPU": "1"}
# Validation at steps 1, 4 and 8 (Titan validates at step 1 and every freq steps; 2 batches): under pp 2
# rank 0, which logs, holds the first stage only.
VALIDATE = ["--validation.enable", "--validation.freq", "4", "--validation.steps", "2"]
# The single process runs the pipeline's microbatches (1 row each) as gradient accumulation: the same global
# batch, the same microbatches, so the same sums in the same order.
ACCUMULATE = ["--training.local_batch_size", "1", "--training.global_batch_size", "2"]


def _common(seed_dir) -> list[str]:
    """fp32, seeded, every V4 option the pipeline must carry; every run starts from one seed checkpoint.

    Gradient clipping is off: under pipelining Titan's ``clip_grad_norm_`` sums the squared norm stage by
    stage, the same norm added in another order, and a last-bit difference in the clip factor then grows
    over steps of this tiny, fast-moving model (with clipping on, 8 steps agree to about 4e-5). Without it
    pp 2 repeats the single process's figures to the last printed digit.
    """
    return [
        "--training.mixed_precision_param", "float32", "--debug.seed", "42", "--debug.deterministic",
        "--training.max_norm", "1e9",
        "--training.steps", str(STEPS), "--deepseek_v4.mtp_layers", "1",
        "--deepseek_v4.attn_mask_type", "block_causal", "--metrics.log_freq", "1",
        "--checkpoint.enable", "--checkpoint.interval", "4",
        "--checkpoint.initial_load_path", str(seed_dir),
    ]  # fmt: skip


def _figures(log: str, steps) -> dict[int, tuple[float, ...]]:
    logged = step_metrics(log)[
        0
    ]  # rank 0 (the first stage) logs the last stage's loss and every stage's figures
    return {s: tuple(logged[s][k] for k in FIGURES) for s in steps}


def _assert_close(got: dict, expected: dict, tol: float = 1e-5) -> None:
    """Equal within ``tol`` (the log prints 5 decimals)."""
    assert got.keys() == expected.keys()
    for step in expected:
        for name, a, b in zip(FIGURES, got[step], expected[step]):
            assert abs(a - b) <= tol + 1e-9, f"step {step} {name}: {a} vs {b}"


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """A seed checkpoint, and the single process's 8 steps from it (saving steps 4 and 8)."""
    root = tmp_path_factory.mktemp("pp")
    run_train(
        ["--checkpoint.enable", "--checkpoint.create_seed_checkpoint", "--deepseek_v4.mtp_layers", "1",
         "--debug.seed", "42",
         "--parallelism.data_parallel_shard_degree", "1", "--job.dump_folder", str(root / "seed")],
        env=ONE_RANK, log_ranks="0", check=True,
    )  # fmt: skip
    seed = root / "seed" / "checkpoint" / "step-0"
    _, log = run_train(
        [*_common(seed), *ACCUMULATE, *VALIDATE, "--job.dump_folder", str(root / "single")],
        env=ONE_RANK,
        check=True,
    )
    return root, seed, _figures(log, range(1, STEPS + 1)), validation_losses(log)


@pytest.fixture(scope="module")
def one_f_one_b(single):
    """pp 2 with 1F1B, 8 steps from the seed checkpoint: (its folder, args, figures)."""
    root, seed, *_ = single
    args = [*_common(seed), *PP2, "--parallelism.pipeline_parallel_schedule", "1F1B"]
    code, log = run_train([*args, *VALIDATE, "--job.dump_folder", str(root / "1F1B")])
    assert code == 0 and log.count("Process group destroyed") == 2, log[-4000:]
    return root / "1F1B", args, _figures(log, range(1, STEPS + 1)), validation_losses(log)


def test_pp2_1f1b_gives_the_single_process_figures_and_resumes_bit_exactly(single, one_f_one_b):
    root, _, expected, _ = single
    folder, args, straight, _ = one_f_one_b
    _assert_close(straight, expected)
    # Same degree: the resume from step 4 repeats steps 5-8 bit for bit.
    resumed = root / "1F1B-resumed"
    shutil.copytree(folder / "checkpoint" / "step-4", resumed / "checkpoint" / "step-4")
    code, log = run_train([*args, "--job.dump_folder", str(resumed)])
    assert code == 0 and "Training starts at step 5" in log, log[-4000:]
    assert _figures(log, range(5, STEPS + 1)) == {s: straight[s] for s in range(5, STEPS + 1)}


def test_pp2_validation_logs_the_last_stages_loss(single, one_f_one_b):
    """Rank 0 (first stage) logs the validation loss the last stage computed: the single process's."""
    expected, got = single[3], one_f_one_b[3]
    assert sorted(expected) == sorted(got) == [1, 4, 8], (expected, got)
    for step in expected:
        assert expected[step] > 1.0 and abs(got[step] - expected[step]) <= 1e-5, (step, got, expected)


# pp 2 -> pp 1: the single process resumes 1F1B's checkpoint; pp 1 -> pp 2: ZBVZeroBubble resumes the single
# process's checkpoint.
ZBV = [*PP2, "--parallelism.pipeline_parallel_schedule", "ZBVZeroBubble"]


@pytest.mark.parametrize("target", ["pp1", "pp2"], ids=["pp2-to-pp1", "pp1-to-pp2-zero-bubble-v"])
def test_checkpoints_resume_across_pp_degrees(single, one_f_one_b, target):
    root, seed, expected, _ = single
    source = one_f_one_b[0] if target == "pp1" else root / "single"
    folder = root / f"to-{target}"
    shutil.copytree(source / "checkpoint" / "step-4", folder / "checkpoint" / "step-4")
    extra, env = (ZBV, None) if target == "pp2" else (ACCUMULATE, ONE_RANK)
    code, log = run_train([*_common(seed), *extra, "--job.dump_folder", str(folder)], env=env)
    assert code == 0 and "Training starts at step 5" in log, log[-4000:]
    _assert_close(_figures(log, range(5, STEPS + 1)), {s: expected[s] for s in range(5, STEPS + 1)})
