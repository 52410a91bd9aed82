"""``config.json`` -> the DeepSeek-V4 it describes, the flavor that builds it, and the TOML that trains it."""

from __future__ import annotations

import json
import os

from ..flavors import CHECKPOINT_FLAVOR_PREFIX, deepseek_v4_args
from ..model.args import DeepSeekV4ModelArgs
from ..model.hf_config import args_from_hf_config, hf_config_from_args
from .files import CONFIG_FILE, CheckpointError, read_config

# Fields of hf_config_from_args() that do not change the stored backbone: the run's sequence length, the init
# scale, the token ids, and the MTP depth (checked against the stored mtp.* tensors instead).
_RUNTIME_FIELDS = (
    "max_position_embeddings",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "num_nextn_predict_layers",
)


def model_args_from_checkpoint(folder: str) -> DeepSeekV4ModelArgs:
    """The model args a checkpoint folder's config.json describes (its ``quantization_config`` is storage
    only)."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    config = read_config(folder)
    if config is None:
        raise CheckpointError(f"{folder} has no {CONFIG_FILE}; a Hugging Face checkpoint folder carries one")
    return args_from_hf_config(config)


def stored_model_fields(args: DeepSeekV4ModelArgs) -> dict:
    """What defines the stored model: the transformers config minus run-time fields."""
    return {k: v for k, v in hf_config_from_args(args).items() if k not in _RUNTIME_FIELDS}


def config_differences(stored: DeepSeekV4ModelArgs, built: DeepSeekV4ModelArgs) -> list[str]:
    """``field: checkpoint X, model Y`` for every field where the two models differ."""
    a, b = stored_model_fields(stored), stored_model_fields(built)
    return [
        f"{k}: checkpoint {a.get(k)!r}, model {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def matching_flavor(args: DeepSeekV4ModelArgs) -> str | None:
    """The built-in flavor that builds exactly this model, if one does."""
    for name, flavor in deepseek_v4_args.items():
        if not config_differences(args, flavor):
            return name
    return None


def flavor_for_checkpoint(folder: str) -> str:
    """A built-in flavor name when one matches, else ``hf:<folder>``, which builds the model from
    config.json."""
    return matching_flavor(model_args_from_checkpoint(folder)) or CHECKPOINT_FLAVOR_PREFIX + os.path.abspath(
        folder
    )


def checkpoint_overrides(folder: str) -> dict[str, dict]:
    """The [model], [checkpoint] and [deepseek_v4] settings that build the stored model and start training
    from its weights."""
    folder = os.path.abspath(folder)
    model = {"name": "deepseek_v4", "flavor": flavor_for_checkpoint(folder)}
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        model["hf_assets_path"] = folder  # a released folder ships its tokenizer
    checkpoint = {
        "enable": True,
        "initial_load_path": folder,
        "initial_load_in_hf": True,
        "initial_load_model_only": True,
    }
    # The checkpoint's Lightning Indexer is already trained: fine-tuning keeps it fixed (as the Flash and Pro
    # configs do) instead of re-learning it behind a base config's dense warm-up.
    indexer = {"indexer_loss_weight": 0.0, "indexer_warmup_steps": 0}
    return {"model": model, "checkpoint": checkpoint, "deepseek_v4": indexer}


def merged_config(base: dict | None, overrides: dict[str, dict]) -> dict:
    """``base`` (a parsed TOML) with the override sections laid over it, key by key."""
    merged = {section: dict(values) for section, values in (base or {}).items()}
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values)
    return merged


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(doc: dict) -> str:
    """TOML text for a Titan config: top-level scalars, then one table per section."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for section, values in doc.items():
        if isinstance(values, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines).lstrip("\n") + "\n"
