"""A refused job reads as one message: ``ConfigError`` -> one block on rank 0, exit code 2, no traceback.

Every entry point turns our refusals into this (``./run_train.sh`` before any rank starts,
``titan_dsv4.train``, the dry run, and the train spec's hooks on TorchTitan's stock entry). ``--debug`` on
``./run_train.sh`` or ``TITAN_DSV4_TRACEBACK=1`` re-raises instead, with the traceback.
Titan's own errors pass untouched.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

from .model.errors import ConfigError

TRACEBACK_ENV = "TITAN_DSV4_TRACEBACK"
REFUSED_EXIT_CODE = 2


def refusal_block(error: ConfigError) -> str:
    """What is wrong, the figures and the fix, framed so that it stands out of the launcher's log."""
    rule = "=" * 100
    return f"{rule}\nDeepSeek-V4 refused this job before any work:\n{error}\n{rule}"


@contextlib.contextmanager
def refusals_exit():
    """Inside: a ``ConfigError`` prints its block once (rank 0) and exits with code 2."""
    try:
        yield
    except ConfigError as error:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            print(refusal_block(error), file=sys.stderr, flush=True)
        shut_down_process_groups()
        raise SystemExit(REFUSED_EXIT_CODE) from None


_AT_ENTRY_POINT = {"active": False}


def as_entry_point() -> None:
    """This process is an entry point (``titan_dsv4.stock`` says so for TorchTitan's stock entry): refusals
    raised in the train spec's hooks exit with one message instead of a traceback on every rank."""
    _AT_ENTRY_POINT["active"] = True


def refuses_at_entry_points(fn):
    """``fn`` as itself (its name, its exceptions, for library use), whose refusals exit with one message
    when the process is an entry point (``as_entry_point``)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if not _AT_ENTRY_POINT["active"]:
            return fn(*args, **kwargs)
        with refusals_exit():
            return fn(*args, **kwargs)

    return wrapped


def shut_down_process_groups() -> None:
    """Destroy the default group, first releasing every DeviceMesh's references to its groups.

    Each DeviceMesh keeps its ProcessGroups in ``_pg_registry``; left there, the gloo world group outlives
    ``destroy_process_group`` with its worker threads running, and interpreter exit then destroys a joinable
    std::thread (std::terminate: SIGABRT after a clean run, about one run in five).
    """
    import torch.distributed as dist

    release_device_mesh_groups()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def release_device_mesh_groups() -> None:
    """Drop every DeviceMesh's references to its process groups (see ``shut_down_process_groups``)."""
    import gc

    from .compat import DeviceMesh, device_mesh_groups

    for obj in gc.get_objects():
        if issubclass(type(obj), DeviceMesh):  # type() never runs user code, unlike isinstance
            device_mesh_groups(obj).clear()
