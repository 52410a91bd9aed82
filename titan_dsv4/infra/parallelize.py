"""``parallelize_deepseek_v4``: the train spec's parallelize_fn (AC, compile, EP, FSDP2 by the fp32 unit
rules)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import Shard
from torchtitan.config import TORCH_DTYPE_MAP, JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.models.llama3.infra.parallelize import disable_fsdp_gradient_division
from torchtitan.tools.logging import logger

from ..job_config import unimplemented_degrees, unimplemented_message
from ..model.errors import ConfigError
from ..refusals import refuses_at_entry_points
from .activation_checkpoint import apply_activation_checkpointing
from .expert_parallel import apply_expert_parallel, deepep_available
from .fsdp_units import shard_unit, shard_with_fp32_units
from .planning import Layout, experts_shard_dim, experts_shardable, refuse_layout_that_cannot_fit


class UnsupportedParallelismError(ConfigError, NotImplementedError):
    """A parallelism degree DeepSeek-V4 does not implement yet; raised before any module is touched."""


@dataclass(frozen=True)
class ParallelPlan:
    """What ``parallelize_deepseek_v4`` applied, recorded on the model so that a second call can check it."""

    degrees: tuple[int, ...]  # dp_replicate, dp_shard, cp, tp, pp, ep, etp
    ac_mode: str
    compiled: bool
    param_dtype: str
    reduce_dtype: str

    @classmethod
    def of(cls, dims: ParallelDims, job_config: JobConfig) -> ParallelPlan:
        return cls(
            (dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp, dims.pp, dims.ep, dims.etp),
            job_config.activation_checkpoint.mode,
            compile_enabled(job_config),
            job_config.training.mixed_precision_param,
            job_config.training.mixed_precision_reduce,
        )


@refuses_at_entry_points
def parallelize_deepseek_v4(
    model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig
) -> nn.Module:
    """AC, compile, expert parallelism and FSDP2 by the fp32 unit rules, then the HCA group; idempotent."""
    plan = ParallelPlan.of(parallel_dims, job_config)
    if already_parallelized(model, plan):
        return model
    refuse_layout(model.model_args, parallel_dims, job_config)
    if job_config.activation_checkpoint.mode != "none":
        for stack in block_stacks(model):  # the backbone's layers, and the MTP depths as blocks of their own
            apply_activation_checkpointing(
                stack, job_config.activation_checkpoint, plan.compiled, job_config.job.dump_folder
            )
    if plan.compiled:
        apply_compile(model, job_config.compile.backend)
    if parallel_dims.ep_enabled:
        apply_expert_parallel(
            model,
            parallel_dims.get_mesh("ep"),
            job_config.parallelism.expert_parallel_comm_backend == "deepep",
        )
    mesh = data_parallel_mesh(parallel_dims)
    if mesh is not None:
        apply_fsdp(
            model,
            mesh,
            mp_policy=MixedPrecisionPolicy(
                param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
                reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
            ),
            reshard_after_forward=reshard_after_forward(job_config, parallel_dims),
            cpu_offload=job_config.training.enable_cpu_offload,
            expert_mesh=expert_data_parallel_mesh(parallel_dims),
            ep_degree=parallel_dims.ep,
        )
    bind_hca_param_sync_group(model, hca_param_sync_group(mesh))
    bind_context_parallel(model, parallel_dims, job_config)
    model.parallel_plan = plan
    return model


def refuse_layout(model_args, parallel_dims: ParallelDims, job_config: JobConfig) -> None:
    """Every layout this function would refuse, before it touches a module (``./run_train.sh``'s preflight
    runs the same before any rank starts)."""
    refuse_unimplemented_parallelism(parallel_dims, job_config)
    refuse_experts_fsdp_cannot_shard(model_args, parallel_dims)
    refuse_fp32_experts_under_deepep(model_args, parallel_dims, job_config)
    refuse_layout_that_cannot_fit(model_args, parallel_dims, job_config)  # before Titan allocates


def block_stacks(model: nn.Module) -> list[nn.Module]:
    """Modules whose ``layers`` are FSDP/AC units: the model, and its MTP module when it has one."""
    return [model] + ([model.mtp] if model.mtp is not None else [])


def refuse_experts_fsdp_cannot_shard(model_args, parallel_dims: ParallelDims) -> None:
    """Experts FSDP shards on dim 1 (``experts_shard_dim``) must divide evenly over efsdp."""
    layout = Layout.of(parallel_dims)
    if not experts_shardable(model_args, layout):
        raise UnsupportedParallelismError(
            f"{layout.describe()} leaves {layout.efsdp} expert data-parallel ranks per expert group for "
            f"{model_args.moe_args.num_experts} experts: FSDP would shard each expert on its inner dims "
            f"(moe_inter_dim {model_args.moe_inter_dim}, dim {model_args.dim}), which {layout.efsdp} does "
            "not divide. Pick an expert_parallel_degree that leaves efsdp x ep <= the expert count, or an "
            "efsdp dividing both."
        )


def compile_enabled(job_config: JobConfig) -> bool:
    return job_config.compile.enable and "model" in job_config.compile.components


def already_parallelized(model: nn.Module, plan: ParallelPlan) -> bool:
    """A second call with the same plan is a no-op; with another plan it is refused (nothing is undone)."""
    done = getattr(model, "parallel_plan", None)
    if done is None:
        return False
    if done != plan:
        raise UnsupportedParallelismError(
            f"this model was already parallelized with {done}; it cannot be parallelized again with {plan}. "
            "Build a fresh model (on the meta device) for another layout."
        )
    logger.info("parallelize_deepseek_v4: the model is already parallelized with this plan; nothing to do")
    return True


def hca_param_sync_group(mesh: DeviceMesh | None) -> dist.ProcessGroup | None:
    """The group whose ranks shard the same HCA compressor parameters: the 1-D data-parallel mesh's.

    Multi-dimensional (HSDP) meshes disable alignment: one MAX over the flattened ranks would make a
    replica group pool synthetic windows because of another replica's data, and reducing over only
    one of the dims would miss the ranks that really share shards. None also for no mesh or size 1.
    """
    if mesh is None:
        return None
    ndim, size = mesh.ndim, mesh.size()
    if ndim > 1:
        logger.info(
            f"HCA graph alignment disabled: the data-parallel mesh {mesh.mesh_dim_names} is {ndim}-D, and no "
            "single group of it is the set of ranks sharing HCA parameters; keep every rank's sequence "
            "at least hca_ratio tokens long (or all shorter) on this layout"
        )
        return None
    return mesh.get_group() if size > 1 else None


def bind_hca_param_sync_group(model: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Bind ``group`` to the HCA compressors only (ratio 128); CSA and sliding layers never take it."""
    for compressor in model.hca_compressors():
        compressor.set_hca_param_sync_group(group)


