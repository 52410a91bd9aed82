"""DeepSeek-V4 in TorchTitan's model protocol: ``forward(tokens) -> (logits, TrainingOutputs)``.

One return type in training and evaluation; the train spec's loss (``infra/loss.py``) adds the terms the
``TrainingOutputs`` carry (multi-token prediction, indexer distillation). Like TorchTitan's deepseek_v3,
the model knows no parallelism it is not handed: parallelize and the pipeline split apply it from outside
(a pipeline stage, ``infra/pipeline_stage.py``, composes ``embed``, ``run_layers`` and ``heads``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchtitan.protocols.model import ModelProtocol

from .args import CSA, HASH_MOE, HCA, SLIDING, DeepSeekV4ModelArgs
from .attention import Attention, Compressor
from .context import INDEXER_STATS, ForwardContext
from .documents import Documents
from .hyper_connection import HyperConnection, HyperHead, hyper_residual
from .layers import RMSNorm, RotaryTables
from .moe import DeepSeekV4MoE
from .outputs import StepMetrics, TrainingOutputs, mtp_targets_in_document, shifted
from .sequence_shard import SequenceShard


class TransformerBlock(nn.Module):
    """Attention and MoE sites, each entered and left through its own mHC over the n residual streams."""

    def __init__(self, args: DeepSeekV4ModelArgs, layer_id: int, attn_kind: str, hash_routed: bool):
        super().__init__()
        self.layer_id = layer_id
        self.attn_hc = HyperConnection(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, attn_kind)
        self.ffn_hc = HyperConnection(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.moe = DeepSeekV4MoE(args, hash_routed)
        self.residual = hyper_residual  # plain function; compile wraps it per block
        self.fp32_mixing = "hc_mixing" in args.fp32_compute
        self.moe_enabled = True  # every V4 layer is MoE; Titan's AC / compile / EP helpers read this
        self.init_std = args.init_std
        self.weight_init_std = args.init_std / (2 * (layer_id + 1)) ** 0.5  # output projections, depth-scaled

    def forward(self, streams: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(streams out, the attention's indexer statistics or None)."""
        # The mHC may run as an fp32 FSDP unit: its block input comes back in fp32 and is cast to the
        # streams' (compute) dtype here, as transformers casts the collapsed input to the stream dtype.
        post, comb, x = self.attn_hc(streams)
        a, stats = self.self_attn(self.attention_norm(x.to(streams.dtype)), ctx)
        streams = self.residual(streams, a, post, comb, self.fp32_mixing)
        post, comb, x = self.ffn_hc(streams)
        f = self.moe(self.ffn_norm(x.to(streams.dtype)), ctx.tokens)
        return self.residual(streams, f, post, comb, self.fp32_mixing), stats

    def init_weights(self, buffer_device: torch.device | None) -> None:
        for hc in (self.attn_hc, self.ffn_hc):
            hc.init_weights(self.init_std)
        for norm in (self.attention_norm, self.ffn_norm):
            norm.reset_parameters()
        self.self_attn.init_weights(self.init_std, self.weight_init_std)
        self.moe.init_weights(self.weight_init_std, buffer_device)


