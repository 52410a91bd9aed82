"""Entry point: ``python -m titan_dsv4.train --job.config_file ...`` (what run_train.sh launches).

Importing ``titan_dsv4`` first applies the CPU support when there is no accelerator, before torchtitan
builds its device, then registers the ``deepseek_v4`` train spec; the Trainer is Titan's, extended in
``titan_dsv4.trainer``.
"""

from torchtitan.train import main  # noqa: E402

import titan_dsv4  # noqa: F401  (CPU support + train spec registration, before torchtitan)
from titan_dsv4.trainer import DeepSeekV4Trainer  # noqa: E402

if __name__ == "__main__":
    main(DeepSeekV4Trainer)
