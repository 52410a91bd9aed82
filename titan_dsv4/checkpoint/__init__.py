"""Checkpoints for DeepSeek-V4 in TorchTitan: Hugging Face and released folders in, transformers folders out.

* ``files``: what a folder holds, from the safetensors headers alone (truncation is caught here);
* ``quantization``: the released FP8 (128x128 e8m0 blocks) and FP4 (e2m1, 1x32 e8m0) formats;
* ``layouts``: the three namings (transformers, save_pretrained, released) mapped onto transformers' names;
* ``reader``: the DCP storage reader that serves any layout as transformers-layout tensors, box by box;
* ``validation``: the checkpoint compared with the model built, before anything is read;
* ``adapter``: the train spec's state-dict adapter (the model's name map + the reader);
* ``export`` and ``manager``: HF exports completed (hash tables, config.json, tokenizer), optimizer state
  completed before a save; installed by ``titan_dsv4.trainer``;
* ``hf_config``: ``config.json`` -> flavor and TOML (CLI: ``python -m titan_dsv4.checkpoint.convert_config``).
"""

from .files import CheckpointError

__all__ = ["CheckpointError"]
