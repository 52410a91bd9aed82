"""Train entry for the fault tests (``TRAIN_FILE=tests.helpers.fault_injection_train``; run_train.sh runs it
from the repository root).

It is ``titan_dsv4.train`` (our Trainer) plus one injected interruption, chosen by environment variables:
  * ``DSV4_KILL_AT=stop:N``: every rank stops cleanly after step N (the schedule still says training.steps);
  * ``DSV4_KILL_RANK``: the rank that dies in the two kills below (SIGKILL, as the OOM killer or a lost
    node would end it);
  * ``DSV4_KILL_AT=step:N``: in the middle of step N, after its forward and before its backward, while
    the other ranks wait in the step's collectives;
  * ``DSV4_KILL_AT=save:N``: while the step-N checkpoint is being written, once this rank's own data file
    is on disk but before the checkpoint's metadata (so a half-written folder is left behind).
Just before dying the rank writes ``DSV4_KILL_MARK`` (a file) so the test can time the job's exit.
"""

from __future__ import annotations

import os
import signal
import time

from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torchtitan.train import main

import titan_dsv4  # noqa: F401  (registers the deepseek_v4 train spec)
from titan_dsv4.cpu import apply_cpu_support
from titan_dsv4.trainer import DeepSeekV4Trainer as Trainer


def _die() -> None:
    with open(os.environ["DSV4_KILL_MARK"], "w") as f:
        f.write(str(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


def _this_rank_dies() -> bool:
    return os.environ.get("RANK") == os.environ.get("DSV4_KILL_RANK", "1")


def _kill_mid_step(step: int) -> None:
    orig = Trainer.forward_backward_step

    def forward_backward_step(self, *, input_dict, labels, global_valid_tokens):
        if self.step == step and _this_rank_dies():
            self.model_parts[0](input_dict["input"].to(self.device))  # the forward runs, then the rank dies
            _die()
        return orig(self, input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens)

    Trainer.forward_backward_step = forward_backward_step


def _stop_after(step: int) -> None:
    Trainer.should_continue_training = lambda self: self.step < min(step, self.job_config.training.steps)


def _kill_mid_save(step: int) -> None:
    orig = FileSystemWriter.write_data

    def write_data(self, plan, planner):
        result = orig(self, plan, planner)
        if str(self.path).rstrip("/").endswith(f"step-{step}") and _this_rank_dies():
            result.wait()  # this rank's data file is complete; the metadata is not written yet
            _die()
        return result

    FileSystemWriter.write_data = write_data


if __name__ == "__main__":
    apply_cpu_support()  # as titan_dsv4.train: Titan's device is the CPU where there is no accelerator
    kind, _, at = os.environ.get("DSV4_KILL_AT", "").partition(":")
    if kind == "stop":
        _stop_after(int(at))
    elif kind == "step":
        _kill_mid_step(int(at))
    elif kind == "save":
        _kill_mid_save(int(at))
    main(Trainer)
