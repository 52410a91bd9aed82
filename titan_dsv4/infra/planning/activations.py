"""Activation memory of one microbatch on one rank: what autograd keeps for backward under the AC mode.

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
    softmax over 2W window logits, the layer's entries (HCA: S / hca_ratio) and the sink, per head; q (and
    its fp32 copy for the head norm), its window blocks and the output [H*d]; the window probabilities
    [H, 2W] and keys; CSA the window logits and the picks (its gather of index_topk entries per query is
    recomputed chunk by chunk in backward); HCA the bf16 probabilities and q again. ``attn_impl triton``
    keeps q, the output, the LSE [H], the key ranges and the picks;
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
and differentiated (its terms, the streams' gradients and twice its largest tensor; under ``block_causal`` the
documents' [S_local, S / ratio] visibility masks), or the loss: the one
lm_head call's fp32 logits of every head while the cross-entropies run (or their gradients in backward).
"""

from __future__ import annotations

from dataclasses import dataclass

from titan_dsv4.model.args import ConfigError, DeepSeekV4ModelArgs

from .layout import FP32, Training


def _norm_bytes(width: int) -> int:
    """RMSNorm keeps its fp32 input and normalised output (and a per-row statistic)."""
    return 2 * width * FP32 + FP32


def _mhc_site_bytes(a: DeepSeekV4ModelArgs, c: int) -> int:
    n, D, it = a.hc_mult, a.dim, a.hc_sinkhorn_iters
    cast = n * D * FP32 if c != FP32 else 0  # FSDP's fp32 copy of the streams (shared when already fp32)
    return cast + n * D * FP32 + (2 + n) * n * FP32 + ((2 * it + 1) * n * n + 2 * it * n) * FP32


