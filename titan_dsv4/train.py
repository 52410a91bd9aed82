"""Entry point: ``python -m titan_dsv4.train --job.config_file ...`` (what run_train.sh launches).

Importing ``titan_dsv4`` first applies the CPU support when there is no accelerator, before torchtitan
is imported, then registers the ``deepseek_v4`` train spec; the rest is TorchTitan's own Trainer.
"""

import logging
import os
import sys

import titan_dsv4  # noqa: F401  (CPU support + train spec registration, before torchtitan)
from titan_dsv4.cpu import cpu_support_applied

from torchtitan.train import Trainer, main  # noqa: E402


def exit_cleanly_after_gloo_run() -> None:
    """Leave a finished CPU run without C++ static destructors.

    After ``destroy_process_group`` the default gloo ProcessGroup stays alive in C++ with its worker
    threads running (``pt_gloo_runloop``, ``gloo_tcp_loop``); when interpreter teardown destroys it,
    a still-joinable std::thread calls std::terminate and the rank dies with SIGABRT (seen on about
    one run in five). Everything is flushed and closed by now, so exit with 0 directly.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Trainer)  # raises on failure: the rank exits non-zero as usual
    if cpu_support_applied():
        exit_cleanly_after_gloo_run()
