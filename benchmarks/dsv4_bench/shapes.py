"""Benchmark-only model shapes, derived from the shipped ``debugmodel`` flavor.

The package's flavor table is left as shipped; ``register_bench_flavors`` adds these names to it only
inside benchmark processes (the Trainer looks flavors up by name, so the launcher registers them).
"""

from __future__ import annotations

SEQ_LEN = 512  # as train_configs/debug_model.toml: 4 HCA windows, 128 CSA entries > index_topk
LOCAL_BATCH = 2
SIX_LAYER_SCHEDULE = [0, 4, 128, 4, 128, 4]  # sliding first, then CSA / HCA alternating (as released)
MID = "bench_mid"


def bench_shapes() -> dict:
    """name -> DeepSeekV4ModelArgs (fresh copies; flavors are shared singletons in Titan)."""
    from titan_dsv4.flavors import deepseek_v4_args

    debug = deepseek_v4_args["debugmodel"]
    return {
        "debugmodel": debug.replace(),
        # Mid-size (tens of millions of parameters) and matched to TorchTitan's deepseek_v3 debugmodel:
        # the same dim (256), layers (6), heads (16), experts (8) and moe_inter_dim (256); the low-rank
        # query / output widths are sized so that active parameters per token agree within a few
        # percent (checked in every run). Section a's mid-size run (and its step profile) and section e
        # both use this one shape, so their figures cross-check.
        MID: debug.replace(
            n_layers=6,
            n_heads=16,
            o_groups=4,
            q_lora_rank=1024,
            o_lora_rank=384,
            moe_inter_dim=256,
            compress_ratios=list(SIX_LAYER_SCHEDULE),
        ),
    }


def shape_args(name: str, seq_len: int = SEQ_LEN):
    """The args of one benchmark shape with the rotary tables sized for ``seq_len``."""
    return bench_shapes()[name].replace(max_seq_len=seq_len)


def register_bench_flavors() -> None:
    """Make the benchmark shapes selectable as ``--model.flavor <name>`` in this process."""
    from titan_dsv4.flavors import deepseek_v4_args

    for name, args in bench_shapes().items():
        if name not in deepseek_v4_args:
            deepseek_v4_args[name] = args


def param_counts(args) -> tuple[int, int]:
    """(total, active per token) of a shape, from a meta-device model via ``count_params``."""
    import torch

    from titan_dsv4.model import DeepSeekV4Model
    from titan_dsv4.model.accounting import count_params

    with torch.device("meta"):
        model = DeepSeekV4Model(args.replace())
    return count_params(args, model)
