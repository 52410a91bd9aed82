"""titan_dsv4.launch reads Titan's console lines as the tests and benchmarks need them."""

from __future__ import annotations

from titan_dsv4.launch import ANSI, bytes_read, losses, step_lines, step_metrics, validation_losses

# What torchrun --tee prints for two ranks (colours stripped by run_command), our figures on the next line.
LOG = """\
[rank0]:[titan] 2026-11-26 18:02:21,132 - root - INFO - step:  1  loss:  8.11662  grad_norm:  0.0158  \
memory:  0.95GiB(4.05%)  tps: 1,230  tflops: 0.01  mfu: 0.00%
[rank0]:[titan] 2026-11-26 18:02:21,133 - root - INFO - step:  1  mtp_loss: 8.20000  indexer_kl: 0.24561  \
indexer_recall: 0.29321 (chance 0.302)
[rank1]:[titan] 2026-11-26 18:02:21,132 - root - INFO - step:  1  loss:  8.11662  grad_norm:  0.0158  \
memory:  0.94GiB(4.00%)  tps: 1,211  tflops: 0.01  mfu: 0.00%
[rank0]:[titan] 2026-11-26 18:02:22,000 - root - INFO - validate step:  1  loss:  7.5000  \
memory:  0.95GiB(4.05%)  tps: 900
[rank0]:[titan] 2026-11-26 18:02:23,000 - root - INFO - Read 1.5 MiB of the checkpoint's 3.0 MiB on this rank
"""


def test_step_lines_give_every_figure_per_rank_and_step():
    metrics = step_metrics(LOG)
    assert sorted(metrics) == [0, 1] and sorted(metrics[0]) == [1]
    assert metrics[0][1] == {
        "loss": 8.11662,
        "mtp_loss": 8.2,
        "indexer_kl": 0.24561,
        "indexer_recall": 0.29321,
        "indexer_recall_chance": 0.302,
        "grad_norm": 0.0158,
        "memory_gib": 0.95,
        "tps": 1230,
        "tflops": 0.01,
        "mfu": 0.0,
    }
    assert metrics[1][1]["tps"] == 1211 and "mtp_loss" not in metrics[1][1]


def test_validation_lines_are_not_training_steps():
    assert losses(LOG) == {1: 8.11662} and losses(LOG, rank=1) == {1: 8.11662}
    assert validation_losses(LOG) == {1: 7.5} and validation_losses(LOG, rank=1) == {}
    assert "validate" not in step_lines(LOG) and step_lines(LOG).count("\n") == 1


def test_checkpoint_read_line_and_colours():
    assert bytes_read(LOG) == {0: (1.5, 3.0)}
    assert ANSI.sub("", "\x1b[31mstep:  1\x1b[0m") == "step:  1"
