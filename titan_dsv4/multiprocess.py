"""Run a function on several CPU ranks over gloo, with a hard timeout so a hang fails fast (tests,
benchmarks)."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_up_rank(rank: int, world_size: int, port: int, backend: str | None) -> None:
    """What a spawned rank does first: torch.distributed's environment, the train spec registered, the CPU
    support, one thread, and (unless ``backend`` is None) the process group."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch.distributed as dist

    import titan_dsv4  # noqa: F401  (registers the deepseek_v4 train spec)
    from titan_dsv4.cpu import apply_cpu_support

    apply_cpu_support()
    torch.set_num_threads(1)
    if backend is not None:
        dist.init_process_group(backend, rank=rank, world_size=world_size)


def _entry(rank: int, fn, world_size: int, port: int, out_dir: str, args: tuple, backend: str | None) -> None:
    from titan_dsv4.refusals import shut_down_process_groups

    set_up_rank(rank, world_size, port, backend)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        shut_down_process_groups()


def run_on_ranks(fn, world_size: int, *args, timeout: float = 240.0, backend: str | None = "gloo") -> list:
    """fn(rank, world_size, *args) on each rank (a picklable top-level function); returns each rank's result.

    ``backend=None`` leaves process-group setup to ``fn`` (e.g. Titan's fake backend in one process).
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _entry,
            args=(fn, world_size, free_port(), out_dir, args, backend),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{fn.__name__} did not finish on {world_size} ranks within {timeout}s"
                    )
        except mp.ProcessRaisedException as e:
            errs = [
                open(os.path.join(out_dir, f)).read()
                for f in sorted(os.listdir(out_dir))
                if f.endswith(".err")
            ]
            raise AssertionError("rank failed:\n" + "\n".join(errs or [str(e)])) from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)
        ]