def bind_context_parallel(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig) -> None:
    """Give the model the ``cp`` mesh's group: Titan shards its inputs, the model runs V4's attention across
    the shards (``model/sequence_shard.py``)."""
    if not parallel_dims.cp_enabled:
        return
    from ..model.sequence_shard import chunks_per_rank

    per_rank = chunks_per_rank(job_config.parallelism.context_parallel_load_balancer)
    model.set_context_parallel(parallel_dims.get_mesh("cp").get_group(), per_rank)


def refuse_unimplemented_parallelism(
    parallel_dims: ParallelDims, job_config: JobConfig | None = None
) -> None:
    """Fail before any work on degrees this package does not implement, naming each one and the fix."""
    bad = unimplemented_degrees(parallel_dims.tp, parallel_dims.ep, parallel_dims.etp)
    if bad:
        raise UnsupportedParallelismError(unimplemented_message(bad))
    backend = job_config.parallelism.expert_parallel_comm_backend if job_config is not None else "standard"
    if backend not in ("standard", "deepep"):
        raise UnsupportedParallelismError(
            f"parallelism.expert_parallel_comm_backend={backend!r} is unknown; use 'standard' (all-to-all) "
            f"or 'deepep'"
        )
    if backend == "deepep" and parallel_dims.ep > 1 and not deepep_available():
        raise UnsupportedParallelismError(
            "parallelism.expert_parallel_comm_backend='deepep' needs the DeepEP package (`import deep_ep` "
            "failed; "
            "it is a CUDA library, https://github.com/deepseek-ai/DeepEP). Install it, or use "
            "--parallelism.expert_parallel_comm_backend standard (Titan's all-to-all)."
        )