class MTPDepth(nn.Module):
    """One multi-token-prediction depth (the released checkpoints' ``mtp.k``; spec section 6).

    From the previous streams (the backbone's, or depth k-1's, before any HyperHead) and the embedding
    of the tokens k positions ahead: X = e_proj(enorm(e)) broadcast over the streams + h_proj(hnorm(X_prev))
    per stream, one V4 block (sliding attention with the main rope, learned-router MoE, its own mHC),
    then its own HyperHead and norm. The model's lm_head turns the result into logits.
    """

    def __init__(self, args: DeepSeekV4ModelArgs, depth: int):
        super().__init__()
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.e_proj = nn.Linear(args.dim, args.dim, bias=False)
        self.h_proj = nn.Linear(args.dim, args.dim, bias=False)
        self.block = TransformerBlock(args, args.n_layers + depth, SLIDING, hash_routed=False)
        self.hc_head = HyperHead(args)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.init_std = args.init_std
        self.moe_enabled = True  # a block for Titan's AC / compile / EP helpers

    def forward(
        self, streams: torch.Tensor, ahead: torch.Tensor, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this depth's streams, its hidden state [B, S, D] for the lm_head)."""
        x = self.e_proj(self.enorm(ahead)).unsqueeze(2) + self.h_proj(self.hnorm(streams))
        streams, _ = self.block(x.to(streams.dtype), ctx)
        return streams, self.norm(self.hc_head(streams).to(streams.dtype))

    def init_weights(self, buffer_device: torch.device | None) -> None:
        for norm in (self.enorm, self.hnorm, self.norm):
            norm.reset_parameters()
        for proj in (self.e_proj, self.h_proj):
            nn.init.trunc_normal_(proj.weight, mean=0.0, std=self.init_std)
        self.block.init_weights(buffer_device)
        self.hc_head.init_weights(self.init_std)


class MTP(nn.Module):
    """The multi-token-prediction depths; ``layers`` so Titan's AC wraps each depth as it wraps a block."""

    def __init__(self, args: DeepSeekV4ModelArgs):
        super().__init__()
        self.layers = nn.ModuleDict({str(k): MTPDepth(args, k) for k in range(args.mtp_layers)})
        # mtp_loss_weight 0: kept (loaded, exported) but neither run nor trained
        self.trains = args.mtp_loss_weight > 0
        self.requires_grad_(self.trains)


class DeepSeekV4Model(ModelProtocol):
    """Embedding -> n identical streams -> blocks -> HyperHead -> norm -> untied lm_head (+ MTP depths)."""

    def __init__(self, model_args: DeepSeekV4ModelArgs):
        super().__init__(model_args)
        model_args.validate()
        self.model_args = model_args
        self.hc_mult = model_args.hc_mult
        self.vocab_size = model_args.vocab_size
        self.tok_embeddings = nn.Embedding(model_args.vocab_size, model_args.dim)
        self.rope = RotaryTables(model_args)
        self.layers = nn.ModuleDict(
            {
                str(i): TransformerBlock(
                    model_args, i, model_args.layer_type(i), model_args.mlp_type(i) == HASH_MOE
                )
                for i in range(model_args.n_layers)
            }
        )
        self.hc_head = HyperHead(model_args)
        self.norm = RMSNorm(model_args.dim, model_args.norm_eps)
        self.lm_head = nn.Linear(model_args.dim, model_args.vocab_size, bias=False)
        self.mtp = MTP(model_args) if model_args.mtp_layers else None
        self.find_hca_compressors()
        self.n_csa_layers = sum(model_args.layer_type(i) == CSA for i in range(model_args.n_layers))
        self.step_metrics = StepMetrics()
        self.training_clock = None  # bound by the train spec's LR-scheduler builder (infra/optimizer.py)
        self.training_step = 1  # the step when no clock is bound (a model driven by hand)
        # Context parallelism (bound by parallelize): the cp group and how many chunks a rank holds.
        self.cp_group = None
        self.cp_chunks_per_rank = 1

    def find_hca_compressors(self) -> None:
        """Note this part's HCA compressors (again after a pipeline split removed layers).

        A plain list (not registered): found once, not by walking every module each forward. fully_shard
        swaps classes in place and compile wraps other modules, so these stay valid.
        """
        self._hca_compressors = [m for m in self.modules() if isinstance(m, Compressor) and m.kind == HCA]

    def bind_training_clock(self, clock) -> None:
        """``clock.step``: the 1-based step the next training forward belongs to (the indexer's warm-up)."""
        self.training_clock = clock

    def set_context_parallel(self, group, chunks_per_rank: int) -> None:
        """Bind the ``cp`` mesh's group; forward then takes Titan's sharded inputs and their positions."""
        self.cp_group, self.cp_chunks_per_rank = group, chunks_per_rank

    def set_training_step(self, step: int) -> None:
        """Drive the step by hand (no clock bound)."""
        self.training_step = step

    def current_step(self) -> int:
        return self.training_step if self.training_clock is None else self.training_clock.step

    def blocks(self) -> list[nn.Module]:
        """Every transformer block (as wrapped by AC/compile), MTP depths' blocks included."""
        mtp = list(self.mtp.layers.values()) if self.mtp is not None else []
        return list(self.layers.values()) + [getattr(d, "_checkpoint_wrapped_module", d).block for d in mtp]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, **kwargs):
        """``(logits [B, S, vocab], TrainingOutputs)``, in training and in evaluation alike.

        One return type: Titan's trainer and validator hand it to the train spec's loss as they got it
        (``infra/loss.py`` adds the extra terms it carries; in evaluation it carries none). ``positions``:
        the tokens' global positions, which Titan passes under context parallelism; other keyword inputs
        Titan may pass (its attention masks: this model builds its own) are ignored.

        The forward knows no parallelism beyond the bound context-parallel group: a pipeline stage composes
        the same pieces (``embed``, ``context``, ``run_layers``, ``heads``) from outside
        (``infra/pipeline_stage.py``).
        """
        del kwargs
        streams = self.embed(tokens)
        ctx = self.context(tokens, positions)
        streams, stats = self.run_layers(streams, ctx)
        hidden, mtp_valid = self.heads(streams, ctx)
        if len(hidden) == 1:
            return self.lm_head(hidden[0]), self.training_outputs([], mtp_valid, stats, ctx)
        logits = self.lm_head(torch.cat(hidden, dim=1)).split(tokens.shape[1], dim=1)  # one call, all heads
        return logits[0], self.training_outputs(list(logits[1:]), mtp_valid, stats, ctx)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The token ids [B, S] -> the n identical mHC residual streams [B, S, hc_mult, D]."""
        check_token_ids(tokens, self.vocab_size)
        h = self.tok_embeddings(tokens)
        return h.unsqueeze(2).expand(-1, -1, self.hc_mult, -1).contiguous()

    def embed_ahead(self, tokens: torch.Tensor, k: int, shard: SequenceShard | None = None) -> torch.Tensor:
        """The embeddings of the tokens k positions ahead [B, S, D], MTP depth k's input."""
        return self.tok_embeddings(shifted(tokens, k) if shard is None else shard.ahead(k))

    def context(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> ForwardContext:
        """What every layer of one forward shares: the token ids, documents, sequence shard, indexer mode."""
        args = self.model_args
        shard = self.sequence_shard(tokens, positions)
        if shard is not None:
            docs = shard.local_docs()
        else:
            docs = (
                Documents.from_tokens(tokens, args.eos_id) if args.attn_mask_type == "block_causal" else None
            )
        learn_indexer = self.training and args.indexer_loss_weight > 0
        ctx = ForwardContext(
            self.rope,
            tokens,
            docs,
            indexer_dense=learn_indexer and self.current_step() <= args.indexer_warmup_steps,
            indexer_loss=learn_indexer,
            measure_indexer=self.training and (learn_indexer or args.log_indexer_recall),
            shard=shard,
        )
        ctx.hca_synthetic_window = self.hca_needs_synthetic_window(ctx)
        return ctx

    def run_layers(
        self, streams: torch.Tensor, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The blocks this model (part) holds: (streams out, their indexer statistics summed, or None)."""
        stats = None
        for layer in self.layers.values():
            streams, layer_stats = layer(streams, ctx)
            if layer_stats is not None:
                stats = layer_stats if stats is None else stats + layer_stats
        return streams, stats

    def heads(
        self, streams: torch.Tensor, ctx: ForwardContext, aheads: list[torch.Tensor] | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The hidden states [B, S, D] for the lm_head: the main head's, then (training with MTP) each
        depth's; and each depth's target validity (``TrainingOutputs.mtp_valid``).

        ``aheads``: the embeddings of the tokens 1, 2, ... ahead, where they were embedded elsewhere (a
        pipeline's first stage holds the embedding); by default this model embeds them.
        """
        hidden = [self.norm(self.hc_head(streams).to(streams.dtype))]
        mtp_valid = []
        if not (self.training and self.mtp is not None and self.mtp.trains):
            return hidden, mtp_valid
        tokens, shard = ctx.tokens, ctx.shard
        eos_id = self.model_args.eos_id if ctx.docs is not None else None
        for k, depth in enumerate(self.mtp.layers.values(), start=1):
            ahead = aheads[k - 1] if aheads else self.embed_ahead(tokens, k, shard)
            streams, h_k = depth(streams, ahead, ctx)
            hidden.append(h_k)
            if shard is None:
                mtp_valid.append(mtp_targets_in_document(tokens, k, eos_id))
            else:  # by the global tokens, at the local positions: [B, S_local]
                valid = F.pad(mtp_targets_in_document(shard.tokens, k, eos_id), (0, k), value=False)
                mtp_valid.append(shard.local(valid))
        return hidden, mtp_valid

    def training_outputs(
        self,
        mtp_logits: list[torch.Tensor],
        mtp_valid: list[torch.Tensor],
        stats: torch.Tensor | None,
        ctx: ForwardContext,
    ) -> TrainingOutputs:
        """What the loss needs beside the main logits (in evaluation: no MTP logits, no statistics)."""
        args = self.model_args
        return TrainingOutputs(
            mtp_logits=mtp_logits,
            mtp_valid=mtp_valid,
            mtp_loss_weight=args.mtp_loss_weight,
            indexer_stats=stats,
            indexer_loss_weight=args.indexer_loss_weight,
            n_csa_layers=self.n_csa_layers,
            metrics=self.step_metrics,
            indexer_warmup=ctx.indexer_dense,
            shard=ctx.shard,
        )

    def sequence_shard(self, tokens: torch.Tensor, positions: torch.Tensor | None) -> SequenceShard | None:
        """This rank's chunks of the global sequence under context parallelism, else None."""
        if self.cp_group is None:
            if positions is not None and not torch.equal(
                positions.reshape(-1, tokens.shape[1])[0].long(),
                torch.arange(tokens.shape[1], device=tokens.device),
            ):
                raise ValueError(
                    "positions other than 0..S-1 need a context-parallel group (parallelize_deepseek_v4 "
                    "binds it when parallelism.context_parallel_degree > 1)"
                )
            return None
        if positions is None:
            raise ValueError(
                "context parallelism is bound but forward got no positions: pass the global positions of the "
                "local tokens (Titan's prepare_context_parallel_input does)"
            )
        eos_id = self.model_args.eos_id if self.model_args.attn_mask_type == "block_causal" else None
        return SequenceShard(tokens, positions, self.cp_group, self.cp_chunks_per_rank, eos_id)

    def get_attention_masks(self, input_batch, tokenizer=None, extra_inputs=None) -> None:
        """No external masks: DeepSeek-V4 builds its masks inside attention, from the token ids when packed
        (Titan's validator asks every model for them)."""
        return None

    def hca_compressors(self) -> list[nn.Module]:
        return list(self._hca_compressors)

    def hca_needs_synthetic_window(self, ctx: ForwardContext) -> bool:
        """HCA graph alignment, agreed once per forward for the whole model.

        Ranks that synchronise the HCA compressors' sharded parameters must agree whether that path
        joins backward. In training with a bound group this costs exactly one all-reduce (MAX of one
        integer) per forward, whatever the number of HCA layers: a rank without a complete window
        (of any of its documents, when packed) whose peers have one pools a masked synthetic window.
        """
        compressors = self.hca_compressors() if self.training else []
        group = compressors[0].hca_param_sync_group if compressors else None
        if group is None or ctx.shard is not None:
            # Under context parallelism every rank pools all its slots (masked where no window completes),
            # so the HCA path joins backward on every rank of the group without a synthetic window.
            return False
        seq_len, ratio = ctx.tokens.shape[-1], compressors[0].ratio
        if seq_len == 0:
            raise ValueError("a zero-length local sequence cannot train; every rank needs at least one token")
        has_window = seq_len >= ratio if ctx.docs is None else ctx.windows(ratio).start.shape[1] > 0
        flag = torch.tensor([int(has_window)], dtype=torch.int32, device=ctx.tokens.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item()) and not has_window

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """Every module this part holds (a pipeline stage holds some of them)."""
        self.rope.reset(buffer_device or next(self.parameters()).device)
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight)
        for layer in self.layers.values():
            layer.init_weights(buffer_device)
        if self.lm_head is not None:
            self.hc_head.init_weights(self.model_args.init_std)
            self.norm.reset_parameters()
            final_out_std = self.model_args.dim**-0.5
            nn.init.trunc_normal_(
                self.lm_head.weight, mean=0.0, std=final_out_std, a=-3 * final_out_std, b=3 * final_out_std
            )
        if self.mtp is not None:
            for depth in self.mtp.layers.values():
                depth.init_weights(buffer_device)


def check_token_ids(tokens: torch.Tensor, vocab_size: int) -> None:
    """Out-of-vocabulary ids would index past the embedding: fail clearly, on host tensors.

    Reading a device tensor's range would stall the GPU every step; there the job check guards training
    (the tokenizer must fit the vocabulary, ``check_tokenizer_fits``) and torch's device assert the rest.
    """
    if tokens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
    if tokens.device.type != "cpu":
        return
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}); got min {int(tokens.min())}, max {int(tokens.max())}. "
            "The tokenizer does not match the model: pick a flavor whose vocab_size covers it."
        )


__all__ = [
    "DeepSeekV4Model",
    "INDEXER_STATS",
    "MTPDepth",
    "StepMetrics",
    "TrainingOutputs",
    "TransformerBlock",
]
