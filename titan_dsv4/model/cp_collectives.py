"""Context parallelism's collectives, in one place: the same calls on NCCL (GPU) and gloo (CPU tests).

* ``all_gather_plain``: integers (chunk indices, token ids, labels), no gradient.
* ``AllGather``: the compressed entries, with gradient: its backward sums each part's gradient over the
  ranks and hands the sum to the part's owner, a reduce-scatter, accumulated in fp32 (as FSDP's
  ``reduce_dtype``): a bf16 reduction would round up to cp - 1 times per entry (255 at cp 256), fp32 once.
  It doubles the backward's bytes in bf16 (CSA at S = 1M: 512 MiB instead of 256 MiB per row and layer).
* ``AllToAll``: the halos, rows to the ranks that need them; its backward sends each gradient row back
  (nothing is summed: no rounding to control).

The reduction's path is chosen by the backend that serves the gradient's device, read from the group's
backend string (Titan's ``"cuda:nccl,cpu:gloo"`` serves CUDA tensors with NCCL): NCCL, XCCL and gloo on
CPU tensors (torch >= 2.13, this package's floor) reduce-scatter; any other backend or device (gloo with
CUDA tensors, MPI, UCC) all-reduces the whole gradient, cp x the bytes, and each rank keeps its part.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# backend -> the device types whose tensors it reduce-scatters
REDUCE_SCATTER = {"nccl": ("cuda",), "xccl": ("xpu",), "gloo": ("cpu",)}


def backend_for_device(config: str, device_type: str) -> str | None:
    """The backend a backend string ("cuda:nccl,cpu:gloo", or one bare name) names for ``device_type``."""
    entries = [e.strip() for e in str(config).lower().split(",") if e.strip()]
    if len(entries) == 1 and ":" not in entries[0]:
        return entries[0]
    pairs = dict(e.split(":", 1) for e in entries if ":" in e)
    return pairs.get(device_type)


def reduces_by_scatter(backend: str | None, device_type: str) -> bool:
    """Whether ``backend`` reduce-scatters ``device_type`` tensors (else: the all-reduce fallback)."""
    return device_type in REDUCE_SCATTER.get(str(backend), ())


def group_reduces_by_scatter(group: dist.ProcessGroup, device: torch.device) -> bool:
    """Whether ``group`` reduce-scatters tensors on ``device``, by the backend that serves its type."""
    try:
        config = dist.get_backend_config(group)
    except TypeError:  # a group registered without a backend config (torch's ``not_none``)
        config = str(dist.get_backend(group))
    device_type = torch.device(device).type
    return reduces_by_scatter(backend_for_device(config, device_type), device_type)


def all_gather_plain(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[...] -> [world, ...]: every rank's ``t``, in group-rank order, without gradient."""
    t = t.detach().contiguous()
    out = t.new_empty((dist.get_world_size(group), *t.shape))
    dist.all_gather_into_tensor(out.view(-1), t.view(-1), group=group)
    return out


def reduce_to_owner(grad: torch.Tensor, group: dist.ProcessGroup, dtype: torch.dtype, scatter: bool):
    """[world, ...] -> [...]: rank r gets part r summed over the ranks in fp32, cast to ``dtype``."""
    reduce_dtype = torch.promote_types(grad.dtype, torch.float32)
    if scatter:
        acc = grad.to(reduce_dtype).contiguous()
        out = acc.new_empty(acc.shape[1:])
        dist.reduce_scatter_tensor(out.view(-1), acc.view(-1), group=group)
        return out.to(dtype)
    # cp x the bytes: every rank receives every part's sum and keeps its own (in place: a copy of grad)
    acc = grad.to(reduce_dtype, memory_format=torch.contiguous_format, copy=True)
    dist.all_reduce(acc, group=group)
    return acc[dist.get_rank(group)].to(dtype, copy=True)


class AllGather(torch.autograd.Function):
    """[...] -> [world, ...] all-gather whose backward reduce-scatters the gradient (fp32) to each owner.

    (torch.distributed.nn's all-gather emulates the reduce-scatter on gloo with scatters addressed by group
    rank, which fails on a subgroup such as the ``cp`` mesh's, and reduces in the compute dtype.)
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group, ctx.dtype = group, t.dtype
        return all_gather_plain(t, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scatter = group_reduces_by_scatter(ctx.group, grad.device)
        return reduce_to_owner(grad, ctx.group, ctx.dtype, scatter), None


class AllToAll(torch.autograd.Function):
    """Rows of ``t`` to the ranks ``send_splits`` says (dim 0); backward sends each gradient row back."""

    @staticmethod
    def forward(ctx, t, n_out: int, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
        ctx.group, ctx.send_splits, ctx.recv_splits, ctx.shape = group, send_splits, recv_splits, t.shape
        out = t.new_empty((n_out, *t.shape[1:]))
        dist.all_to_all_single(out, t.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty(ctx.shape)
        dist.all_to_all_single(out, grad.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return out, None, None, None, None
