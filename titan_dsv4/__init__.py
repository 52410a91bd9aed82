"""DeepSeek-V4 for TorchTitan: ``import titan_dsv4`` registers the ``deepseek_v4`` train spec, nothing else.

Registration is TorchTitan's extension point for models (``get_train_spec("deepseek_v4")``). Nothing in torch
or Titan changes at import: the CPU support is an explicit call (``titan_dsv4.cpu.apply_cpu_support``) that
our entry points make, and ``titan_dsv4.stock`` makes for TorchTitan's stock entry.
"""

from .spec import get_train_spec, register

register()

__all__ = ["get_train_spec", "register"]
