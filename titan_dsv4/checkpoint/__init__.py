"""Checkpoints for DeepSeek-V4 in TorchTitan: Hugging Face and released folders in, transformers folders out.

* ``files``: what a folder holds, from the safetensors headers alone (truncation is caught here);
* ``quantization``: the released FP8 (128x128 e8m0 blocks) and FP4 (e2m1, 1x32 e8m0) formats;
* ``reader``: the DCP storage reader that serves either layout as transformers-layout tensors, box by box;
* ``validation``: the checkpoint compared with the model built, before anything is read;
* ``hf_config``: ``config.json`` -> model args, flavor and TOML (CLI: ``python -m titan_dsv4.checkpoint.convert_config``);
* ``hooks``: the TorchTitan 0.2.2 behaviours this package completes (early checkpoint-option and parallel-degree
  checks, complete HF exports, optimizer state for never-updated parameters).
"""

from .files import CheckpointError

__all__ = ["CheckpointError"]
