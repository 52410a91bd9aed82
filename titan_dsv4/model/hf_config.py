"""transformers ``config.json`` <-> model args, read exactly as ``DeepseekV4Config`` reads it.

Rules (transformers 5.24's ``DeepseekV4Config.__post_init__`` and its RoPE standardisation):
  * a missing key takes the model-args default, which is transformers' default (``args.py``);
  * a value that changes numerics and that we do not implement is refused with the key and the
    value named, never replaced;
  * RoPE: a nested ``rope_parameters`` with ``main`` and ``compress`` tables is taken as is (missing
    ``rope_theta`` is the top-level ``rope_theta``; missing ``partial_rotary_factor`` is the top-level
    one if given, else 1.0). Otherwise the flat ``rope_scaling`` (or flat ``rope_parameters``) is the
    compress table, with ``compress_rope_theta``; the main table is plain RoPE with ``rope_theta``.
    A table without ``rope_type``/``type`` is plain RoPE: no YaRN is ever assumed. YaRN's attention
    factor must come out as 1 (given, or derived as transformers derives it).
"""

from __future__ import annotations

import json
import math
import os

from .args import (
    CSA,
    HASH_MOE,
    HCA,
    HF_MAX_POSITION_EMBEDDINGS,
    MOE,
    SCORE_FUNCS,
    SLIDING,
    ConfigError,
    DeepSeekV4ModelArgs,
    RopeTable,
    v4_moe_args,
)

# transformers maps legacy compress_ratios through this fixed table, then takes the rates from compress_rates.
_LEGACY_RATIO_TYPES = {0: SLIDING, 4: CSA, 128: HCA}
_ROPE_TABLES = ("main", "compress")


def load_hf_config(path: str | os.PathLike) -> dict:
    """A ``config.json`` (file, or a folder holding one) as a dict; a clear error when absent or
    unreadable."""
    path = os.path.join(path, "config.json") if os.path.isdir(path) else str(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path} does not exist; a Hugging Face DeepSeek-V4 folder carries a config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); copy it again") from None


def _refuse(key: str, value, why: str) -> ConfigError:
    return ConfigError(f"config.json {key}={value!r}: {why}")


def _layer_schedule(c: dict, n_layers: int) -> tuple[list[str], int, int]:
    """(layer types, CSA ratio, HCA ratio): explicit layer_types, else the legacy compress_ratios."""
    defaults = DeepSeekV4ModelArgs()
    rates = dict(c.get("compress_rates") or {CSA: defaults.csa_ratio, HCA: defaults.hca_ratio})
    for legacy, kind in (("compress_rate_csa", CSA), ("compress_rate_hca", HCA)):
        if c.get(legacy) is not None:
            rates[kind] = c[legacy]
    unknown_rates = sorted(set(rates) - {CSA, HCA})
    if unknown_rates:
        raise _refuse(
            "compress_rates", rates, f"unknown layer types {unknown_rates}; DeepSeek-V4 has {CSA} and {HCA}"
        )
    if c.get("layer_types") is not None:
        types = list(c["layer_types"])
        bad = [t for t in types if t not in (SLIDING, CSA, HCA)]
        if bad:
            raise _refuse("layer_types", bad, f"unknown entries; allowed: {SLIDING}, {CSA}, {HCA}")
    elif c.get("compress_ratios") is not None:
        bad = [r for r in c["compress_ratios"] if r not in _LEGACY_RATIO_TYPES]
        if bad:
            raise _refuse("compress_ratios", bad, "legacy ratios must be 0 (sliding), 4 (CSA) or 128 (HCA)")
        types = [_LEGACY_RATIO_TYPES[r] for r in c["compress_ratios"]]
    else:
        raise ConfigError(
            "config.json has neither layer_types nor compress_ratios; refusing to guess the attention "
            "schedule (transformers' default puts HCA/CSA on the opposite parity of the released models)"
        )
    types = types[:n_layers]  # the legacy list carries a trailing MTP entry
    if len(types) != n_layers:
        raise _refuse("layer_types", types, f"has {len(types)} entries for num_hidden_layers={n_layers}")
    return types, int(rates[CSA]), int(rates[HCA])