def refuse_fp32_experts_under_deepep(model_args, parallel_dims, job_config) -> None:
    """DeepEP's combine applies the routing weights after W2 in bf16, so fp32 experts cannot be served."""
    backend = job_config.parallelism.expert_parallel_comm_backend if job_config is not None else "standard"
    if backend == "deepep" and parallel_dims.ep > 1 and "experts" in model_args.fp32_compute:
        raise UnsupportedParallelismError(
            "deepseek_v4.fp32_compute includes 'experts' (fp32 SwiGLU, routing weights before W2), which "
            "DeepEP's dispatch cannot serve (its combine weighs the bf16 outputs after W2). Drop 'experts' "
            "from --deepseek_v4.fp32_compute or use --parallelism.expert_parallel_comm_backend standard."
        )


def apply_compile(model: nn.Module, backend: str) -> None:
    """Compile each block's pieces that hold no nested FSDP unit, so no FSDP hook lands in a graph.

    Titan compiles MoE blocks child by child for the same reason (its experts are a nested unit);
    V4 also nests the fp32 islands inside attention, so attention's math is compiled as a function.
    Modules that are islands themselves (attn_hc, ffn_hc, hc_head) are compiled whole; FSDP then
    wraps the compiled module, which keeps its hooks outside the graph.
    """
    torch._dynamo.config.capture_scalar_outputs = True

    def compiled(fn):
        return torch.compile(fn, backend=backend, fullgraph=True)

    for block in model.blocks():
        block = getattr(block, "_checkpoint_wrapped_module", block)
        for name in ("attn_hc", "ffn_hc", "attention_norm", "ffn_norm"):
            setattr(block, name, compiled(getattr(block, name)))
        block.residual = compiled(block.residual)
        block.self_attn.attention_kernel = compiled(block.self_attn.attention_kernel)
        for name in ("router", "shared_experts"):  # experts: dynamic per-expert splits, as in Titan
            setattr(block.moe, name, compiled(getattr(block.moe, name)))
    for head_owner in [model] + [
        _inner(d) for stack in block_stacks(model)[1:] for d in stack.layers.values()
    ]:
        if head_owner.hc_head is not None:  # a pipeline stage before the last has no head
            head_owner.hc_head = compiled(head_owner.hc_head)
    logger.info("Compiled DeepSeek-V4 blocks (mHC, norms, attention math, router, shared expert)")


def expert_data_parallel_mesh(parallel_dims: ParallelDims) -> DeviceMesh | None:
    """The mesh the experts' FSDP shards over under EP, as Titan builds it: ('efsdp',) or ('dp_replicate',
    'efsdp')."""
    if not parallel_dims.ep_enabled:
        return None
    names = ["dp_replicate", "efsdp"] if parallel_dims.dp_replicate_enabled else ["efsdp"]
    return parallel_dims.get_mesh(names)


