"""Planning at scale: one rank's memory and traffic for a DeepSeek-V4 layout, whether it fits, what would.

Arithmetic on the model's shapes (``DeepSeekV4ModelArgs``), the layout (``Layout``: data-parallel degrees and
expert parallelism) and the step (``Training``): nothing is built or allocated, so the trainer runs it before
Titan allocates and the dry run and the layout search run it for thousands of ranks.

Per rank, at the peak of a step (conservative: every part at its own maximum at once):
  * parameters, gradients and AdamW's two moments: FSDP shards in the storage dtype (``training.dtype``);
    non-expert units are sharded over dp_shard, routed experts over efsdp x ep (= dp_shard as well);
  * FSDP's unsharded copies in the compute dtype: units not resharded after forward (the root, the holders)
    stay gathered; on top, the largest unit and the next one (prefetch), and in backward the largest
    unit's unsharded gradient and its reduce-scatter buffer (reduce dtype);
  * activations (``activation_estimate``): what autograd keeps from forward into backward under the AC mode,
    plus the worst moment of backward on top of it.
A layout fits when that peak is at most the device memory less ``RESERVED_FRACTION`` (CUDA context, NCCL
buffers, allocator fragmentation). Per rank per step (ring collectives: a rank receives (n-1)/n of what is
gathered and sends (n-1)/n of what is reduced): all-gathers (forward, and again in backward for resharded
units), reduce-scatters of every gradient in the reduce dtype, HSDP's all-reduce of the shards across
replicas, and under EP the all-to-all dispatch and combine of every MoE layer (forward, backward, recompute).

The activation model: bytes autograd saves per token in one block without AC, path by path, measured
against ``saved_tensors_hooks`` on the debug model in tests/test_planning.py. Symbols: D dim, n hc_mult
streams, H heads of head_dim d sharing one K=V head, W sliding_window, q q_lora_rank, E experts choosing
top_k k, I moe_inter_dim, V vocab; c the compute dtype's bytes, f = 4 (fp32). With bf16 compute, FSDP casts
the inputs of the fp32 units (mHC, compressor projections, HyperHead, lm_head) to fp32 copies: saved too.
  * residual, per mHC site: the streams [n, D], the sublayer output [D], comb [n, n] and post [n];
  * mHC site: the fp32 streams and their RMS-normalised copy [n*D] each, the mixer output [(2+n)*n], the
    Sinkhorn iterations (2*iters + 1 tensors [n, n], 2*iters [n]);
  * RMSNorm of width w: its fp32 input and normalised output (attention, ffn, q and kv norms);
  * attention: the inputs of wq_a [D], wq_b [q] and wo_b [o_groups*o_lora_rank]; the sparse kernel's fp32
    softmax over 2W window logits, the layer's entries (CSA: index_topk picks, HCA: S / hca_ratio) and the
    sink, per head; q (and its fp32 copy for the head norm), its window blocks and the output [H*d]; the
    window probabilities [H, 2W] and keys; CSA also the gathered picks [index_topk, d] (a CSA layer's largest
    tensor), q for their product and the picks' probabilities; HCA the bf16 probabilities and q again;
  * compressor: two fp32 copies of its input (bf16 compute), the pooled kv and gate weights [c*d] in fp32
    (c = 2 for CSA's overlap), the entries' norm; the indexer scores chunks of queries under no_grad and
    saves nothing;
  * MoE: the router's input [D], its fp32 logits and scores [E]; the routed copies [k, D], each routed
    expert's clamped SwiGLU (6 [I] tensors), the fp32 unsorted outputs [k, D]; the shared expert (6 [I]);
  * fp32_compute (bf16 steps): hc_mixing keeps the residual's tensors in fp32; router an fp32 copy of its
    input [D] (and of its weight, once per microbatch); experts 6 fp32 SwiGLU tensors and the bf16 output
    per routed row, its 2 weight columns, and no fp32 combine; attention_logits nothing (backward re-casts);
  * outside the blocks: the HyperHead (an mHC site without Sinkhorn), the final norm, lm_head's fp32 input
    [D] and the loss's fp32 log-probabilities [V]; per MTP depth (a checkpointable unit like a block, as
    ``parallelize_deepseek_v4`` wraps it): enorm, hnorm on every stream, the e_proj / h_proj inputs, a
    sliding block, its HyperHead and norm inside, its lm_head input and log-probabilities outside.
AC modes: "none" keeps every unit's terms; "full" keeps each unit's inputs (streams, embedding, token ids)
and recomputes one unit at a time in backward; "selective" N checkpoints every N-th unit (Titan's layer SAC)
and keeps the rest whole; selective "op" is approximated as the inputs plus half of each unit's matmul
outputs (Titan saves every other mm and recomputes the router's gate), one unit recomputed at a time;
"memory_budget" m as full + m x (none - full). The worst moment on top of what is kept: a unit recomputed
and differentiated (its terms, the streams' gradients and twice its largest tensor), or the loss: the one
lm_head call's fp32 logits of every head while the cross-entropies run (or their gradients in backward).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from torchtitan.tools.logging import logger

from titan_dsv4.model.accounting import MTP_PREFIX
from titan_dsv4.model.args import ConfigError, DeepSeekV4ModelArgs

GIB = 1024**3
# Kept free on every device: CUDA context, NCCL buffers and the caching allocator's fragmentation.
RESERVED_FRACTION = 0.10
# The dry run's device when [deepseek_v4] gpu_memory_gib is 0 (an 80 GB H100 / A100).
DRY_RUN_GPU_MEMORY_GIB = 80.0
GPUS_PER_NODE = 8
MAX_SEARCH_WORLD = 16384
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_DTYPE_NAMES = {4: "float32", 2: "bfloat16"}
_FP32 = 4


@dataclass(frozen=True)
class Layout:
    """How the ranks split the model: world = dp_replicate x dp_shard; EP borrows ep of the dp_shard ranks."""

    dp_replicate: int
    dp_shard: int
    ep: int = 1

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def efsdp(self) -> int:
        return self.dp_shard // self.ep

    @classmethod
    def of(cls, parallel_dims) -> Layout:
        return cls(parallel_dims.dp_replicate, parallel_dims.dp_shard, parallel_dims.ep)

    def describe(self) -> str:
        hsdp = f"dp_replicate {self.dp_replicate} x " if self.dp_replicate > 1 else ""
        return f"{self.world} ranks ({hsdp}dp_shard {self.dp_shard}, ep {self.ep})"

    def launch(self) -> str:
        """How to ask for this layout: the GPU count and the flags that differ from the defaults."""
        flags = [f"--parallelism.expert_parallel_degree {self.ep}"] if self.ep > 1 else []
        if self.dp_replicate > 1:
            flags.append(f"--parallelism.data_parallel_replicate_degree {self.dp_replicate}")
        return f"{self.world} GPUs" + (" with " + " ".join(flags) if flags else "")


@dataclass(frozen=True)
class Training:
    """The step's shape and precision: what activations and collectives scale with."""

    seq_len: int
    local_batch_size: int
    compute_dtype: str = "bfloat16"  # training.mixed_precision_param
    reduce_dtype: str = "float32"  # training.mixed_precision_reduce
    storage_dtype: str = "float32"  # training.dtype
    ac_mode: str = "full"
    selective_ac_option: str = "op"
    memory_budget: float = 0.5
    reshard_after_forward: bool = True
    microbatches: int = 1  # gradient accumulation steps
    cpu_offload: bool = False

    @property
    def tokens(self) -> int:
        return self.seq_len * self.local_batch_size

    @property
    def compute_bytes(self) -> int:
        return _DTYPE_BYTES[self.compute_dtype]

    @classmethod
    def of(cls, job_config, layout: Layout) -> Training:
        """The step the job config asks for (the layout sets the gradient accumulation steps)."""
        t, ac = job_config.training, job_config.activation_checkpoint
        per_step = t.local_batch_size * layout.world
        policy = job_config.parallelism.fsdp_reshard_after_forward
        return cls(
            seq_len=t.seq_len,
            local_batch_size=t.local_batch_size,
            compute_dtype=t.mixed_precision_param,
            reduce_dtype=t.mixed_precision_reduce,
            storage_dtype=getattr(t, "dtype", "float32"),
            ac_mode=ac.mode,
            selective_ac_option=str(ac.selective_ac_option),
            memory_budget=getattr(ac, "memory_budget", 0.5),
            reshard_after_forward=policy != "never",  # "default" reshards without pipeline parallelism
            microbatches=max(1, t.global_batch_size // per_step) if t.global_batch_size > 0 else 1,
            cpu_offload=t.enable_cpu_offload,
        )

    def describe(self) -> str:
        ac = self.ac_mode if self.ac_mode != "selective" else f"selective {self.selective_ac_option}"
        return (
            f"seq_len {self.seq_len} x local_batch_size {self.local_batch_size}, AC {ac}, "
            f"{self.compute_dtype} compute"
        )


# ---- FSDP units ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One FSDP unit as one rank holds it: its shard, what it all-gathers, and in which dtypes."""

    name: str
    local_numel: int  # this rank's shard, FSDP2's padding included
    storage_bytes: int  # per element: the sharded parameter, its gradient and AdamW state
    compute_bytes: int  # per element, all-gathered (param_dtype)
    reduce_bytes: int  # per element, reduce-scattered (reduce_dtype)
    shard_ranks: int
    replicate_ranks: int  # HSDP replicas whose gradients are all-reduced
    resharded: bool  # freed after forward and all-gathered again in backward

    @property
    def gathered_numel(self) -> int:
        """The all-gather buffer: the unit unsharded on this rank (an EP rank's experts only), padded."""
        return self.local_numel * self.shard_ranks

    @property
    def unsharded_bytes(self) -> int:
        return self.gathered_numel * self.compute_bytes


Shape = tuple[int, ...]


def block_unit_shapes(a: DeepSeekV4ModelArgs, ratio: int) -> dict[str, list[Shape]]:
    """One block's parameter shapes by FSDP unit: fp32 islands, fp32 holders, routed experts, the rest."""
    D, H, d, q, n = a.dim, a.n_heads, a.head_dim, a.q_lora_rank, a.hc_mult
    E, inter = a.moe_args.num_experts, a.moe_inter_dim
    mhc = [((2 + n) * n, n * D), ((2 + n) * n,), (3,)]  # fn, base, scale
    go = a.o_groups * a.o_lora_rank
    rest = [(D,), (D,), (q, D), (q,), (H * d, q), (d, D), (d,), (go, H * d // a.o_groups), (D, go)]
    rest += [(E, D), (inter, D), (D, inter), (inter, D)]  # router gate, shared expert
    island, holder = mhc + mhc, [(H,)]  # attn_hc and ffn_hc; sinks
    if ratio == a.hca_ratio:
        island += [(d, D), (d, D)]
        holder += [(ratio, d)]
        rest += [(d,)]
    elif ratio == a.csa_ratio:
        dI, nI = a.index_head_dim, a.index_n_heads
        island += [(2 * d, D), (2 * d, D), (2 * dI, D), (2 * dI, D)]  # compressor and indexer wkv / wgate
        holder += [(ratio, 2 * d), (ratio, 2 * dI)]
        rest += [(d,), (dI,), (nI * dI, q), (nI, D)]  # their norms, the indexer's wq_b and weights_proj
    experts = [(E, inter, D), (E, D, inter), (E, inter, D)]  # w1, w2, w3
    return {"island": island, "holder": holder, "experts": experts, "block": rest}


def mtp_unit_shapes(a: DeepSeekV4ModelArgs) -> dict[str, list[Shape]]:
    """One MTP depth by FSDP unit: a sliding block, enorm / hnorm / norm, e_proj / h_proj, its HyperHead."""
    D = a.dim
    units = block_unit_shapes(a, 0)
    units["island"] = units["island"] + _hyper_head_shapes(a)
    units["block"] = units["block"] + [(D,), (D,), (D,), (D, D), (D, D)]
    return units


def root_unit_shapes(a: DeepSeekV4ModelArgs) -> dict[str, list[Shape]]:
    """The root's units: hc_head and lm_head (fp32 islands), tok_embeddings and the final norm."""
    V, D = a.vocab_size, a.dim
    return {"island": _hyper_head_shapes(a) + [(V, D)], "block": [(V, D), (D,)]}


def _hyper_head_shapes(a: DeepSeekV4ModelArgs) -> list[Shape]:
    n = a.hc_mult
    return [(n, n * a.dim), (n,), (1,)]


def padded_shard(shape: Shape, ranks: int, dim: int = 0) -> int:
    """Elements of one parameter's shard as FSDP2 stores it: the sharded dim padded to a multiple of ranks."""
    size = list(shape)
    size[dim] = -(-size[dim] // ranks)
    return math.prod(size)


def analytic_units(
    a: DeepSeekV4ModelArgs, layout: Layout, training: Training, mtp_layers: int | None = None
) -> list[Unit]:
    """The FSDP units ``apply_fsdp`` builds for this layout, from the shapes alone (in its order)."""
    mtp_layers = a.mtp_layers if mtp_layers is None else mtp_layers
    c, r = training.compute_bytes, _DTYPE_BYTES[training.reduce_dtype]
    s = _DTYPE_BYTES[training.storage_dtype]
    islands = s == _FP32 and c != _FP32  # fp32 units are split off only when the blocks compute lower
    shard, replicate = (layout.dp_shard, layout.dp_replicate) if layout.dp_shard > 1 else (layout.world, 1)
    reshard = training.reshard_after_forward

    def unit(name: str, shapes: list[Shape], compute: int, reduce: int, resharded: bool) -> Unit:
        local = sum(padded_shard(shape, shard) for shape in shapes)
        return Unit(name, local, s, compute, reduce, shard, replicate, resharded)

    def expert_unit(name: str, shapes: list[Shape]) -> Unit:
        """EP slices the experts (dim 0) over ep; FSDP shards the slice over efsdp, on dim 1 when the
        ranks outnumber the experts (``apply_fsdp``)."""
        local_experts = [(e // layout.ep, *rest) for e, *rest in shapes]
        dim = 1 if layout.efsdp * layout.ep > a.moe_args.num_experts else 0
        local = sum(padded_shard(shape, layout.efsdp, dim) for shape in local_experts)
        return Unit(name, local, s, c, r, layout.efsdp, replicate, reshard)

    def block_units(prefix: str, parts: dict[str, list[Shape]]) -> list[Unit]:
        parts = {k: list(v) for k, v in parts.items()}
        units = []
        if layout.ep > 1:
            units.append(expert_unit(f"{prefix}.moe.experts", parts.pop("experts")))
        else:
            parts["block"] += parts.pop("experts")
        if not islands:
            parts["block"] += parts.pop("island", []) + parts.pop("holder", [])
        elif "island" in parts:
            units.append(unit(f"{prefix}.<fp32 islands>", parts["island"], _FP32, _FP32, reshard))
        if islands and "holder" in parts:
            units.append(unit(f"{prefix}.<fp32 holders>", parts["holder"], _FP32, _FP32, False))
        return units + [unit(prefix, parts["block"], c, r, reshard)]

    kinds: dict[int | str, list[Unit]] = {}  # one set of units per kind of block, renamed per layer

    def units_of(prefix: str, kind: int | str) -> list[Unit]:
        if kind not in kinds:
            kinds[kind] = block_units("", mtp_unit_shapes(a) if kind == "mtp" else block_unit_shapes(a, kind))
        return [replace(u, name=prefix + u.name) for u in kinds[kind]]

    units = []
    for i, ratio in enumerate(a.compress_ratios):
        units += units_of(f"layers.{i}", ratio)
    for i in range(mtp_layers):
        units += units_of(f"{MTP_PREFIX}{i}", "mtp")
    root = root_unit_shapes(a)
    if islands:  # hc_head and lm_head: one fp32 unit, resharded (FSDP2's default for a non-root unit)
        return units + [
            unit("<root fp32 islands>", root["island"], _FP32, _FP32, True),
            unit("<root>", root["block"], c, r, False),
        ]
    return units + [unit("<root>", root["island"] + root["block"], c, r, False)]


def built_units(model: nn.Module) -> list[Unit]:
    """The FSDP units ``fully_shard`` built on ``model`` (meta device is fine), as one rank holds them."""
    from torch.distributed.fsdp import FSDPModule

    from .fsdp_units import canonical_name

    units, seen = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        if group is None or id(group) in seen:
            continue
        seen.add(id(group))
        params = group.fsdp_params
        storage = params[0].sharded_param.dtype
        compute = group.mp_policy.param_dtype or storage
        info = params[0].mesh_info
        units.append(
            Unit(
                name=canonical_name(name) or "<root>",
                local_numel=sum(math.prod(p.padded_sharded_param_size) for p in params),
                storage_bytes=storage.itemsize,
                compute_bytes=compute.itemsize,
                reduce_bytes=(group.mp_policy.reduce_dtype or compute).itemsize,
                shard_ranks=getattr(info, "shard_mesh_size", 1),
                replicate_ranks=getattr(info, "replicate_mesh_size", 1),
                # FSDP2 never reshards the root after forward when left to choose (apply_fsdp passes None).
                resharded=module is not model and group.post_forward_mesh_info is not None,
            )
        )
    return units


def built_mtp_layers(model: nn.Module, a: DeepSeekV4ModelArgs) -> int:
    """The MTP depths the built model really has (none until the model builds its ``mtp`` module)."""
    has_mtp = any(name.startswith(MTP_PREFIX) for name, _ in model.named_parameters())
    return a.mtp_layers if has_mtp else 0


# ---- activations -----------------------------------------------------------------------------------------


def _norm_bytes(width: int) -> int:
    """RMSNorm keeps its fp32 input and normalised output (and a per-row statistic)."""
    return 2 * width * _FP32 + _FP32


def _mhc_site_bytes(a: DeepSeekV4ModelArgs, c: int) -> int:
    n, D, it = a.hc_mult, a.dim, a.hc_sinkhorn_iters
    cast = n * D * _FP32 if c != _FP32 else 0  # FSDP's fp32 copy of the streams (shared when already fp32)
    return cast + n * D * _FP32 + (2 + n) * n * _FP32 + ((2 * it + 1) * n * n + 2 * it * n) * _FP32


def compressed_entries(a: DeepSeekV4ModelArgs, ratio: int, seq_len: int) -> int:
    """Entries one query's softmax covers besides its window: CSA's picks, HCA's causal entries."""
    if ratio == a.csa_ratio:
        return min(a.index_topk, seq_len // ratio)
    return seq_len // ratio if ratio == a.hca_ratio else 0


def _attention_kernel_bytes(a: DeepSeekV4ModelArgs, ratio: int, seq_len: int, c: int) -> int:
    H, d, W = a.n_heads, a.head_dim, a.sliding_window
    e = compressed_entries(a, ratio, seq_len)
    b = H * (2 * W + e + 1) * _FP32  # softmax over [window | entries | sink], fp32
    b += (H * d * _FP32 if c != _FP32 else 0) + 3 * H * d * c  # q (fp32 for its norm), window blocks, output
    b += H * 2 * W * c + 2 * d * c + H * (8 + _FP32 + c)  # window probabilities and keys, the sink max
    if ratio == a.csa_ratio:
        b += e * d * c + H * d * c + H * e * c + e * 9  # gathered picks, q for them, pick probs, picks + mask
    elif ratio == a.hca_ratio:
        b += (H * (2 * W + e) * c if c != _FP32 else 0) + H * d * c  # probabilities kept whole, q for entries
    return b


def _compressor_bytes(a: DeepSeekV4ModelArgs, ratio: int, c: int) -> float:
    width = (2 if ratio == a.csa_ratio else 1) * a.head_dim
    cast = 2 * a.dim * _FP32 if c != _FP32 else 0  # wkv and wgate each get an fp32 copy of x
    return cast + 2 * width * _FP32 + 2 * a.head_dim * _FP32 / ratio


def block_activation_terms(a: DeepSeekV4ModelArgs, ratio: int, seq_len: int, c: int) -> dict[str, float]:
    """Bytes autograd saves per token in one block's forward without AC, by part (module docstring)."""
    D, n, k, inter, E = a.dim, a.hc_mult, a.moe_args.top_k, a.moe_inter_dim, a.moe_args.num_experts
    fp32_router, fp32_experts = (part in a.fp32_compute and c != _FP32 for part in ("router", "experts"))
    if fp32_experts:  # rows carry 2 weight columns; 6 fp32 SwiGLU tensors and the bf16 h; no fp32 combine
        routed = k * (D + 2) * c + k * inter * (6 * _FP32 + c) + k * (16 + _FP32)
    else:
        routed = k * D * c + 6 * k * inter * c + k * D * _FP32 + k * (16 + _FP32)
    return {
        "residual": 2 * (n * D + D + n * n + n) * (_FP32 if "hc_mixing" in a.fp32_compute else c),
        "mHC": 2 * _mhc_site_bytes(a, c),
        "norms": 2 * _norm_bytes(D) + _norm_bytes(a.q_lora_rank) + _norm_bytes(a.head_dim),
        "attention projections": (D + a.q_lora_rank + a.o_groups * a.o_lora_rank) * c,
        "attention kernel": _attention_kernel_bytes(a, ratio, seq_len, c),
        "compressor": _compressor_bytes(a, ratio, c) if ratio else 0,
        "router": D * c + (D * _FP32 if fp32_router else 0) + 2 * E * _FP32 + k * (8 + _FP32) + _FP32,
        "routed experts": routed,
        "shared expert": 6 * inter * c,
    }


def block_sequence_bytes(a: DeepSeekV4ModelArgs, seq_len: int, c: int) -> int:
    """Saved once per microbatch, not per row: the rotary cos/sin of three rotations, the window mask (and
    the router weight's fp32 copy when the router computes in fp32)."""
    router = a.moe_args.num_experts * a.dim * _FP32 if "router" in a.fp32_compute and c != _FP32 else 0
    return 6 * seq_len * a.rope_head_dim * c + seq_len * 2 * a.sliding_window + router


def head_activation_terms(a: DeepSeekV4ModelArgs, c: int) -> dict[str, float]:
    """Bytes saved per token after the last block: HyperHead, final norm, lm_head input, log-probabilities."""
    return {
        "HyperHead": _hyper_head_bytes(a, c),
        "final norm": _norm_bytes(a.dim),
        "lm_head input": a.dim * _FP32,
        "log-probabilities": a.vocab_size * _FP32,
        "token ids": 8,
    }


def _hyper_head_bytes(a: DeepSeekV4ModelArgs, c: int) -> int:
    n, D = a.hc_mult, a.dim
    return (n * D * _FP32 if c != _FP32 else 0) + n * D * _FP32 + 4 * n * _FP32


def mtp_depth_terms(a: DeepSeekV4ModelArgs, seq_len: int, c: int) -> dict[str, float]:
    """Bytes saved per token inside one MTP depth (what AC recomputes): input norms and projections, a
    sliding block, its HyperHead and norm. Its lm_head input and log-probabilities are saved outside."""
    D, n = a.dim, a.hc_mult
    return {
        "input norms": _norm_bytes(D) + n * _norm_bytes(D),  # enorm on the embedding, hnorm on each stream
        "e_proj and h_proj inputs": (D + n * D) * c,
        "block": sum(block_activation_terms(a, 0, seq_len, c).values()),
        "HyperHead and norm": _hyper_head_bytes(a, c) + _norm_bytes(D),
    }


def _matmul_output_bytes(a: DeepSeekV4ModelArgs, ratio: int, c: int) -> float:
    """Per token, the outputs of a block's aten.mm calls (what op-level SAC keeps every other one of)."""
    D, H, d, n, k, inter = a.dim, a.n_heads, a.head_dim, a.hc_mult, a.moe_args.top_k, a.moe_inter_dim
    b = (a.q_lora_rank + H * d + d + D) * c + (2 * inter + D) * (k + 1) * c + 2 * (2 + n) * n * _FP32
    if ratio:
        b += 2 * (2 if ratio == a.csa_ratio else 1) * d * _FP32
    return b


def _largest_tensor_bytes(a: DeepSeekV4ModelArgs, ratio: int, seq_len: int, c: int) -> int:
    """Per token, the largest single tensor a block saves (its gradient is as large)."""
    H, d, W, k = a.n_heads, a.head_dim, a.sliding_window, a.moe_args.top_k
    e = compressed_entries(a, ratio, seq_len)
    candidates = [H * (2 * W + e + 1) * _FP32, a.hc_mult * a.dim * _FP32, k * a.dim * _FP32]
    if ratio == a.csa_ratio:
        candidates.append(e * d * c)
    return max(candidates)


@dataclass(frozen=True)
class BlockActivations:
    """One checkpointable unit (a block or an MTP depth) of one microbatch, in bytes."""

    saved: int  # without AC
    kept: int  # its inputs, what a checkpointed unit keeps
    half_matmuls: float  # half its matmul outputs: what op-level SAC keeps besides the inputs
    backward: int  # gradients on top while it is differentiated: the streams' and twice its largest tensor


@dataclass(frozen=True)
class Activations:
    """One rank's activation bytes: kept from forward into backward, and on top at the worst moment."""

    saved: int
    transient: int
    blocks: tuple[BlockActivations, ...]  # the backbone's blocks, then the MTP depths
    outside: int  # saved outside any block: the heads and the loss

    @property
    def peak(self) -> int:
        return self.saved + self.transient


def running_mtp_layers(a: DeepSeekV4ModelArgs, mtp_layers: int | None = None) -> int:
    """MTP depths that run in training (a zero loss weight keeps them loaded but idle)."""
    depths = a.mtp_layers if mtp_layers is None else mtp_layers
    return depths if a.mtp_loss_weight > 0 else 0


def activation_estimate(
    a: DeepSeekV4ModelArgs, training: Training, mtp_layers: int | None = None
) -> Activations:
    """Activation memory of one microbatch under the AC mode (the model: see the module docstring)."""
    m = running_mtp_layers(a, mtp_layers)
    S, c, T = training.seq_len, training.compute_bytes, training.tokens
    n, D, f = a.hc_mult, a.dim, _FP32

    def block(terms: float, ratio: int, inputs: int, extra_mm: int = 0) -> BlockActivations:
        return BlockActivations(
            saved=int(T * terms + block_sequence_bytes(a, S, c)),
            kept=T * (inputs * c + 8),  # its streams (and embedding) and the token ids
            half_matmuls=T * (_matmul_output_bytes(a, ratio, c) + extra_mm) / 2,
            backward=T * (2 * n * D * c + 2 * _largest_tensor_bytes(a, ratio, S, c)),
        )

    blocks = [block(sum(block_activation_terms(a, r, S, c).values()), r, n * D) for r in a.compress_ratios]
    depth = sum(mtp_depth_terms(a, S, c).values())
    blocks += [block(depth, 0, (n + 1) * D, (n + 1) * D * c) for _ in range(m)]
    outside = int(T * (sum(head_activation_terms(a, c).values()) + m * (D + a.vocab_size) * f))
    body, recomputed = _blocks_under_ac(training, blocks)
    backward = [b.backward + (b.saved if i in recomputed else 0) for i, b in enumerate(blocks)]
    # One lm_head call yields every head's fp32 logits: forward holds them (plus a flattened copy) while the
    # losses run; backward holds their gradients and the gradient of the concatenated call.
    loss = 2 * (1 + m) * T * a.vocab_size * f
    return Activations(int(body) + outside, int(max(backward + [loss])), tuple(blocks), outside)


def _blocks_under_ac(training: Training, blocks: list[BlockActivations]) -> tuple[float, set[int]]:
    """(bytes the blocks keep into backward, the blocks recomputed in backward) for the AC mode."""
    mode, every = training.ac_mode, set(range(len(blocks)))
    none, full = sum(b.saved for b in blocks), sum(b.kept for b in blocks)
    if mode == "none":
        return none, set()
    if mode == "full":
        return full, every
    if mode == "memory_budget":
        return full + training.memory_budget * (none - full), every
    if mode == "selective" and training.selective_ac_option == "op":
        return full + sum(b.half_matmuls for b in blocks), every
    if mode == "selective":
        # Titan counts wrapped blocks across the backbone and the MTP depths and checkpoints every N-th.
        n = int(training.selective_ac_option)
        checkpointed = every if n <= 0 else {i for i in every if (i + 1) % n == 0}
        return sum(b.kept if i in checkpointed else b.saved for i, b in enumerate(blocks)), checkpointed
    raise ConfigError(
        f"activation_checkpoint.mode={mode!r} is unknown to the planner; use none, full, selective or "
        "memory_budget"
    )


# ---- the estimate ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """One rank's memory at the peak of a step and its traffic per step, by part (bytes)."""

    layout: Layout
    training: Training
    parameters: int
    gradients: int
    optimizer: int
    buffers: int
    kept_unsharded: int  # units not resharded after forward (the root, holders) stay gathered
    fsdp_forward: int  # kept + the largest unit and the prefetched next one
    fsdp_backward: int  # + the largest unit's unsharded gradient and reduce-scatter buffer
    largest_unit: str
    largest_unit_bytes: int
    activations: Activations
    all_gather: float
    reduce_scatter: float
    all_reduce: float
    all_to_all: float
    mtp_layers: int  # MTP depths included
    mtp_from_shapes: bool  # MTP units counted from shapes (the built model has none yet)

    @property
    def state(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.buffers

    @property
    def peak(self) -> int:
        return self.state + self.fsdp_backward + self.activations.peak

    @property
    def traffic(self) -> float:
        return self.all_gather + self.reduce_scatter + self.all_reduce + self.all_to_all

    def fits(self, device_bytes: int) -> bool:
        return self.peak <= usable_bytes(device_bytes)

    def figures(self) -> dict:
        """The estimate as JSON (GiB), what ``format_memory`` and ``format_traffic`` print."""
        gib = lambda b: round(b / GIB, 3)  # noqa: E731
        return {
            "layout": {**asdict(self.layout), "world": self.layout.world, "describe": self.layout.describe()},
            "training": {**asdict(self.training), "describe": self.training.describe()},
            "mtp_layers": self.mtp_layers,
            "mtp_from_shapes": self.mtp_from_shapes,
            "memory_gib": {
                "parameters": gib(self.parameters),
                "gradients": gib(self.gradients),
                "adamw_state": gib(self.optimizer),
                "buffers": gib(self.buffers),
                "largest_unit": gib(self.largest_unit_bytes),
                "largest_unit_name": self.largest_unit,
                "fsdp_kept_unsharded": gib(self.kept_unsharded),
                "fsdp_forward": gib(self.fsdp_forward),
                "fsdp_backward": gib(self.fsdp_backward),
                "activations_saved": gib(self.activations.saved),
                "activations_transient": gib(self.activations.transient),
                "peak": gib(self.peak),
            },
            "communication_gib_per_step": {
                "all_gather": gib(self.all_gather),
                "reduce_scatter": gib(self.reduce_scatter),
                "all_reduce": gib(self.all_reduce),
                "all_to_all": gib(self.all_to_all),
            },
        }


def usable_bytes(device_bytes: int) -> int:
    return int(device_bytes * (1 - RESERVED_FRACTION))


def estimate(
    a: DeepSeekV4ModelArgs,
    layout: Layout,
    training: Training,
    units: list[Unit] | None = None,
    mtp_layers: int | None = None,
    activations: Activations | None = None,
) -> Estimate:
    """One rank's peak memory and per-step traffic; ``units`` from ``built_units`` replace the analytic ones.

    Built units without MTP get the MTP depths' units from the shapes, so figures always include MTP.
    """
    mtp_layers = a.mtp_layers if mtp_layers is None else mtp_layers
    units, from_shapes = _with_mtp_units(a, layout, training, units, mtp_layers)
    acts = activations or activation_estimate(a, training, mtp_layers)
    local = 0 if training.cpu_offload else sum(u.local_numel * u.storage_bytes for u in units)
    largest = max(units, key=lambda u: u.unsharded_bytes)
    kept, forward, backward = _fsdp_unsharded(units) if layout.world > 1 else (0, 0, 0)
    ag, rs, ar = _fsdp_traffic(units, training)
    return Estimate(
        layout=layout,
        training=training,
        parameters=local,
        gradients=local,
        optimizer=2 * local,
        buffers=buffer_bytes(a, training.seq_len),
        kept_unsharded=kept,
        fsdp_forward=forward,
        fsdp_backward=backward,
        largest_unit=f"{largest.name}, {_DTYPE_NAMES.get(largest.compute_bytes, '?')}",
        largest_unit_bytes=largest.unsharded_bytes,
        activations=acts,
        all_gather=ag,
        reduce_scatter=rs,
        all_reduce=ar,
        all_to_all=all_to_all_bytes(a, layout, training, mtp_layers),
        mtp_layers=mtp_layers,
        mtp_from_shapes=from_shapes,
    )


def _with_mtp_units(
    a: DeepSeekV4ModelArgs, layout: Layout, training: Training, units: list[Unit] | None, mtp_layers: int
) -> tuple[list[Unit], bool]:
    """The units to count, MTP depths included; True when those came from the shapes, not the model."""
    if units is None:
        return analytic_units(a, layout, training, mtp_layers), False
    if not mtp_layers or any(u.name.startswith(MTP_PREFIX) for u in units):
        return units, False
    no_blocks = replace(a, compress_ratios=[], n_layers=0)
    mtp = [
        u for u in analytic_units(no_blocks, layout, training, mtp_layers) if u.name.startswith(MTP_PREFIX)
    ]
    return units + mtp, True


def _fsdp_unsharded(units: list[Unit]) -> tuple[int, int, int]:
    """(kept gathered, forward peak, backward peak) of FSDP's unsharded parameters and gradients on one rank.

    Units not resharded after forward stay gathered; on top, the largest resharded unit and the next one
    (prefetch); in backward also the largest unsharded gradient (compute dtype) and reduce-scatter buffer.
    """
    kept = sum(u.unsharded_bytes for u in units if not u.resharded)
    pair = 2 * max((u.unsharded_bytes for u in units if u.resharded), default=0)
    grad_and_buffer = max(u.gathered_numel * (u.compute_bytes + u.reduce_bytes) for u in units)
    return kept, kept + pair, kept + pair + grad_and_buffer


def _fsdp_traffic(units: list[Unit], training: Training) -> tuple[float, float, float]:
    """Per rank per step: bytes all-gathered, reduce-scattered, and all-reduced across HSDP replicas."""
    ag = rs = ar = 0.0
    for u in units:
        if u.shard_ranks * u.replicate_ranks == 1:
            continue
        others = u.local_numel * (u.shard_ranks - 1)  # padded shards from (or to) the other ranks
        ag += others * u.compute_bytes * (2 if u.resharded else 1)
        rs += others * u.reduce_bytes
        ar += u.local_numel * u.reduce_bytes * 2 * (u.replicate_ranks - 1) / u.replicate_ranks
    m = training.microbatches
    return ag * m, rs * m, ar * m


def all_to_all_bytes(a: DeepSeekV4ModelArgs, layout: Layout, training: Training, mtp_layers: int) -> float:
    """Per rank per step under EP: each MoE layer's dispatch and combine of top_k copies of every token.

    Uniform routing sends (ep-1)/ep of the copies off the rank; forward, backward, and again for the units
    AC recomputes (op-level SAC does not save all-to-all outputs).
    """
    if layout.ep <= 1:
        return 0.0
    copies = training.tokens * a.moe_args.top_k * a.dim * training.compute_bytes * (layout.ep - 1) / layout.ep
    units = len(a.compress_ratios) + running_mtp_layers(a, mtp_layers)
    recomputed = len(_blocks_under_ac(training, [BlockActivations(0, 0, 0, 0)] * units)[1])
    passes = 2 * units + recomputed  # forward and backward of every MoE layer, forward again if recomputed
    return 2 * copies * passes * training.microbatches


def buffer_bytes(a: DeepSeekV4ModelArgs, seq_len: int) -> int:
    """Buffers every rank holds whole: hash tables, expert bias and load counts, rotary tables."""
    E, layers = a.moe_args.num_experts, a.n_layers + a.mtp_layers
    hash_tables = a.n_hash_layers * a.vocab_size * a.moe_args.top_k * 8
    return hash_tables + layers * 2 * E * 4 + 4 * seq_len * a.rope_head_dim * 2


# ---- layouts that fit ------------------------------------------------------------------------------------


def candidate_layouts(a: DeepSeekV4ModelArgs, world: int, hsdp: bool = True) -> list[Layout]:
    """Every layout of ``world`` ranks that can be built: dp_replicate x dp_shard, EP dividing the experts and
    dp_shard, experts shardable by FSDP."""
    layouts = []
    for replicate in _divisors(world) if hsdp else [1]:
        shard = world // replicate
        layouts += [
            Layout(replicate, shard, ep) for ep in _divisors(shard) if a.moe_args.num_experts % ep == 0
        ]
    return [layout for layout in layouts if experts_shardable(a, layout)]


def experts_shardable(a: DeepSeekV4ModelArgs, layout: Layout) -> bool:
    """With more efsdp x ep ranks than experts, FSDP shards the experts on dim 1 (moe_inter_dim for w1/w3, dim
    for w2), which must then divide evenly over efsdp (``apply_fsdp``; FSDP2 refuses uneven dim-1 shards)."""
    if layout.ep <= 1 or layout.efsdp * layout.ep <= a.moe_args.num_experts:
        return True
    return a.moe_inter_dim % layout.efsdp == 0 and a.dim % layout.efsdp == 0


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def smallest_layouts(
    a: DeepSeekV4ModelArgs,
    training: Training,
    device_bytes: int,
    *,
    gpus_per_node: int = GPUS_PER_NODE,
    max_world: int = MAX_SEARCH_WORLD,
    hsdp: bool = True,
) -> list[Estimate]:
    """The layouts that fit at the smallest world size (multiples of ``gpus_per_node``), least traffic first.

    Empty when none up to ``max_world`` fits (activations do not shrink with more ranks: no CP or TP).
    """
    usable = usable_bytes(device_bytes)
    acts = activation_estimate(a, training)
    whole = analytic_units(a, Layout(1, 1), training)
    state = 0 if training.cpu_offload else 4 * sum(u.local_numel * u.storage_bytes for u in whole)
    floor = acts.peak + _fsdp_unsharded([u for u in whole if u.name.startswith("<root")])[2]
    for world in range(gpus_per_node, max_world + 1, gpus_per_node):
        if floor + state / world > usable:  # below what any layout of this size needs: the root units stay
            continue
        layouts = [x for x in candidate_layouts(a, world, hsdp) if floor + state / x.dp_shard <= usable]
        estimates = [estimate(a, layout, training, activations=acts) for layout in layouts]
        fitting = [e for e in estimates if e.fits(device_bytes)]
        if fitting:
            return sorted(fitting, key=lambda e: (e.traffic, e.peak))
    return []


def fits(a: DeepSeekV4ModelArgs, layout: Layout, training: Training, device_gib: float) -> bool:
    """Whether one rank of this layout fits a device of ``device_gib`` GiB (less the reserve)."""
    return estimate(a, layout, training).fits(int(device_gib * GIB))


def fitting_layout(a: DeepSeekV4ModelArgs, training: Training, device_bytes: int) -> str:
    """The smallest layout that fits, else the local batch that makes one fit, else why none can."""
    best = smallest_layouts(a, training, device_bytes)
    if best:
        return best[0].layout.launch() + f" (peak {best[0].peak / GIB:.1f} GiB per rank)"
    batch = training.local_batch_size
    while batch > 1:
        batch //= 2
        best = smallest_layouts(a, replace(training, local_batch_size=batch), device_bytes)
        if best:
            return (
                f"none at local_batch_size {training.local_batch_size}; with --training.local_batch_size "
                f"{batch}: {best[0].layout.launch()} (peak {best[0].peak / GIB:.1f} GiB per rank)"
            )
    acts = activation_estimate(a, replace(training, local_batch_size=1)).peak
    return (
        f"none, even at local_batch_size 1 on up to {MAX_SEARCH_WORLD} GPUs: activations alone need "
        f"{acts / GIB:.1f} GiB per rank at seq_len {training.seq_len} (no context or tensor parallelism "
        "shares them); use devices with more memory or a shorter --training.seq_len"
    )


# ---- the trainer's check ---------------------------------------------------------------------------------


def device_memory(job_config) -> tuple[int, str]:
    """Bytes one rank may use, and where that figure comes from (the message names it)."""
    gib = getattr(getattr(job_config, "deepseek_v4", None), "gpu_memory_gib", 0.0) or 0.0
    if gib > 0:
        return int(gib * GIB), f"--deepseek_v4.gpu_memory_gib {gib:g}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.total_memory, f"{props.name}"
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // ranks, f"no GPU: host RAM {ram / GIB:.1f} GiB / {ranks} local rank(s)"


def refuse_layout_that_cannot_fit(
    model_args: DeepSeekV4ModelArgs, parallel_dims, job_config, device_memory_bytes: int | None = None
) -> Estimate | None:
    """Refuse, before anything is allocated, a layout whose ranks cannot fit the device; name one that can.

    Checks real runs only (``comm.mode`` "default"): dry runs and simulated modes allocate nothing.
    Returns the estimate when the layout fits.
    """
    if getattr(getattr(job_config, "comm", None), "mode", "default") != "default":
        return None
    if device_memory_bytes is None:
        device_bytes, source = device_memory(job_config)
    else:
        device_bytes, source = device_memory_bytes, "as given"
    layout = Layout.of(parallel_dims)
    training = Training.of(job_config, layout)
    found = estimate(model_args, layout, training)
    if found.fits(device_bytes):
        logger.info(
            f"Memory plan: one rank peaks at about {found.peak / GIB:.1f} GiB of {device_bytes / GIB:.1f} "
            f"GiB ({source}); {layout.describe()}, {training.describe()}"
        )
        return found
    raise ConfigError(_refusal(model_args, job_config.model.flavor, found, device_bytes, source))


def _refusal(a: DeepSeekV4ModelArgs, flavor: str, found: Estimate, device_bytes: int, source: str) -> str:
    """The figures against the device, a layout that fits, and how to check one without allocating."""
    gib = device_bytes / GIB
    lines = [
        f"DeepSeek-V4 '{flavor}' cannot fit this layout: one rank needs {found.peak / GIB:,.1f} GiB at its "
        f"peak, the device has {gib:,.1f} GiB ({source}; {usable_bytes(device_bytes) / GIB:,.1f} GiB usable "
        f"after a {RESERVED_FRACTION:.0%} reserve).",
        format_memory(found.figures(), device_bytes),
        f"  A layout that fits {gib:,.1f} GiB: {fitting_layout(a, found.training, device_bytes)}.",
        "  Check a layout without allocating: COMM_MODE=fake_backend NGPU=<GPUs> ./run_train.sh --model "
        "deepseek_v4 --config <toml> [--parallelism.expert_parallel_degree <ep>] "
        f"--deepseek_v4.gpu_memory_gib {gib:.0f}",
        "  If the device memory is misread, set --deepseek_v4.gpu_memory_gib (GiB per rank).",
    ]
    if "no GPU" in source:
        lines.append("  Without a GPU, train the debug model: train_configs/debug_model.toml.")
    return "\n".join(lines)


# ---- tables ----------------------------------------------------------------------------------------------


def _rows(rows: list[tuple[str, float, str]]) -> list[str]:
    return [f"    {label:<38s}{value:10.2f}" + (f"  {note}" if note else "") for label, value, note in rows]


def format_memory(figures: dict, device_bytes: int | None = None, device_note: str = "") -> str:
    """Per-rank memory by part and the peak (``Estimate.figures()``); the verdict for ``device_bytes``."""
    m, t = figures["memory_gib"], figures["training"]
    mtp = f"; {figures['mtp_layers']} MTP depth" if figures["mtp_layers"] else ""
    mtp += " (from shapes: not in the built model)" if figures["mtp_from_shapes"] else ""
    storage = t["storage_dtype"]
    lines = [f"  per-rank memory, GiB ({figures['layout']['describe']}; {t['describe']}{mtp}):"]
    lines += _rows(
        [
            (f"parameters ({storage} shards)", m["parameters"], ""),
            (f"gradients ({storage} shards)", m["gradients"], ""),
            (f"AdamW state (2 x {storage})", m["adamw_state"], ""),
            ("buffers", m["buffers"], "hash tables, rotary tables, expert loads"),
            ("largest unsharded unit", m["largest_unit"], m["largest_unit_name"]),
            ("FSDP unsharded, forward", m["fsdp_forward"], "kept units + largest unit + prefetch"),
            ("FSDP unsharded, backward", m["fsdp_backward"], "+ its gradient and reduce-scatter buffer"),
            ("activations kept for backward", m["activations_saved"], ""),
            ("activations on top, worst moment", m["activations_transient"], ""),
            ("peak", m["peak"], ""),
        ]
    )
    if device_bytes is not None:
        verdict = "fits" if m["peak"] * GIB <= usable_bytes(device_bytes) else "does NOT fit"
        usable = usable_bytes(device_bytes) / GIB
        lines += _rows([("device", device_bytes / GIB, f"{verdict} ({usable:.2f} usable{device_note})")])
    return "\n".join(lines)


def format_traffic(figures: dict) -> str:
    """Per-rank communication per step by collective (``Estimate.figures()``)."""
    c, reduce = figures["communication_gib_per_step"], figures["training"]["reduce_dtype"]
    rows = [
        ("all-gather (forward + backward)", c["all_gather"], ""),
        (f"reduce-scatter ({reduce})", c["reduce_scatter"], ""),
        ("all-reduce (HSDP replicas)", c["all_reduce"], ""),
        ("all-to-all (EP dispatch + combine)", c["all_to_all"], "forward, backward, AC recompute"),
    ]
    return "\n".join(["  per-rank communication per step, GiB:"] + _rows(rows))