def _hash_layers(c: dict, n_layers: int) -> int:
    if c.get("mlp_layer_types") is not None:
        kinds = list(c["mlp_layer_types"])[:n_layers]
        n_hash = sum(1 for t in kinds if t == HASH_MOE)
        if kinds != [HASH_MOE] * n_hash + [MOE] * (len(kinds) - n_hash):
            raise _refuse(
                "mlp_layer_types", kinds, "only hash_moe layers followed by moe layers are implemented"
            )
        return n_hash
    n_hash = c.get("num_hash_layers")
    return (
        min(n_layers, int(n_hash))
        if n_hash is not None
        else min(n_layers, DeepSeekV4ModelArgs().n_hash_layers)
    )


def _rope_tables(c: dict, head_dim: int, partial: float) -> dict[str, dict]:
    """The two resolved tables ({"main": {...}, "compress": {...}}), as transformers resolves them."""
    defaults = DeepSeekV4ModelArgs()
    rope_theta = c.get("rope_theta", defaults.main_rope.theta)
    given_partial = c.get("partial_rotary_factor")
    rp = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if not isinstance(rp, dict):
        raise _refuse("rope_parameters", rp, "must be a dict")
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        tables = {}
        for name in _ROPE_TABLES:
            t = dict(rp[name])
            t.setdefault("rope_type", t.get("type", "default"))
            t.setdefault("rope_theta", rope_theta)
            if given_partial is not None:
                t.setdefault("partial_rotary_factor", given_partial)
            t.setdefault("partial_rotary_factor", 1.0)  # what transformers' rope functions fall back to
            tables[name] = t
    else:
        flat = {k: v for k, v in rp.items() if k not in _ROPE_TABLES}
        flat.setdefault("rope_type", flat.get("type", "default"))
        main = {"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": partial}
        compress = {
            **flat,
            "rope_theta": c.get("compress_rope_theta", defaults.compress_rope.theta),
            "partial_rotary_factor": partial,
        }
        if compress["rope_type"] == "yarn":
            compress.setdefault("attention_factor", 1.0)
        tables = {"main": main, "compress": compress}
    for t in tables.values():
        if t["rope_type"] == "yarn":
            t.setdefault(
                "original_max_position_embeddings",
                c.get("max_position_embeddings", HF_MAX_POSITION_EMBEDDINGS),
            )
    return tables


