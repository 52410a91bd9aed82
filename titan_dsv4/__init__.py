"""DeepSeek-V4 for TorchTitan: ``import titan_dsv4`` registers the ``deepseek_v4`` train spec.

On a machine without an accelerator the CPU support (``titan_dsv4.cpu``) is applied first, before
anything imports torchtitan, so that Titan resolves its device to CPU and its process groups to gloo.
"""

from .cpu import apply_cpu_support

apply_cpu_support()

from .spec import get_train_spec, register  # noqa: E402

register()

__all__ = ["get_train_spec", "register"]
