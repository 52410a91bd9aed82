"""Context parallelism's collectives (``titan_dsv4/model/cp_collectives.py``): the all-gather's backward sums
each part's gradient in fp32 and rounds once, and the reduction's path follows the backend that serves the
gradient's device (Titan's "cuda:nccl,cpu:gloo" reduce-scatters CUDA tensors on NCCL)."""

from __future__ import annotations

import pytest
import torch

SMALL = 2.0**-9  # bf16: 1 + 2**-9 rounds to 1 (half an ulp is 2**-8), 1 + 3 * 2**-9 to 1 + 2**-7


def _gradients(world_size: int) -> torch.Tensor:
    """[rank, part, 2, n] bf16: every rank's gradient of the gathered [part, 2, n], the same on every rank.

    Columns < world_size: for each (part, column) one rank holds 1 and the others 2**-9, the 1 on every rank
    in turn, so a bf16 sum in any fixed rank order loses the small terms somewhere (1 + 2**-9 = 1), where
    the fp32 sum 1 + 3 * 2**-9 rounds once to 1 + 2**-7. Further columns: small integers times powers of
    two, exact in bf16 and summed exactly in fp32, so the fp32 sum cast once is the float64 sum cast once.
    """
    n = world_size + 16
    r = torch.arange(world_size).view(-1, 1, 1, 1)
    j = torch.arange(world_size).view(1, -1, 1, 1)
    e = torch.arange(world_size).view(1, 1, 1, -1)
    tricky = torch.where((e + j) % world_size == r, 1.0, SMALL).expand(-1, -1, 2, -1)
    g = torch.Generator().manual_seed(3)
    shape = (world_size, world_size, 2, n - world_size)
    ints = torch.randint(-64, 65, shape, generator=g).double()
    exact = ints * 2.0 ** -torch.randint(0, 9, shape, generator=g).double()
    return torch.cat([tricky.double(), exact], dim=-1).to(torch.bfloat16)


def _inputs(rank: int, n: int) -> torch.Tensor:
    """[2, n] bf16: what ``rank`` all-gathers."""
    return (torch.arange(2 * n, dtype=torch.float32).view(2, n) + 10 * rank).to(torch.bfloat16)


def _gather_backward(rank, world_size):
    """On every rank: the all-gather forward, its autograd backward, and both reductions called directly."""
    import torch.distributed as dist

    from titan_dsv4.model.cp_collectives import AllGather, all_gather_plain, reduce_to_owner

    group = dist.group.WORLD
    grads = _gradients(world_size)
    mine = grads[rank]  # [part, 2, n]: this rank's gradient of the gathered tensor
    x = _inputs(rank, mine.shape[-1]).requires_grad_(True)
    gathered = AllGather.apply(x, group)
    gathered.backward(mine)
    bf16_sum = mine.clone()
    dist.all_reduce(bf16_sum, group=group)  # the former gloo path: summed in bf16, a rounding per term
    x32 = x.detach().float().requires_grad_(True)
    AllGather.apply(x32, group).backward(mine.float())
    return {
        "forward": gathered.detach(),
        "autograd": x.grad,
        "scatter": reduce_to_owner(mine, group, torch.bfloat16, scatter=True),
        "all_reduce": reduce_to_owner(mine, group, torch.bfloat16, scatter=False),
        "bf16_sum": bf16_sum[rank],
        "fp32_input": x32.grad,
        "ints": all_gather_plain(torch.tensor([rank, 10 + rank]), group),
    }


@pytest.mark.slow
def test_all_gather_backward_sums_in_fp32_and_rounds_once(ranks):
    world_size = 4  # 4 terms per sum: 3 small ones that a bf16 accumulation can lose one by one
    results = ranks.run(_gather_backward, world_size, timeout=300)
    grads = _gradients(world_size)
    for rank, out in enumerate(results):
        expected = grads[:, rank].double().sum(0).to(torch.bfloat16)  # exact sum, cast once
        assert (expected[..., :world_size] == 1 + 2**-7).all()
        n = grads.shape[-1]
        assert torch.equal(out["forward"], torch.stack([_inputs(r, n) for r in range(world_size)]))
        for path in ("autograd", "scatter", "all_reduce"):
            assert out[path].dtype == torch.bfloat16, path
            assert torch.equal(out[path], expected), (rank, path, out[path][..., :world_size])
        # the data discriminate: summing in bf16 (the former gloo path) rounds differently
        assert not torch.equal(out["bf16_sum"], expected), rank
        assert out["fp32_input"].dtype == torch.float32
        assert torch.equal(out["fp32_input"], grads[:, rank].double().sum(0).float())
        assert out["ints"].tolist() == [[r, 10 + r] for r in range(world_size)]


def test_backend_string_parsed_per_device_type():
    from titan_dsv4.model.cp_collectives import backend_for_device, reduces_by_scatter

    mixed = "cuda:nccl,cpu:gloo"  # Titan's backend string: its former name match fell to the all-reduce
    assert backend_for_device(mixed, "cuda") == "nccl" and reduces_by_scatter("nccl", "cuda")
    assert backend_for_device(mixed, "cpu") == "gloo" and reduces_by_scatter("gloo", "cpu")
    assert backend_for_device("cpu:gloo,cuda:gloo", "cuda") == "gloo"
    assert not reduces_by_scatter("gloo", "cuda")  # gloo's reduce-scatter is tested on CPU tensors only
    assert backend_for_device("xpu:xccl", "xpu") == "xccl" and reduces_by_scatter("xccl", "xpu")
    assert backend_for_device("nccl", "cuda") == "nccl"  # one bare name
    assert backend_for_device(mixed, "xpu") is None and not reduces_by_scatter(None, "xpu")
    assert not reduces_by_scatter("mpi", "cpu") and not reduces_by_scatter("ucc", "cuda")


def test_group_path_follows_the_backend_of_the_gradients_device(monkeypatch):
    """A group built from "cuda:nccl,cpu:gloo", without NCCL: CUDA gradients reduce-scatter on NCCL, CPU
    gradients on gloo; a group torch registered without a config falls back to its backend's name."""
    import torch.distributed as dist

    from titan_dsv4.model import cp_collectives

    group = object()
    configs = {group: "cuda:nccl,cpu:gloo"}
    monkeypatch.setattr(dist, "get_backend_config", lambda g: configs[g])
    assert cp_collectives.group_reduces_by_scatter(group, torch.device("cuda", 3))
    assert cp_collectives.group_reduces_by_scatter(group, torch.device("cpu"))
    configs[group] = "cpu:gloo,cuda:gloo"
    assert not cp_collectives.group_reduces_by_scatter(group, torch.device("cuda"))

    def unregistered(g):
        raise TypeError("Invariant encountered: value was None when it should not be")

    monkeypatch.setattr(dist, "get_backend_config", unregistered)
    monkeypatch.setattr(dist, "get_backend", lambda g: "nccl")
    assert cp_collectives.group_reduces_by_scatter(group, torch.device("cuda"))
    monkeypatch.setattr(dist, "get_backend", lambda g: "mpi")
    assert not cp_collectives.group_reduces_by_scatter(group, torch.device("cpu"))