def data_parallel_mesh(parallel_dims: ParallelDims) -> DeviceMesh | None:
    """The mesh FSDP shards over, as Titan builds it: 1-D ('fsdp',) or 2-D ('dp_replicate', 'fsdp') for
    HSDP."""
    if parallel_dims.fsdp_enabled:
        names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        return parallel_dims.get_mesh(names)
    if parallel_dims.dp_replicate_enabled:
        # Pure replication: FSDP over the replicate group (same gradients as DDP, sharded state).
        logger.info("dp_replicate > 1 with dp_shard == 1: sharding over the replicate mesh with FSDP2")
        return parallel_dims.get_mesh("dp_replicate")
    return None


def reshard_after_forward(job_config: JobConfig, parallel_dims: ParallelDims) -> bool:
    policy = job_config.parallelism.fsdp_reshard_after_forward
    if policy not in ("default", "always", "never"):
        raise ValueError(f"Invalid fsdp_reshard_after_forward {policy!r}; use default, always or never")
    return {"always": True, "never": False}.get(policy, not parallel_dims.pp_enabled)


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    mp_policy: MixedPrecisionPolicy,
    reshard_after_forward: bool,
    cpu_offload: bool = False,
    ignored_params: set[nn.Parameter] | None = None,
    group_islands: bool = True,
    expert_mesh: DeviceMesh | None = None,
    ep_degree: int = 1,
) -> None:
    """Experts (under EP), islands and blocks first, then the root (embeddings, final norm); Titan's gradient
    conventions.

    Under EP the routed experts are their own unit on the expert data-parallel mesh, with the block's
    policy, sharded on the dim ``experts_shard_dim`` names (dim 1 when there are fewer experts than efsdp x ep
    ranks, as Titan's llama4/deepseek_v3).
    """
    offload = CPUOffloadPolicy() if cpu_offload else None
    common = dict(
        mesh=mesh,
        mp_policy=mp_policy,
        ignored_params=ignored_params,
        offload_policy=offload,
        group_islands=group_islands,
    )
    for stack in block_stacks(model):
        for unit in stack.layers.values():  # a backbone block, or an MTP depth around its block
            if expert_mesh is not None:
                experts = _block_of(unit).moe.experts
                efsdp = expert_mesh["efsdp"].size() if expert_mesh.ndim > 1 else expert_mesh.size()
                dim = experts_shard_dim(experts.num_experts, efsdp, ep_degree)
                shard_unit(
                    experts,
                    mesh=expert_mesh,
                    mp_policy=mp_policy,
                    reshard_after_forward=reshard_after_forward,
                    ignored_params=ignored_params,
                    offload_policy=offload,
                    shard_placement_fn=lambda p, dim=dim: Shard(dim),
                )
            shard_with_fp32_units(unit, reshard_after_forward=reshard_after_forward, **common)
    # The root's islands (hc_head, lm_head) reshard as the blocks do: under PP not at all, so the last stage
    # does not gather the lm_head again for every microbatch.
    shard_with_fp32_units(
        model, reshard_after_forward=None, islands_reshard_after_forward=reshard_after_forward, **common
    )
    # Titan normalises the loss by the global token count: FSDP must not divide gradients again.
    disable_fsdp_gradient_division(model)
    if uses_gloo(mesh):
        force_sum_reduction(model)


def _inner(module: nn.Module) -> nn.Module:
    return getattr(module, "_checkpoint_wrapped_module", module)


def _block_of(unit: nn.Module) -> nn.Module:
    """The transformer block of an FSDP block unit (an MTP depth holds one)."""
    inner = _inner(unit)
    return getattr(inner, "block", inner)


def uses_gloo(mesh: DeviceMesh) -> bool:
    groups = mesh.get_all_groups() if mesh.ndim > 1 else [mesh.get_group()]
    return any(dist.get_backend(g) == "gloo" for g in groups)


def force_sum_reduction(model: nn.Module) -> None:
    """gloo has no PREMUL_SUM: reduce with SUM (the divide factor is 1.0 anyway)."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)


__all__ = ["parallelize_deepseek_v4", "apply_fsdp", "data_parallel_mesh"]
