"""The train spec's state-dict adapter: the model's name map plus reading any DeepSeek-V4 folder.

Titan calls ``get_hf_storage_reader`` to load; this one plans the folder (any of the three namings,
FP8/FP4 detected from the headers), checks it against the model built before any tensor data is read,
and serves it through ``reader.DeepSeekV4StorageReader``. For exports it keys the ``hf_assets_path``
index by transformers names, so that an export is sharded like the folder it came from.
"""

from __future__ import annotations

import torch
from torchtitan.tools.logging import logger

from ..model.args import DeepSeekV4ModelArgs
from ..model.state_dict_adapter import HASH_TABLE, DeepSeekV4StateDictAdapter
from .files import read_config, scan_folder
from .layouts import TRANSFORMERS, detect_layout, disk_slot, index_in_transformers_names
from .quantization import FP8_BLOCK
from .reader import CheckpointPlan, DeepSeekV4StorageReader, plan_checkpoint
from .validation import CheckpointMismatchError, check_config, check_tensors


def _fp8_block(config: dict | None) -> tuple[int, int]:
    block = ((config or {}).get("quantization_config") or {}).get("weight_block_size") or FP8_BLOCK
    return int(block[0]), int(block[1])


class DeepSeekV4CheckpointAdapter(DeepSeekV4StateDictAdapter):
    """``DeepSeekV4StateDictAdapter`` that reads every DeepSeek-V4 layout and shards exports like its source."""

    def __init__(self, model_args: DeepSeekV4ModelArgs, hf_assets_path: str | None):
        super().__init__(model_args, hf_assets_path)
        if self.fqn_to_index_mapping:
            self.fqn_to_index_mapping = self._export_index(self.fqn_to_index_mapping)

    def _export_index(self, mapping: dict[str, int]) -> dict[str, int] | None:
        """The shard of every tensor an export writes, keyed by transformers names, or None (one file).

        The hf_assets_path index may use another naming and lists the hash tables, which the export
        completion writes itself; torch's consolidation writes a broken header for a listed tensor that
        is not saved.
        """
        if detect_layout(mapping) not in (None, TRANSFORMERS):
            mapping = index_in_transformers_names(mapping)
        exported = [k for k in self.expected_hf_shapes() if not k.endswith(HASH_TABLE)]
        unplaced = [k for k in exported if k not in mapping]
        if unplaced:
            logger.warning(
                f"the index at {self.hf_assets_path} places no shard for {unplaced[:3]}: an HF export "
                "will be written as a single file"
            )
            return None
        return {k: mapping[k] for k in exported}

    def expected_hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Transformers-layout key -> shape of the model built (from a meta-device model: nothing allocated)."""
        from ..model import DeepSeekV4Model

        with torch.device("meta"):
            model = DeepSeekV4Model(self.model_args)
        return {k: tuple(v.shape) for k, v in self.to_hf(model.state_dict()).items()}

    def checked_plan(self, folder: str) -> CheckpointPlan:
        """The folder planned and compared with the model built; raises before any tensor data is read."""
        config = read_config(folder)
        if config is not None:
            check_config(config, self.model_args, folder)
        else:
            logger.warning(f"{folder} has no config.json: only the tensors' names and shapes can be checked")
        stored = scan_folder(folder)
        layout = detect_layout(stored)
        if layout is None:
            raise CheckpointMismatchError(
                f"{folder} is not a DeepSeek-V4 checkpoint: none of its tensors (e.g. {sorted(stored)[:3]}) "
                f"has a "
                "DeepSeek-V4 name, in the transformers layout (model.embed_tokens.weight, ...) or DeepSeek's "
                "released "
                "layout (embed.weight, ...). Point --checkpoint.initial_load_path at a DeepSeek-V4 "
                "checkpoint."
            )
        plan = plan_checkpoint(folder, layout, stored, disk_slot, _fp8_block(config))
        check_tensors(plan, self.expected_hf_shapes())
        return plan

    def get_hf_storage_reader(self, path: str, from_quantized: bool = False) -> DeepSeekV4StorageReader:
        """Any layout, quantized or not (detected from the headers, so ``from_quantized`` is not needed)."""
        plan = self.checked_plan(path)
        if from_quantized and not plan.quantized:
            logger.info(
                f"initial_load_in_hf_quantized is set but {path} holds no quantized tensor; reading as is"
            )
        logger.info(
            f"Loading {path}: {plan.layout} layout, {len(plan.tensors)} tensors"
            + (f", {len(plan.skipped)} MTP tensors not trained here" if plan.skipped else "")
            + (", FP8/FP4 dequantized on read" if plan.quantized else "")
        )
        return DeepSeekV4StorageReader(plan)
