"""What the checkpoint tests add to ``titan_dsv4.launch``: the bit-exact resume flags, a launch with one rank
killed (or stopped) on cue, the first batch Titan's dataloaders feed a run, the Hugging Face load flags and
checks shared by the HF and EP checkpoint tests, and DCP checkpoint comparison."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from tests.helpers.checkpoint_fixtures import debug_args, load_through_adapter
from titan_dsv4.launch import ROOT, bytes_read, losses, run_train
from titan_dsv4.model.hf_config import args_from_hf_config

# Bit-exact resume runs: same seed, deterministic kernels, same schedule length. 6 steps, checkpoints at 3
# and 6: the step-3 checkpoint is past the indexer's 2-step dense warm-up (every parameter has trained once)
# and inside the LR warm-up (5 steps), so a resume from it carries the LR schedule across its warm-up's end.
# fp32, so that one FSDP run (tests/checkpoint/conftest.py) is the reference of the resume tests and EP 1 of
# the EP tests; bf16 resumes are bit-exact too (tests/e2e/test_entry_points.py, test_context_parallel_e2e.py).
RESUMABLE = [
    "--training.steps", "6", "--checkpoint.enable", "--checkpoint.interval", "3", "--debug.seed", "42",
    "--debug.deterministic", "--training.mixed_precision_param", "float32",
]  # fmt: skip


def run_with_fault(args: list[str], fault: str, mark: Path, timeout: float = 300) -> tuple[int, str]:
    """``run_train(args)`` through tests/helpers/fault_injection_train.py, with rank 1 killed (or every rank
    stopped) at ``fault``."""
    env = {
        "TRAIN_FILE": "tests.helpers.fault_injection_train",  # run_train.sh runs it from the repository root
        "DSV4_KILL_RANK": "1",
        "DSV4_KILL_AT": fault,
        "DSV4_KILL_MARK": str(mark),
    }
    return run_train(args, timeout=timeout, env=env)


def first_global_batch(config: str = "train_configs/debug_model.toml", ranks: int = 2):
    """(inputs, labels) of step 1 on every rank, concatenated: what the train spec's dataloaders (Titan's,
    with the packaged corpus registered) feed a run of ``config``."""
    from torchtitan.components.tokenizer import build_hf_tokenizer
    from torchtitan.config import ConfigManager

    from titan_dsv4.spec import build_dataloader_with_corpus

    cwd = os.getcwd()
    os.chdir(ROOT)  # the configs name repository-relative assets
    try:
        job = ConfigManager().parse_args(["--job.config_file", config])
        tokenizer = build_hf_tokenizer(job)
        batches = [
            next(
                iter(
                    build_dataloader_with_corpus(
                        dp_world_size=ranks, dp_rank=r, tokenizer=tokenizer, job_config=job
                    )
                )
            )
            for r in range(ranks)
        ]
    finally:
        os.chdir(cwd)
    return torch.cat([b[0]["input"] for b in batches]), torch.cat([b[1] for b in batches])


# ---- Hugging Face load runs and DCP comparisons (checkpoint tests) -----------------------------------
TOL = 1e-4

HF_LOAD = [
    "--training.steps",
    "1",
    "--training.mixed_precision_param",
    "float32",
    "--checkpoint.enable",
    "--checkpoint.initial_load_in_hf",
    "--checkpoint.last_save_model_only",
    # the loaded indexer is trained: sparse attention from step 1, as transformers computes it
    "--deepseek_v4.indexer_warmup_steps",
    "0",
]


def transformers_loss(model, batch) -> float:
    inputs, labels = batch
    with torch.no_grad():
        logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).item()


def assert_first_step_matches(log: str, expected: float) -> None:
    got = losses(log, 0), losses(log, 1)
    assert got[0].keys() == got[1].keys() == {1}, log[-4000:]
    assert abs(got[0][1] - expected) <= TOL and got[0] == got[1], (got, expected)


def assert_each_rank_read_its_half(log: str) -> None:
    read = bytes_read(log)
    assert sorted(read) == [0, 1], log[-3000:]
    for mine, total in read.values():
        assert 0.3 * total < mine < 0.6 * total, read  # FSDP shards: about half each, never the whole


def our_model_from(folder: str):
    """Our model loaded through the adapter's storage reader, as Titan loads it (single process)."""

    args = args_from_hf_config(folder)
    assert args == debug_args().replace(max_seq_len=args.max_seq_len)  # the exported config.json is the model
    args.max_seq_len = 512
    return load_through_adapter(folder, args)


def checkpoint_state(step_dir: Path, tmp: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{step_dir.parent.parent.name}-{step_dir.name}.pt"
    dcp_to_torch_save(str(step_dir), str(out))
    return torch.load(out, weights_only=False)


def differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b) else [path]
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [path + " (keys)"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")] or (
            [] if len(a) == len(b) else [path + " (length)"]
        )
    return [] if a == b else [path]
