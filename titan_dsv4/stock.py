"""For TorchTitan's stock entry: ``python -m torchtitan.train --experimental.custom_import titan_dsv4.stock``.

Importing this module is the explicit request for what the stock entry needs from us: the ``deepseek_v4``
train spec (``import titan_dsv4``); on a machine without an accelerator, the CPU support (``titan_dsv4.cpu``:
Titan chose "cuda" when it was imported); and refusals that exit with one message, as ``./run_train.sh``'s
ranks do (``refusals.as_entry_point``). With a GPU, ``--experimental.custom_import titan_dsv4`` also
trains, with a refused job's traceback on every rank.
"""

from .cpu import apply_cpu_support
from .refusals import as_entry_point

APPLIED = apply_cpu_support()
as_entry_point()  # the spec's hooks refuse with one message, as ./run_train.sh's ranks do
