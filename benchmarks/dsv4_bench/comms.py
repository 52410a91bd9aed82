"""Count the collectives of a training step by kind, phase and transformer block.

FSDP2 (torch 2.13) calls ``dist.all_gather_single`` / ``dist.reduce_scatter_single`` / ``dist.all_reduce``
through the ``torch.distributed`` module attribute at call time, so replacing those attributes sees
every FSDP collective plus the model's own all-reduces (HCA alignment flag, expert-load counts).
DTensor reductions (e.g. the grad-norm in clipping) go through functional collectives and are not
part of these three entry points, so they are not counted.

"bytes" is the size of the full buffer a collective produces or consumes: the gathered output of
an all-gather, the unreduced input of a reduce-scatter, the tensor of an all-reduce.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from dataclasses import dataclass

KINDS = {
    "all_gather_single": "all-gather",
    "reduce_scatter_single": "reduce-scatter",
    "all_reduce": "all-reduce",
}
# Which argument holds the full buffer: (positional index, keyword name).
_BUFFER_ARG = {
    "all_gather_single": (0, "output_tensor"),
    "reduce_scatter_single": (1, "input"),
    "all_reduce": (0, "tensor"),
}


@dataclass(frozen=True)
class Collective:
    kind: str
    phase: str  # forward / backward / optimizer
    block: int | None  # the transformer block whose forward issued it (None: root level)
    dtype: str
    nbytes: int


def _buffer(attr: str, args: tuple, kwargs: dict):
    index, name = _BUFFER_ARG[attr]
    return kwargs[name] if name in kwargs else args[index]


class CollectiveCounter:
    """Wraps the three entry points on ``torch.distributed``; records only while ``recording``."""

    def __init__(self) -> None:
        self.records: list[Collective] = []
        self.recording = False
        self._phase = "setup"
        self._block: int | None = None
        self._originals: dict = {}

    def install(self) -> CollectiveCounter:
        import torch.distributed as dist

        for attr, kind in KINDS.items():
            original = getattr(dist, attr)
            self._originals[attr] = original
            setattr(dist, attr, self._counted(original, attr, kind))
        return self

    def uninstall(self) -> None:
        import torch.distributed as dist

        for attr, original in self._originals.items():
            setattr(dist, attr, original)
        self._originals.clear()

    def _counted(self, original, attr: str, kind: str):
        @functools.wraps(original)
        def counted(*args, **kwargs):
            if self.recording:
                t = _buffer(attr, args, kwargs)
                self.records.append(
                    Collective(
                        kind,
                        self._phase,
                        self._block,
                        str(t.dtype).removeprefix("torch."),
                        t.numel() * t.element_size(),
                    )
                )
            return original(*args, **kwargs)

        return counted

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

    def summary(self, steps: int, n_layers: int) -> dict:
        """Per-step counts and bytes by kind (and by phase), plus forward all-gathers per block."""
        per_kind = Counter(r.kind for r in self.records)
        bytes_kind = Counter()
        per_phase = Counter()
        for r in self.records:
            bytes_kind[r.kind] += r.nbytes
            per_phase[f"{r.phase}/{r.kind}"] += 1
        fwd_gathers = [r for r in self.records if r.phase == "forward" and r.kind == "all-gather"]
        in_blocks = [r for r in fwd_gathers if r.block is not None]
        return {
            "steps": steps,
            "per_step": {k: per_kind[k] / steps for k in KINDS.values()},
            "bytes_per_step": {k: bytes_kind[k] / steps for k in KINDS.values()},
            "per_step_by_phase": {k: v / steps for k, v in sorted(per_phase.items())},
            "forward_all_gathers_per_step": len(fwd_gathers) / steps,
            "forward_all_gathers_over_n_layers": len(fwd_gathers) / steps / n_layers,
            "forward_all_gathers_per_block": len(in_blocks) / steps / n_layers,
            "forward_all_gathers_root_level": (len(fwd_gathers) - len(in_blocks)) / steps,
            "forward_all_gather_dtypes_per_block": {
                dt: n / steps / n_layers for dt, n in sorted(Counter(r.dtype for r in in_blocks).items())
            },
        }
