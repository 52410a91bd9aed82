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
from .layouts import TRANSFORMERS, detect_layout, disk_slot, index_in_transformers_names, stored_mtp_depths
from .quantization import FP8_BLOCK
from .reader import CheckpointPlan, DeepSeekV4StorageReader, plan_checkpoint
from .validation import CheckpointMismatchError, check_config, check_tensors

MTP_PREFIX = "mtp."


def with_mtp_shard(backbone: dict[str, int], exported: list[str]) -> dict[str, int]:
    """The backbone's shard map plus one more shard holding every MTP tensor (renamed after the export)."""
    mtp_shard = max(backbone.values(), default=0) + 1
    return {**backbone, **{k: mtp_shard for k in exported if k.startswith(MTP_PREFIX)}}


def _fp8_block(config: dict | None) -> tuple[int, int]:
    block = ((config or {}).get("quantization_config") or {}).get("weight_block_size") or FP8_BLOCK
    return int(block[0]), int(block[1])


class DeepSeekV4CheckpointAdapter(DeepSeekV4StateDictAdapter):
    """``DeepSeekV4StateDictAdapter`` that reads every DeepSeek-V4 layout and shards exports like its
    source."""

    def __init__(self, model_args: DeepSeekV4ModelArgs, hf_assets_path: str | None):
        super().__init__(model_args, hf_assets_path)
        if self.fqn_to_index_mapping:
            self.fqn_to_index_mapping = self._export_index(self.fqn_to_index_mapping)
        elif model_args.mtp_layers:  # the MTP depths go to a shard of their own (export.py renames them)
            exported = [k for k in self.expected_hf_shapes() if not k.endswith(HASH_TABLE)]
            self.fqn_to_index_mapping = with_mtp_shard(
                {k: 1 for k in exported if not k.startswith(MTP_PREFIX)}, exported
            )

    def _export_index(self, mapping: dict[str, int]) -> dict[str, int] | None:
        """The shard of every tensor an export writes, keyed by transformers names, or None (one file).

        The hf_assets_path index may use another naming and lists the hash tables, which the export
        completion writes itself; torch's consolidation writes a broken header for a listed tensor that
        is not saved.
        """
        if detect_layout(mapping) not in (None, TRANSFORMERS):
            mapping = index_in_transformers_names(mapping, self.model_args.mtp_layers)
        exported = [k for k in self.expected_hf_shapes() if not k.endswith(HASH_TABLE)]
        backbone = [k for k in exported if not k.startswith(MTP_PREFIX)]
        unplaced = [k for k in backbone if k not in mapping]
        if unplaced:
            logger.warning(
                f"the index at {self.hf_assets_path} places no shard for {unplaced[:3]}: an HF export "
                "will be written as a single file (and the MTP depths, if any, as a second one)"
            )
        placed = {k: 1 if unplaced else mapping[k] for k in backbone}
        if len(exported) > len(backbone):
            return with_mtp_shard(placed, exported)
        return None if unplaced else placed

    def expected_hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Transformers-layout key -> shape of the model built (from a meta-device model: nothing
        allocated)."""
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
        depths = self.model_args.mtp_layers
        plan = plan_checkpoint(folder, layout, stored, lambda key: disk_slot(key, depths), _fp8_block(config))
        expected = self.expected_hf_shapes()
        stored_depths = stored_mtp_depths(stored)
        if 0 < stored_depths < depths:
            raise CheckpointMismatchError(
                f"{folder} stores {stored_depths} MTP depth(s) but the model builds {depths}: set "
                f"--deepseek_v4.mtp_layers {stored_depths} (or fewer; 0 drops them)"
            )
        if stored_depths == 0 and depths:
            for key in (k for k in expected if k.startswith(MTP_PREFIX)):
                plan.keep(key, expected[key])
            logger.info(
                f"{folder} has no MTP weights: the {depths} MTP depth(s) start from their initialisation"
            )
        elif stored_depths > depths:
            logger.info(
                f"{folder} stores {stored_depths} MTP depth(s); the model builds {depths}: "
                f"{len(plan.skipped)} MTP tensors are not loaded (set --deepseek_v4.mtp_layers to train them)"
            )
        check_tensors(plan, expected)
        return plan

    def get_hf_storage_reader(self, path: str, from_quantized: bool = False) -> DeepSeekV4StorageReader:
        """Any layout, quantized or not (detected from the headers, so ``from_quantized`` is not needed)."""
        plan = self.checked_plan(path)
        if from_quantized and not plan.quantized:
            logger.info(
                f"initial_load_in_hf_quantized is set but {path} holds no quantized tensor; reading as is"
            )
        logger.info(
            f"Loading {path}: {plan.layout} layout, {len(plan.tensors) - len(plan.kept)} tensors"
            + (f", {len(plan.skipped)} MTP tensors not trained here" if plan.skipped else "")
            + (", FP8/FP4 dequantized on read" if plan.quantized else "")
        )
        return DeepSeekV4StorageReader(plan)