def compressed_entries(a: DeepSeekV4ModelArgs, ratio: int, seq_len: int) -> int:
    """Entries one query's softmax covers besides its window: CSA's picks, HCA's causal entries."""
    if ratio == a.csa_ratio:
        return min(a.index_topk, seq_len // ratio)
    return seq_len // ratio if ratio == a.hca_ratio else 0


def _attention_kernel_bytes(a: DeepSeekV4ModelArgs, ratio: int, seq_len: int, c: int) -> int:
    H, d, W = a.n_heads, a.head_dim, a.sliding_window
    e = compressed_entries(a, ratio, seq_len)
    if a.attn_impl == "triton":  # q and the output, the LSE, the key ranges and picks (triton_attention.py)
        return (H * d * FP32 if c != FP32 else 0) + 2 * H * d * c + H * FP32 + 16 + (4 * e if e else 0)
    q_out = (H * d * FP32 if c != FP32 else 0) + 3 * H * d * c  # q (fp32 for its norm), window blocks, output
    if ratio == a.csa_ratio:  # the picks' gather is recomputed per query chunk in backward (kernels.py)
        b = H * 2 * W * FP32 + q_out  # the window logits each chunk's softmax joins
        return b + H * 2 * W * c + 2 * d * c + H * (8 + FP32 + c) + e * 9  # window probs, picks + mask
    b = H * (2 * W + e + 1) * FP32 + q_out  # softmax over [window | entries | sink], fp32
    b += H * 2 * W * c + 2 * d * c + H * (8 + FP32 + c)  # window probabilities and keys, the sink max
    if ratio == a.hca_ratio:
        b += (H * (2 * W + e) * c if c != FP32 else 0) + H * d * c  # probabilities kept whole, q for entries
    return b


def _compressor_bytes(a: DeepSeekV4ModelArgs, ratio: int, c: int) -> float:
    width = (2 if ratio == a.csa_ratio else 1) * a.head_dim
    cast = 2 * a.dim * FP32 if c != FP32 else 0  # wkv and wgate each get an fp32 copy of x
    return cast + 2 * width * FP32 + 2 * a.head_dim * FP32 / ratio


def block_activation_terms(a: DeepSeekV4ModelArgs, ratio: int, seq_len: int, c: int) -> dict[str, float]:
    """Bytes autograd saves per token in one block's forward without AC, by part (module docstring)."""
    D, n, k, inter, E = a.dim, a.hc_mult, a.moe_args.top_k, a.moe_inter_dim, a.moe_args.num_experts
    fp32_router, fp32_experts = (part in a.fp32_compute and c != FP32 for part in ("router", "experts"))
    if fp32_experts:  # rows carry 2 weight columns; 6 fp32 SwiGLU tensors and the bf16 h; no fp32 combine
        routed = k * (D + 2) * c + k * inter * (6 * FP32 + c) + k * (16 + FP32)
    else:
        routed = k * D * c + 6 * k * inter * c + k * D * FP32 + k * (16 + FP32)
    return {
        "residual": 2 * (n * D + D + n * n + n) * (FP32 if "hc_mixing" in a.fp32_compute else c),
        "mHC": 2 * _mhc_site_bytes(a, c),
        "norms": 2 * _norm_bytes(D) + _norm_bytes(a.q_lora_rank) + _norm_bytes(a.head_dim),
        "attention projections": (D + a.q_lora_rank + a.o_groups * a.o_lora_rank) * c,
        "attention kernel": _attention_kernel_bytes(a, ratio, seq_len, c),
        "compressor": _compressor_bytes(a, ratio, c) if ratio else 0,
        "router": D * c + (D * FP32 if fp32_router else 0) + 2 * E * FP32 + k * (8 + FP32) + FP32,
        "routed experts": routed,
        "shared expert": 6 * inter * c,
    }


def cp_exchange_saved(a: DeepSeekV4ModelArgs, ratio: int, training: Training) -> int:
    """Under CP, what one block saves of the exchanges (``model/sequence_shard.py``): the all-gathered
    entries of the whole sequence (CSA: also the indexer's keys) and the halo of the sliding window."""
    if training.cp <= 1:
        return 0
    B, S, c = training.local_batch_size, training.seq_len, training.compute_bytes
    return B * (gathered_entry_bytes(a, ratio, S, c) + cp_halo_bytes(a, ratio, training))


def gathered_entry_bytes(a: DeepSeekV4ModelArgs, ratio: int, seq_len: int, c: int) -> int:
    """A row's compressed entries over the whole sequence (CSA: with the indexer's keys), in bytes."""
    if not ratio:
        return 0
    width = a.head_dim + (a.index_head_dim if ratio == a.csa_ratio else 0)
    return (seq_len // ratio) * width * c


def cp_halo_bytes(a: DeepSeekV4ModelArgs, ratio: int, training: Training) -> int:
    """A row's halo on one rank: the previous chunk's last window of K=V rows for each of its chunks (and a
    compressor's previous window of kv and gate projections)."""
    width = (2 if ratio == a.csa_ratio else 1) * a.head_dim
    rows = a.sliding_window * a.head_dim + (2 * ratio * width if ratio else 0)
    return training.cp_chunks_per_rank * rows * training.compute_bytes


def block_sequence_bytes(a: DeepSeekV4ModelArgs, seq_len: int, c: int) -> int:
    """Saved once per microbatch, not per row: the rotary cos/sin of three rotations, the window mask (and
    the router weight's fp32 copy when the router computes in fp32)."""
    router = a.moe_args.num_experts * a.dim * FP32 if "router" in a.fp32_compute and c != FP32 else 0
    return 6 * seq_len * a.rope_head_dim * c + seq_len * 2 * a.sliding_window + router


def head_activation_terms(a: DeepSeekV4ModelArgs, c: int) -> dict[str, float]:
    """Bytes saved per token after the last block: HyperHead, final norm, lm_head input, log-probabilities."""
    return {
        "HyperHead": _hyper_head_bytes(a, c),
        "final norm": _norm_bytes(a.dim),
        "lm_head input": a.dim * FP32,
        "log-probabilities": a.vocab_size * FP32,
        "token ids": 8,
    }


def _hyper_head_bytes(a: DeepSeekV4ModelArgs, c: int) -> int:
    n, D = a.hc_mult, a.dim
    return (n * D * FP32 if c != FP32 else 0) + n * D * FP32 + 4 * n * FP32


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
    b = (a.q_lora_rank + H * d + d + D) * c + (2 * inter + D) * (k + 1) * c + 2 * (2 + n) * n * FP32
    if ratio:
        b += 2 * (2 if ratio == a.csa_ratio else 1) * d * FP32
    return b


def _largest_tensor_bytes(a: DeepSeekV4ModelArgs, ratio: int, seq_len: int, c: int) -> int:
    """Per token, the largest single tensor a block saves (its gradient is as large)."""
    H, d, W, k = a.n_heads, a.head_dim, a.sliding_window, a.moe_args.top_k
    e = compressed_entries(a, ratio, seq_len)
    candidates = [H * (2 * W + e + 1) * FP32, a.hc_mult * a.dim * FP32, k * a.dim * FP32]
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
    a: DeepSeekV4ModelArgs,
    training: Training,
    mtp_layers: int | None = None,
    modules: tuple[str, ...] | None = None,
) -> Activations:
    """Activation memory of one microbatch under the AC mode (the model: see the module docstring).

    ``modules``: a pipeline stage's module names; its blocks only, and the heads, MTP depths and loss on
    the stage that holds lm_head.
    """
    head = modules is None or "lm_head" in modules
    m = running_mtp_layers(a, mtp_layers) if head else 0
    # Under CP a rank holds T = tokens / cp; what a query sees (entries, picks) still spans the whole S.
    S, c, T = training.seq_len, training.compute_bytes, training.local_tokens
    n, D, f = a.hc_mult, a.dim, FP32

    def block(terms: float, ratio: int, inputs: int, extra_mm: int = 0) -> BlockActivations:
        return BlockActivations(
            saved=int(
                T * terms
                + block_sequence_bytes(a, S // training.cp, c)
                + cp_exchange_saved(a, ratio, training)
            ),
            kept=T * (inputs * c + 8),  # its streams (and embedding) and the token ids
            half_matmuls=T * (_matmul_output_bytes(a, ratio, c) + extra_mm) / 2,
            backward=T
            * (2 * n * D * c + 2 * _largest_tensor_bytes(a, ratio, S, c) + document_masks(a, ratio, S)),
        )

    ratios = [r for i, r in enumerate(a.compress_ratios) if modules is None or f"layers.{i}" in modules]
    blocks = [block(sum(block_activation_terms(a, r, S, c).values()), r, n * D) for r in ratios]
    depth = sum(mtp_depth_terms(a, S, c).values())
    blocks += [block(depth, 0, (n + 1) * D, (n + 1) * D * c) for _ in range(m)]
    outside = int(T * (sum(head_activation_terms(a, c).values()) + m * (D + a.vocab_size) * f)) if head else 0
    body, recomputed = _blocks_under_ac(training, blocks)
    backward = [b.backward + (b.saved if i in recomputed else 0) for i, b in enumerate(blocks)]
    # One lm_head call yields every head's fp32 logits: forward holds them (plus a flattened copy) while the
    # losses run; backward holds their gradients and the gradient of the concatenated call.
    loss = 2 * (1 + m) * T * a.vocab_size * f if head else 0
    return Activations(int(body) + outside, int(max(backward + [loss])), tuple(blocks), outside)


def document_masks(a: DeepSeekV4ModelArgs, ratio: int, seq_len: int) -> int:
    """Per token, packed documents' visibility of a compressed layer's entries (``block_causal``): a [S_local,
    S / ratio] mask and its negation while the layer runs (forward, recompute), never saved; 0 for causal
    rows, whose rule needs no mask (under CP: 1 GiB per mask at the long config's 4K x 256K CSA shard)."""
    if a.attn_mask_type != "block_causal" or not ratio:
        return 0
    return 2 * (seq_len // ratio)


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


def recomputed_units(training: Training, units: int) -> int:
    """How many of ``units`` checkpointable units the AC mode recomputes in backward."""
    return len(_blocks_under_ac(training, [BlockActivations(0, 0, 0, 0)] * units)[1])
