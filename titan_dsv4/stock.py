"""For TorchTitan's stock entry: ``python -m torchtitan.train --experimental.custom_import titan_dsv4.stock``.

Importing this module is the explicit request for what the stock entry needs from us: the ``deepseek_v4``
train spec (``import titan_dsv4``) and, on a machine without an accelerator, the CPU support
(``titan_dsv4.cpu``: Titan chose "cuda" when it was imported). With a GPU, ``--experimental.custom_import
titan_dsv4`` is enough.
"""

from .cpu import apply_cpu_support

APPLIED = apply_cpu_support()
