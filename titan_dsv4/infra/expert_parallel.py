"""Expert parallelism for DeepSeek-V4's routed experts, on TorchTitan's parallel styles.

Titan's ``ExpertParallel`` shards each expert tensor ``Shard(0)`` over the ``ep`` mesh and moves tokens with
an all-to-all (it runs over gloo too). Where V4 needs its own code:
  * on CPU, the token permutation after the all-to-all runs in PyTorch: Titan's calls a triton kernel
    that cannot launch without a GPU (``CPUExpertParallel``; on CUDA it is Titan's dispatch unchanged);
  * DeepEP (``expert_parallel_comm_backend = "deepep"``) uses Titan's ``DeepEPExpertParallel``; V4's MoE
    then hands it the routing (``DeepSeekV4MoE.forward``), scores applied at combine, after W2.
Hash-routed and learned layers dispatch through the same experts module: only which experts a token
picks differs, not how it gets there.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module
from torchtitan.distributed.expert_parallel import ExpertParallel
from torchtitan.models.moe.kernels import generate_permute_indices
from torchtitan.models.moe.utils import TOKEN_GROUP_ALIGN_SIZE_M
from torchtitan.tools.utils import _round_up

from ..compat import all_to_all_single, all_to_all_single_autograd


class CPUExpertParallel(ExpertParallel):
    """Titan's ExpertParallel; on CPU the post-all-to-all permutation uses Titan's PyTorch implementation.

    The dispatch below is Titan's ``ExpertParallel._token_dispatch`` with two changes: the permutation
    indices come from ``generate_permute_indices(..., use_cpu=True)`` instead of its triton kernel, and the
    experts learn how many of each expert's rows came from each rank (``row_groups``), so that their
    for-loop computes per source rank and EP's gradients equal FSDP's sums. The combine is Titan's.
    """

    def _token_dispatch(self, mod: nn.Module, inputs: tuple, device_mesh: DeviceMesh):
        routed_input, num_tokens_per_expert = inputs
        if routed_input.device.type == "cuda":
            return super()._token_dispatch(mod, inputs, device_mesh)
        ep_degree = device_mesh.shape[0]
        num_local_experts = num_tokens_per_expert.shape[0] // ep_degree
        group = device_mesh.get_group()
        with torch.no_grad():
            received = torch.ops._c10d_functional.wait_tensor(
                all_to_all_single(num_tokens_per_expert, None, None, group)
            )
            self.input_splits = num_tokens_per_expert.view(ep_degree, -1).sum(dim=1).tolist()
            self.output_splits = received.view(ep_degree, -1).sum(dim=1).tolist()
        routed_input = all_to_all_single_autograd(routed_input, self.output_splits, self.input_splits, group)
        # Rows arrive grouped [from rank r][local expert e]; regroup them by local expert (padded as Titan
        # does).
        padded_len = _round_up(
            routed_input.shape[0] + num_local_experts * TOKEN_GROUP_ALIGN_SIZE_M, TOKEN_GROUP_ALIGN_SIZE_M
        )
        with torch.no_grad():
            self.permuted_indices, tokens_per_local_expert, _ = generate_permute_indices(
                received, num_local_experts, ep_degree, padded_len, TOKEN_GROUP_ALIGN_SIZE_M, use_cpu=True
            )
        routed_input = torch.vstack((routed_input, routed_input.new_zeros(routed_input.shape[-1])))
        self.input_shape = routed_input.shape
        mod.row_groups = received.view(ep_degree, num_local_experts).transpose(0, 1)  # per source rank
        return routed_input[self.permuted_indices, :], tokens_per_local_expert


def deepep_available() -> bool:
    try:
        import deep_ep  # noqa: F401
    except ImportError:
        return False
    return True


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, use_deepep: bool = False) -> None:
    """Shard every block's routed experts over ``ep_mesh`` with Titan's EP style (DeepEP or all-to-all)."""
    if use_deepep:
        from torchtitan.distributed.expert_parallel import DeepEPExpertParallel

    for block in model.blocks():  # the MTP depths' blocks included
        moe = getattr(block, "_checkpoint_wrapped_module", block).moe
        style = DeepEPExpertParallel(score_before_experts=False) if use_deepep else CPUExpertParallel()
        parallelize_module(moe.experts, ep_mesh, style)
        moe.uses_deepep = use_deepep
