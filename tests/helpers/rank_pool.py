"""``run_on_ranks`` without a spawn per call: ranks started once per world size and kept for the next call.

A spawn costs every rank its imports (torch, TorchTitan, titan_dsv4: about 12 CPU-seconds for 2 ranks, 27 for
4); the multi-rank tests of one folder share the ranks instead (the ``ranks`` fixture, tests/conftest.py,
which kills them after the folder's last test). ``RankPool.run(fn, world_size, *args, timeout=...)`` is
``run_on_ranks(fn, world_size, *args, timeout=...)`` on gloo: fn(rank, world_size, *args) on every rank
(a picklable top-level function), each rank's result returned, the same hard timeout (a fresh pool's start
included), and the same fast failure: a rank that raises (or dies) fails the call at once with its traceback.
After a failure or a timeout the ranks are killed and the next call starts fresh ones, so nothing of a failed
call lingers. Between calls a rank keeps its process group, its imports and whatever a function left behind:
a function restores what it patches (as those here do) and seeds what it draws.
"""

from __future__ import annotations

import atexit
import os
import queue
import shutil
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp

from titan_dsv4.multiprocess import free_port, set_up_rank


def _serve(rank: int, world_size: int, port: int, tasks, results) -> None:
    """A rank's loop: ``set_up_rank`` once (as ``run_on_ranks``' ranks), then one task after another."""
    set_up_rank(rank, world_size, port, "gloo")
    while True:
        task = tasks.get()
        number, fn, args, out = task
        try:
            torch.save(fn(rank, world_size, *args), out)
        except BaseException:
            results.put(("error", rank, number, traceback.format_exc()))
            raise  # the parent kills the others (they may wait in a collective of this task)
        results.put(("ok", rank, number, None))


class RankPool:
    """Ranks per world size, started on first use (``run``) and kept until ``close``."""

    def __init__(self) -> None:
        self._pools: dict[int, tuple[list, list, object]] = {}
        self._tasks = 0
        self._dir = tempfile.mkdtemp(prefix="rank_pool_")

    def _start(self, world_size: int):
        if world_size not in self._pools:
            ctx = mp.get_context("spawn")
            queues, results, port = [ctx.Queue() for _ in range(world_size)], ctx.Queue(), free_port()
            procs = [
                # not daemonic: a rank may start processes of its own (inductor's compile workers)
                ctx.Process(target=_serve, args=(r, world_size, port, queues[r], results))
                for r in range(world_size)
            ]
            for p in procs:
                p.start()
            self._pools[world_size] = (procs, queues, results)
        return self._pools[world_size]

    def run(self, fn, world_size: int, *args, timeout: float = 240.0) -> list:
        deadline = time.monotonic() + timeout
        procs, queues, results = self._start(world_size)
        self._tasks += 1
        number = self._tasks
        outs = [os.path.join(self._dir, f"{number}-rank{r}.pt") for r in range(world_size)]
        for r in range(world_size):
            queues[r].put((number, fn, args, outs[r]))
        done: set[int] = set()
        try:
            while len(done) < world_size:
                try:
                    status, rank, task, err = results.get(
                        timeout=max(0.1, min(2.0, deadline - time.monotonic()))
                    )
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if not p.is_alive()]
                    if dead:
                        raise AssertionError(f"rank(s) {dead} died running {fn.__name__}") from None
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"{fn.__name__} did not finish on {world_size} ranks within {timeout}s"
                        ) from None
                    continue
                assert task == number, (task, number)
                if status == "error":
                    raise AssertionError("rank failed:\n" + err) from None
                done.add(rank)
        except BaseException:
            self._stop(world_size)
            raise
        try:
            return [torch.load(out, weights_only=False) for out in outs]
        finally:
            for out in outs:
                os.remove(out)

    def _stop(self, world_size: int) -> None:
        """Kills the ranks: idle ones hold nothing worth a clean exit (which takes seconds: every process
        group torn down, every exit handler run)."""
        procs, _, _ = self._pools.pop(world_size)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()

    def close(self) -> None:
        """Ends every rank; a later ``run`` starts fresh ones."""
        for world_size in list(self._pools):
            self._stop(world_size)

    def __del__(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


POOL = RankPool()
atexit.register(POOL.close)  # before multiprocessing's own exit handler joins the ranks