def _yarn_attention_factor(t: dict, factor: float) -> float:
    """transformers' YaRN attention factor: given, or derived from mscale / mscale_all_dim / factor."""
    if t.get("attention_factor") is not None:
        return float(t["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if t.get("mscale") and t.get("mscale_all_dim"):
        return mscale(factor, t["mscale"]) / mscale(factor, t["mscale_all_dim"])
    return mscale(factor)


def _table(name: str, t: dict, head_dim: int, max_positions: int) -> tuple[RopeTable, int]:
    """One resolved table as a RopeTable and its rotary dim; refuses what we do not implement."""
    key = f"rope_parameters.{name}"
    rope_type = t["rope_type"]
    if rope_type not in ("default", "yarn"):
        raise _refuse(f"{key}.rope_type", rope_type, "only 'default' and 'yarn' RoPE are implemented")
    dim = int(head_dim * float(t["partial_rotary_factor"]))
    if rope_type == "default":
        return RopeTable("default", float(t["rope_theta"])), dim
    if "factor" not in t:
        raise _refuse(f"{key}.factor", None, "a YaRN table needs a factor (transformers requires it too)")
    original = int(t["original_max_position_embeddings"])
    factor = float(t["factor"]) if t["factor"] is not None else max_positions / original
    if factor < 1:
        raise _refuse(
            f"{key}.factor", factor, "YaRN scales positions up; a factor below 1 is not implemented"
        )
    attention_factor = _yarn_attention_factor(t, factor)
    if attention_factor != 1.0:
        raise _refuse(
            f"{key}.attention_factor",
            attention_factor,
            "YaRN with an attention factor (mscale) other than 1 is not implemented; DeepSeek-V4 uses 1.0 "
            '(set "attention_factor": 1.0 if that is the model you mean)',
        )
    table = RopeTable(
        "yarn",
        float(t["rope_theta"]),
        factor,
        original,
        float(t.get("beta_fast") or RopeTable().beta_fast),
        float(t.get("beta_slow") or RopeTable().beta_slow),
    )
    return table, dim


def _refuse_unimplemented(c: dict) -> None:
    """Values transformers would honour and we do not implement: refused, key and value named."""
    checks = {
        "num_key_value_heads": (1, "DeepSeek-V4 has one shared K=V head"),
        "n_shared_experts": (1, "DeepSeek-V4 has exactly one shared expert"),
        "hidden_act": ("silu", "the experts' SwiGLU is implemented with SiLU only"),
        "mlp_bias": (False, "the experts and shared expert have no biases"),
        "tie_word_embeddings": (False, "lm_head and the embedding are separate tensors here"),
        "attention_dropout": (0.0, "attention dropout is not implemented"),
    }
    for key, (expected, why) in checks.items():
        value = c.get(key, expected)
        if key == "hidden_act" and value == "swish":
            continue  # transformers' "swish" is SiLU too
        if value != expected:
            raise _refuse(key, value, f"{why}; only {expected!r} is supported")
    d = DeepSeekV4ModelArgs()
    score = c.get("scoring_func", d.moe_args.score_func)
    if score not in SCORE_FUNCS:
        raise _refuse("scoring_func", score, f"implemented router scores are {SCORE_FUNCS}")
    iters = c.get("hc_sinkhorn_iters", d.hc_sinkhorn_iters)
    if not isinstance(iters, int) or iters < 1:
        raise _refuse("hc_sinkhorn_iters", iters, "Sinkhorn needs at least one (column) iteration")
    hc = c.get("hc_mult", d.hc_mult)
    if not isinstance(hc, int) or hc < 1:
        raise _refuse("hc_mult", hc, "the number of mHC streams must be a positive integer")


def _eos(c: dict, default: int) -> int:
    eos = c.get("eos_token_id", default)
    if isinstance(eos, list):
        if len(eos) != 1:
            raise _refuse("eos_token_id", eos, "one end-of-document id is needed (block_causal masking)")
        eos = eos[0]
    return default if eos is None else int(eos)


def args_from_hf_config(config: dict | str | os.PathLike) -> DeepSeekV4ModelArgs:
    """Model args from a transformers config.json (dict, file or folder), modern or legacy keys."""
    c = dict(config) if isinstance(config, dict) else load_hf_config(config)
    model_type = c.get("model_type")
    if model_type not in (None, "deepseek_v4"):
        raise ConfigError(
            f"config.json has model_type={model_type!r}; titan_dsv4 only loads 'deepseek_v4' checkpoints"
        )
    _refuse_unimplemented(c)
    d = DeepSeekV4ModelArgs()
    n_layers = int(c.get("num_hidden_layers", d.n_layers))
    types, csa, hca = _layer_schedule(c, n_layers)
    head_dim = int(c.get("head_dim", d.head_dim))
    if c.get("partial_rotary_factor") is not None:
        partial = float(c["partial_rotary_factor"])
    elif c.get("qk_rope_head_dim") is not None:
        partial = int(c["qk_rope_head_dim"]) / head_dim
    else:
        partial = d.rope_head_dim / d.head_dim
    max_positions = int(c.get("max_position_embeddings", HF_MAX_POSITION_EMBEDDINGS))
    resolved = _rope_tables(c, head_dim, partial)
    (main, main_dim), (compress, compress_dim) = (
        _table(name, resolved[name], head_dim, max_positions) for name in _ROPE_TABLES
    )
    if main_dim != compress_dim:
        raise _refuse(
            "rope_parameters",
            {n: resolved[n]["partial_rotary_factor"] for n in _ROPE_TABLES},
            f"the main and compress tables rotate {main_dim} and {compress_dim} channels; tables with "
            f"different "
            "rotary dims are not implemented",
        )
    to_ratio = {SLIDING: 0, CSA: csa, HCA: hca}
    args = DeepSeekV4ModelArgs(
        vocab_size=int(c.get("vocab_size", d.vocab_size)),
        dim=int(c.get("hidden_size", d.dim)),
        n_layers=n_layers,
        n_heads=int(c.get("num_attention_heads", d.n_heads)),
        head_dim=head_dim,
        rope_head_dim=main_dim,
        q_lora_rank=int(c.get("q_lora_rank", d.q_lora_rank)),
        o_groups=int(c.get("o_groups", d.o_groups)),
        o_lora_rank=int(c.get("o_lora_rank", d.o_lora_rank)),
        sliding_window=int(c.get("sliding_window", d.sliding_window)),
        compress_ratios=[to_ratio[t] for t in types],
        csa_ratio=csa,
        hca_ratio=hca,
        index_n_heads=int(c.get("index_n_heads", d.index_n_heads)),
        index_head_dim=int(c.get("index_head_dim", d.index_head_dim)),
        index_topk=int(c.get("index_topk", d.index_topk)),
        hc_mult=int(c.get("hc_mult", d.hc_mult)),
        hc_sinkhorn_iters=int(c.get("hc_sinkhorn_iters", d.hc_sinkhorn_iters)),
        hc_eps=float(c.get("hc_eps", d.hc_eps)),
        norm_eps=float(c.get("rms_norm_eps", d.norm_eps)),
        n_hash_layers=_hash_layers(c, n_layers),
        moe_inter_dim=int(c.get("moe_intermediate_size", d.moe_inter_dim)),
        moe_args=v4_moe_args(
            num_experts=int(c.get("n_routed_experts", d.moe_args.num_experts)),
            top_k=int(c.get("num_experts_per_tok", d.moe_args.top_k)),
            route_scale=float(c.get("routed_scaling_factor", d.moe_args.route_scale)),
            score_func=c.get("scoring_func", d.moe_args.score_func),
        ),
        swiglu_limit=float(c.get("swiglu_limit", d.swiglu_limit)),
        main_rope=main,
        compress_rope=compress,
        mtp_layers=int(c.get("num_nextn_predict_layers", d.mtp_layers)),
        init_std=float(c.get("initializer_range", d.init_std)),
        eos_id=_eos(c, d.eos_id),
    )
    args.validate()
    return args


def _rope_parameters(table: RopeTable, partial: float) -> dict:
    out = {"rope_type": table.rope_type, "rope_theta": table.theta, "partial_rotary_factor": partial}
    if table.rope_type == "yarn":
        out.update(
            factor=table.factor,
            original_max_position_embeddings=table.original_max_position_embeddings,
            beta_fast=table.beta_fast,
            beta_slow=table.beta_slow,
            attention_factor=1.0,  # explicit: transformers would otherwise derive an mscale
        )
    return out


def hf_config_from_args(a: DeepSeekV4ModelArgs) -> dict:
    """The transformers config.json dict that rebuilds exactly this model (nested RoPE tables, explicit)."""
    to_type = {0: SLIDING, a.csa_ratio: CSA, a.hca_ratio: HCA}
    partial = a.rope_head_dim / a.head_dim
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": a.vocab_size,
        "hidden_size": a.dim,
        "num_hidden_layers": a.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": 1,
        "head_dim": a.head_dim,
        "partial_rotary_factor": partial,
        "q_lora_rank": a.q_lora_rank,
        "o_groups": a.o_groups,
        "o_lora_rank": a.o_lora_rank,
        "sliding_window": a.sliding_window,
        "layer_types": [to_type[r] for r in a.compress_ratios],
        "compress_rates": {CSA: a.csa_ratio, HCA: a.hca_ratio},
        "mlp_layer_types": [a.mlp_type(i) for i in range(a.n_layers)],
        "index_n_heads": a.index_n_heads,
        "index_head_dim": a.index_head_dim,
        "index_topk": a.index_topk,
        "hc_mult": a.hc_mult,
        "hc_sinkhorn_iters": a.hc_sinkhorn_iters,
        "hc_eps": a.hc_eps,
        "rms_norm_eps": a.norm_eps,
        "n_routed_experts": a.moe_args.num_experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": a.moe_args.top_k,
        "moe_intermediate_size": a.moe_inter_dim,
        "routed_scaling_factor": a.moe_args.route_scale,
        "scoring_func": a.moe_args.score_func,
        "norm_topk_prob": True,
        "swiglu_limit": a.swiglu_limit,
        "rope_theta": a.main_rope.theta,
        "compress_rope_theta": a.compress_rope.theta,
        "rope_parameters": {
            "main": _rope_parameters(a.main_rope, partial),
            "compress": _rope_parameters(a.compress_rope, partial),
        },
        "num_nextn_predict_layers": a.mtp_layers,
        "max_position_embeddings": max(a.max_seq_len, HF_MAX_POSITION_EMBEDDINGS),
        "initializer_range": a.init_std,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 0,
        "eos_token_id": a.eos_id,
    }
