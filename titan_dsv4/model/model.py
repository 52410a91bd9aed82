"""DeepSeek-V4 in TorchTitan's model protocol: ``forward(tokens) -> logits [B, S, vocab]``."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torchtitan.protocols.model import ModelProtocol

from .args import HCA, DeepSeekV4ModelArgs
from .attention import Attention, Compressor
from .hyper_connection import HyperConnection, HyperHead, hyper_residual
from .layers import RMSNorm, RotaryTables
from .moe import DeepSeekV4MoE


class TransformerBlock(nn.Module):
    """Attention and MoE sites, each entered and left through its own mHC over the n residual streams."""

    def __init__(self, args: DeepSeekV4ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attn_hc = HyperConnection(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer_id)
        self.ffn_hc = HyperConnection(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.moe = DeepSeekV4MoE(args, layer_id)
        self.residual = hyper_residual  # plain function; compile wraps it per block
        self.moe_enabled = True  # every V4 layer is MoE; Titan's AC / compile / EP helpers read this
        self.init_std = args.init_std
        self.weight_init_std = args.init_std / (2 * (layer_id + 1)) ** 0.5  # output projections, depth-scaled

    def forward(
        self,
        streams: torch.Tensor,
        rope: RotaryTables,
        tokens: torch.Tensor,
        hca_synthetic_window: bool = False,
    ) -> torch.Tensor:
        # The mHC may run as an fp32 FSDP unit: its block input comes back in fp32 and is cast to the
        # streams' (compute) dtype here, as transformers casts the collapsed input to the stream dtype.
        post, comb, x = self.attn_hc(streams)
        a = self.self_attn(self.attention_norm(x.to(streams.dtype)), rope, hca_synthetic_window)
        streams = self.residual(streams, a, post, comb)
        post, comb, x = self.ffn_hc(streams)
        f = self.moe(self.ffn_norm(x.to(streams.dtype)), tokens)
        return self.residual(streams, f, post, comb)

    def init_weights(self, buffer_device: torch.device | None) -> None:
        for hc in (self.attn_hc, self.ffn_hc):
            hc.init_weights(self.init_std)
        for norm in (self.attention_norm, self.ffn_norm):
            norm.reset_parameters()
        self.self_attn.init_weights(self.init_std, self.weight_init_std)
        self.moe.init_weights(self.weight_init_std, buffer_device)


class DeepSeekV4Model(ModelProtocol):
    """Embedding -> n identical streams -> blocks -> HyperHead -> norm -> untied lm_head."""

    def __init__(self, model_args: DeepSeekV4ModelArgs):
        super().__init__(model_args)
        model_args.validate()
        self.model_args = model_args
        self.hc_mult = model_args.hc_mult
        self.vocab_size = model_args.vocab_size
        self.tok_embeddings = nn.Embedding(model_args.vocab_size, model_args.dim)
        self.rope = RotaryTables(model_args)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(model_args, i) for i in range(model_args.n_layers)}
        )
        self.hc_head = HyperHead(model_args)
        self.norm = RMSNorm(model_args.dim, model_args.norm_eps)
        self.lm_head = nn.Linear(model_args.dim, model_args.vocab_size, bias=False)
        # Plain list (not registered): found once here, not by walking every module each forward.
        # fully_shard swaps classes in place and compile wraps other modules, so these stay valid.
        self._hca_compressors = [m for m in self.modules() if isinstance(m, Compressor) and m.kind == HCA]

    def forward(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        check_token_ids(tokens, self.vocab_size)
        synthetic = self.hca_needs_synthetic_window(tokens)
        h = self.tok_embeddings(tokens)
        streams = h.unsqueeze(2).expand(-1, -1, self.hc_mult, -1).contiguous()
        for layer in self.layers.values():
            streams = layer(streams, self.rope, tokens, synthetic)
        h = self.norm(self.hc_head(streams).to(streams.dtype))
        return self.lm_head(h)

    def hca_compressors(self) -> list[nn.Module]:
        return list(self._hca_compressors)

    def hca_needs_synthetic_window(self, tokens: torch.Tensor) -> bool:
        """HCA graph alignment, agreed once per forward for the whole model.

        Ranks that synchronise the HCA compressors' sharded parameters must agree whether that path
        joins backward. In training with a bound group this costs exactly one all-reduce (MAX of one
        integer) per forward, whatever the number of HCA layers (all see the same local length):
        a rank with 0 < S < ratio whose peers have a complete window pools a masked synthetic one.
        """
        compressors = self.hca_compressors() if self.training else []
        group = compressors[0].hca_param_sync_group if compressors else None
        if group is None:
            return False
        seq_len, ratio = tokens.shape[-1], compressors[0].ratio
        if seq_len == 0:
            raise ValueError("a zero-length local sequence cannot train; every rank needs at least one token")
        flag = torch.tensor([int(seq_len >= ratio)], dtype=torch.int32, device=tokens.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item()) and seq_len < ratio

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        self.rope.reset(buffer_device or self.tok_embeddings.weight.device)
        nn.init.normal_(self.tok_embeddings.weight)
        for layer in self.layers.values():
            layer.init_weights(buffer_device)
        self.hc_head.init_weights(self.model_args.init_std)
        self.norm.reset_parameters()
        final_out_std = self.model_args.dim**-0.5
        nn.init.trunc_normal_(
            self.lm_head.weight, mean=0.0, std=final_out_std, a=-3 * final_out_std, b=3 * final_out_std
        )


def check_token_ids(tokens: torch.Tensor, vocab_size: int) -> None:
    """Out-of-vocabulary ids would index past the embedding (a device assert on GPU): fail clearly."""
    if tokens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}); got min {int(tokens.min())}, max {int(tokens.max())}. "
            "The tokenizer does not match the model: pick a flavor whose vocab_size covers it."
        )
