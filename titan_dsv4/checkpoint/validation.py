"""The checkpoint compared with the model built, before a byte of tensor data is read."""

from __future__ import annotations

from ..model.args import ConfigError, DeepSeekV4ModelArgs
from ..model.hf_config import args_from_hf_config
from .files import CheckpointError
from .hf_config import config_differences, matching_flavor
from .reader import CheckpointPlan

_SHOWN = 5  # offending keys named per kind of problem


class CheckpointMismatchError(CheckpointError):
    """The checkpoint holds another model than the one built (type, size, keys or shapes)."""


def _fix(folder: str) -> str:
    return (
        f"Load the checkpoint of this model, or build the model the checkpoint holds: "
        f"`python -m titan_dsv4.checkpoint.convert_config {folder}` prints the matching TOML."
    )


def _first(keys: list[str]) -> str:
    more = f" (and {len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def check_config(config: dict, built: DeepSeekV4ModelArgs, folder: str) -> None:
    """The checkpoint's config.json must describe the model built, field for field."""
    try:
        stored = args_from_hf_config(config)
    except ConfigError as e:
        raise CheckpointMismatchError(f"{folder}/config.json: {e}. {_fix(folder)}") from None
    diffs = config_differences(stored, built)
    if not diffs:
        return
    flavor = matching_flavor(stored)
    fix = f"It is the {flavor!r} flavor: set --model.flavor {flavor}." if flavor else _fix(folder)
    raise CheckpointMismatchError(
        f"checkpoint {folder} holds another DeepSeek-V4 than the model built; config.json differs in "
        f"{len(diffs)} field(s): {'; '.join(diffs[:_SHOWN])}. {fix}"
    )


def check_tensors(plan: CheckpointPlan, expected: dict[str, tuple[int, ...]]) -> None:
    """The checkpoint's tensors must be the model's, key for key and shape for shape."""
    missing = [k for k in expected if k not in plan.tensors]
    unexpected = [
        n for k in plan.tensors if k not in expected for n in plan.disk_names(k)[:1]
    ] + plan.unexpected
    wrong = [k for k in expected if k in plan.tensors and tuple(plan.tensors[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) the model needs are missing: {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} stored tensor(s) belong to no model tensor: {_first(unexpected)}")
    if wrong:
        shapes = [
            f"{k} is {list(plan.tensors[k].shape)} on disk but {list(expected[k])} in the model"
            for k in wrong
        ]
        problems.append(f"{len(wrong)} shape mismatch(es): {_first(shapes)}")
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {plan.folder} ({plan.layout} layout) does not match the model built:\n  - "
            + "\n  - ".join(problems)
            + f"\n{_fix(plan.folder)}"
        )
