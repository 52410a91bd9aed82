"""Count the collectives of a training step by kind, phase and transformer block.

Two families of entry points are wrapped, each where its callers look it up at call time:
  * ``torch.distributed``'s ``all_gather_single`` / ``reduce_scatter_single`` / ``all_reduce`` /
    ``all_to_all_single``: FSDP2 (torch 2.13) and the model's own all-reduces (HCA alignment flag,
    expert-load counts) call them through the module attribute;
  * the functional collectives (``torch.distributed._functional_collectives``: ``all_reduce``,
    ``all_gather_single``, ``reduce_scatter_single``, ``all_to_all_single`` and its autograd variant):
    DTensor reductions (the grad-norm in clipping), Titan's loss / token-count reductions, and expert
    parallelism's dispatch and combine. Modules that imported these names directly (Titan's and V4's
    ``expert_parallel``) hold their own binding, so every loaded torch / torchtitan / titan_dsv4 module
    binding one of them gets the wrapper too.
A call made from inside another counted call is not counted again. A differentiable all-to-all has a
backward all-to-all with the split sizes reversed (autograd runs it outside Python); it is recorded,
in the backward phase, when its forward runs.

"bytes" is the size of the full buffer a collective produces or consumes: the gathered output of an
all-gather, the unreduced input of a reduce-scatter, the tensor of an all-reduce, the rows a rank
hands an all-to-all (its own share included). "sent" is what leaves the rank for the other ranks of
the group: (n-1)/n of the buffer for all-gather and reduce-scatter, the rows addressed to the other
ranks for an all-to-all, and 2(n-1)/n of the buffer for an all-reduce (the ring algorithm's bound; gloo
may pick another). A group of one rank sends nothing.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections import Counter
from dataclasses import dataclass

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")
# torch.distributed entry point -> (kind, the full buffer's (position, keyword), the group's position).
C10D = {
    "all_gather_single": ("all-gather", (0, "output_tensor"), 2),
    "reduce_scatter_single": ("reduce-scatter", (1, "input"), 3),
    "all_reduce": ("all-reduce", (0, "tensor"), 2),
    "all_to_all_single": ("all-to-all", (1, "input"), 4),
}
# Functional entry point -> (kind, the group's position). The tensor is the first argument; it is the
# full buffer except for an all-gather (whose full buffer is its output).
FUNCTIONAL = {
    "all_reduce": ("all-reduce", 2),
    "all_gather_single": ("all-gather", 2),
    "reduce_scatter_single": ("reduce-scatter", 3),
    "all_to_all_single": ("all-to-all", 3),
    "all_to_all_single_autograd": ("all-to-all", 3),
}
# Where modules bind the functional collectives under their own names.
_BINDING_MODULES = ("torch.distributed", "torchtitan", "titan_dsv4")


@dataclass(frozen=True)
class Collective:
    kind: str
    api: str  # "c10d" (torch.distributed) or "functional"
    phase: str  # forward / backward / rest (of the Trainer's step: token count, clip, AdamW, logging)
    block: int | None  # the transformer block whose forward issued it (None: root level, or backward)
    dtype: str
    nbytes: int  # the full buffer (see the module docstring)
    sent: int  # bytes this rank sends to the other ranks of the group
    group_size: int
    step: int  # the counter's ``step`` when it ran


def _arg(args: tuple, kwargs: dict, position: int, name: str):
    """A call's argument by keyword or position (None when not given)."""
    return kwargs[name] if name in kwargs else (args[position] if len(args) > position else None)


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _process_group(group):
    """The ProcessGroup behind any form a collective accepts for ``group`` (None: the world)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    if group is None:
        return dist.GroupMember.WORLD
    if isinstance(group, DeviceMesh):
        return group.get_group()
    if isinstance(group, tuple):  # (mesh, dim)
        return group[0].get_group(group[1])
    if isinstance(group, str):
        return dist.distributed_c10d._resolve_process_group(group)
    return group


def _group_size_and_rank(group) -> tuple[int, int]:
    import torch.distributed as dist

    pg = _process_group(group)
    return dist.get_world_size(pg), dist.get_rank(pg)


def _sent(kind: str, nbytes: int, n: int, kept: int | None = None) -> int:
    """Bytes leaving the rank; ``kept``: an all-to-all's bytes addressed to the rank itself."""
    if n <= 1:
        return 0
    if kind == "all-to-all":
        return nbytes - (nbytes // n if kept is None else kept)
    if kind == "all-reduce":
        return 2 * nbytes * (n - 1) // n
    return nbytes * (n - 1) // n


def _a2a_bytes(t, splits: list[int] | None, rank: int, n: int) -> tuple[int, int]:
    """(buffer bytes, bytes kept for the rank itself) of an all-to-all's send (or receive) side."""
    total = _nbytes(t)
    if splits is None:
        return total, total // n
    row = total // max(1, t.shape[0])
    return total, int(splits[rank]) * row


class CollectiveCounter:
    """Wraps the collectives' entry points; records only while ``recording``."""

    def __init__(self) -> None:
        self.records: list[Collective] = []
        self.recording = False
        self.step = 0  # set by the caller: each record carries it, so steps can be compared
        self._phase = "setup"
        self._block: int | None = None
        self._depth = 0  # > 0 inside a counted call: nested collectives are part of it
        self._restore: list[tuple[object, str, object]] = []

    # ---- installation ----------------------------------------------------------------------------
    def install(self) -> CollectiveCounter:
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        for attr, (kind, where, group_at) in C10D.items():
            self._replace(dist, attr, self._counted_c10d(getattr(dist, attr), kind, where, group_at))
        originals = {attr: getattr(funcol, attr) for attr in FUNCTIONAL}
        wrappers = {attr: self._counted_functional(fn, *FUNCTIONAL[attr]) for attr, fn in originals.items()}
        for module in [m for n, m in list(sys.modules.items()) if n.startswith(_BINDING_MODULES) and m]:
            for attr, original in originals.items():
                if getattr(module, attr, None) is original:
                    self._replace(module, attr, wrappers[attr])
        return self

    def uninstall(self) -> None:
        for module, attr, original in reversed(self._restore):
            setattr(module, attr, original)
        self._restore.clear()

    def _replace(self, module, attr: str, wrapper) -> None:
        self._restore.append((module, attr, getattr(module, attr)))
        setattr(module, attr, wrapper)

    @contextlib.contextmanager
    def _outermost(self):
        """True for a call that no other counted call is running around."""
        self._depth += 1
        try:
            yield self._depth == 1
        finally:
            self._depth -= 1

    def _counted_c10d(self, original, kind: str, where: tuple[int, str], group_at: int):
        index, name = where

        @functools.wraps(original)
        def counted(*args, **kwargs):
            with self._outermost() as outermost:
                if outermost and self.recording:
                    buffer = kwargs[name] if name in kwargs else args[index]
                    n, rank = _group_size_and_rank(_arg(args, kwargs, group_at, "group"))
                    kept = None
                    if kind == "all-to-all":
                        splits = _arg(args, kwargs, 3, "input_split_sizes")
                        _, kept = _a2a_bytes(buffer, splits, rank, n)
                    self._record(kind, "c10d", buffer, _nbytes(buffer), n, kept)
                return original(*args, **kwargs)

        return counted

    def _counted_functional(self, original, kind: str, group_at: int):
        @functools.wraps(original)
        def counted(*args, **kwargs):
            with self._outermost() as outermost:
                out = original(*args, **kwargs)
                if outermost and self.recording:
                    self._record_functional(kind, group_at, args, kwargs, out)
                return out

        return counted

    def _record_functional(self, kind: str, group_at: int, args: tuple, kwargs: dict, out) -> None:
        """One functional collective (and, for a differentiable all-to-all, its backward)."""
        import torch

        tensor = _arg(args, kwargs, 0, "self")
        n, rank = _group_size_and_rank(_arg(args, kwargs, group_at, "group"))
        if kind == "all-gather":
            self._record(kind, "functional", tensor, _nbytes(tensor) * n, n)
            return
        if kind != "all-to-all":
            self._record(kind, "functional", tensor, _nbytes(tensor), n)
            return
        out_splits = _arg(args, kwargs, 1, "output_split_sizes")
        in_splits = _arg(args, kwargs, 2, "input_split_sizes")
        total, kept = _a2a_bytes(tensor, in_splits, rank, n)
        self._record(kind, "functional", tensor, total, n, kept)
        if torch.is_grad_enabled() and tensor.requires_grad:  # autograd's reversed all-to-all
            grad, grad_kept = _a2a_bytes(out, out_splits, rank, n)
            self._record(kind, "functional", out, grad, n, grad_kept, phase="backward", block=None)

    def _record(self, kind, api, buffer, nbytes, n, kept=None, *, phase=None, block=-1) -> None:
        self.records.append(
            Collective(
                kind,
                api,
                self._phase if phase is None else phase,
                self._block if block == -1 else block,
                str(buffer.dtype).removeprefix("torch."),
                nbytes,
                _sent(kind, nbytes, n, kept),
                n,
                self.step,
            )
        )

    # ---- phases and blocks -----------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str):
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    def attach_block_hooks(self, blocks) -> None:
        """Attribute collectives to the block whose forward is running.

        The pre-hook is prepended, so it runs before FSDP's own pre-forward hook (the one that
        all-gathers the block's unit); the post-hook is appended, after FSDP's.
        """
        for layer_id, block in enumerate(blocks):
            block.register_forward_pre_hook(functools.partial(self._enter_block, layer_id), prepend=True)
            block.register_forward_hook(self._leave_block, always_call=True)

    def _enter_block(self, layer_id: int, module, args) -> None:
        self._block = layer_id

    def _leave_block(self, module, args, output) -> None:
        self._block = None

    # ---- summary ---------------------------------------------------------------------------------
    def counts_by_step(self) -> dict[int, dict[str, int]]:
        """step -> phase/kind -> collectives: whether every recorded step issued the same ones."""
        out: dict[int, Counter] = {}
        for r in self.records:
            out.setdefault(r.step, Counter())[f"{r.phase}/{r.kind}"] += 1
        return {step: dict(sorted(c.items())) for step, c in sorted(out.items())}

    def summary(self, steps: int, n_layers: int) -> dict:
        """Per-step counts, bytes and sent bytes by kind (and counts by phase and API), plus forward
        all-gathers per block."""
        count, nbytes, sent, per_phase, per_api = Counter(), Counter(), Counter(), Counter(), Counter()
        for r in self.records:
            count[r.kind] += 1
            nbytes[r.kind] += r.nbytes
            sent[r.kind] += r.sent
            per_phase[f"{r.phase}/{r.kind}"] += 1
            per_api[f"{r.api}/{r.kind}"] += 1
        fwd_gathers = [r for r in self.records if r.phase == "forward" and r.kind == "all-gather"]
        in_blocks = [r for r in fwd_gathers if r.block is not None]
        return {
            "steps": steps,
            "per_step": {k: count[k] / steps for k in KINDS},
            "bytes_per_step": {k: nbytes[k] / steps for k in KINDS},
            "sent_bytes_per_step": {k: sent[k] / steps for k in KINDS},
            "sent_bytes_per_step_total": sum(sent.values()) / steps,
            "per_step_by_phase": {k: v / steps for k, v in sorted(per_phase.items())},
            "per_step_by_api": {k: v / steps for k, v in sorted(per_api.items())},
            "counts_by_step": self.counts_by_step(),
            "forward_all_gathers_per_step": len(fwd_gathers) / steps,
            "forward_all_gathers_over_n_layers": len(fwd_gathers) / steps / n_layers,
            "forward_all_gathers_per_block": len(in_blocks) / steps / n_layers,
            "forward_all_gathers_root_level": (len(fwd_gathers) - len(in_blocks)) / steps,
            "forward_all_gather_dtypes_per_block": {
                dt: n / steps / n_layers for dt, n in sorted(Counter(r.dtype for r in in_blocks).items())
            },
        }
