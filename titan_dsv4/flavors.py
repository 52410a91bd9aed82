"""Model flavors: a CPU-sized debug model and the published DeepSeek-V4-Flash and -Pro shapes."""

from __future__ import annotations

from .model.args import DeepSeekV4ModelArgs, RopeTable, v4_moe_args
from .model.hf_config import args_from_hf_config

# ``--model.flavor hf:DIR``: the model a checkpoint folder's config.json describes.
CHECKPOINT_FLAVOR_PREFIX = "hf:"


def _released_compress_rope() -> RopeTable:
    """The released checkpoints' compress table: YaRN (factor 16 over 65536 positions) on theta 160000."""
    return RopeTable(
        "yarn", 160000.0, factor=16.0, original_max_position_embeddings=65536, beta_fast=32, beta_slow=1
    )


def _released_schedule(n_layers: int, first_two: int) -> list[int]:
    """Layers 0-1 get ``first_two``; then CSA (4) on even and HCA (128) on odd layers."""
    return [first_two, first_two] + [4 if i % 2 == 0 else 128 for i in range(2, n_layers)]


class UnknownFlavorError(KeyError):
    """``--model.flavor`` names no DeepSeek-V4 flavor."""

    def __str__(self) -> str:
        return str(self.args[0])


class Flavors(dict):
    """Flavor name -> args; an unknown name lists the known ones instead of a bare KeyError."""

    def __missing__(self, key: str) -> DeepSeekV4ModelArgs:
        if key.startswith(CHECKPOINT_FLAVOR_PREFIX):  # the shapes a checkpoint's config.json describes
            return args_from_hf_config(key[len(CHECKPOINT_FLAVOR_PREFIX) :])
        raise UnknownFlavorError(
            f"unknown DeepSeek-V4 flavor {key!r}; known flavors: {', '.join(sorted(self))}. "
            f"Set --model.flavor to one of them (e.g. --model.flavor debugmodel), or to "
            f"hf:/path/to/checkpoint "
            f"for the shapes a checkpoint's config.json describes."
        )


deepseek_v4_args: dict[str, DeepSeekV4ModelArgs] = Flavors(
    {
        # Tiny: one sliding, one HCA and two CSA layers; two hash-routed and two learned-router MoE layers.
        "debugmodel": DeepSeekV4ModelArgs(
            vocab_size=2048,
            dim=256,
            n_layers=4,
            n_heads=4,
            head_dim=128,
            rope_head_dim=64,
            q_lora_rank=128,
            o_groups=2,
            o_lora_rank=64,
            sliding_window=64,
            compress_ratios=[0, 4, 128, 4],
            index_n_heads=4,
            index_head_dim=64,
            index_topk=16,
            hc_mult=4,
            n_hash_layers=2,
            moe_inter_dim=128,
            moe_args=v4_moe_args(num_experts=8, top_k=2, route_scale=1.5),
            compress_rope=_released_compress_rope(),
            mtp_layers=0,
            max_seq_len=512,
        ),
        "flash": DeepSeekV4ModelArgs(
            vocab_size=129280,
            dim=4096,
            n_layers=43,
            n_heads=64,
            head_dim=512,
            rope_head_dim=64,
            q_lora_rank=1024,
            o_groups=8,
            o_lora_rank=1024,
            compress_ratios=_released_schedule(43, first_two=0),
            index_n_heads=64,
            index_head_dim=128,
            index_topk=512,
            n_hash_layers=3,
            moe_inter_dim=2048,
            moe_args=v4_moe_args(num_experts=256, top_k=6, route_scale=1.5),
            compress_rope=_released_compress_rope(),
            mtp_layers=1,
        ),
        "pro": DeepSeekV4ModelArgs(
            vocab_size=129280,
            dim=7168,
            n_layers=61,
            n_heads=128,
            head_dim=512,
            rope_head_dim=64,
            q_lora_rank=1536,
            o_groups=16,
            o_lora_rank=1024,
            compress_ratios=_released_schedule(61, first_two=128),
            index_n_heads=64,
            index_head_dim=128,
            index_topk=1024,
            n_hash_layers=3,
            moe_inter_dim=3072,
            moe_args=v4_moe_args(num_experts=384, top_k=6, route_scale=2.5),
            compress_rope=_released_compress_rope(),
            mtp_layers=1,
        ),
    }
)
