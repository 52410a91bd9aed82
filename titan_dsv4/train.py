"""Entry point: ``python -m titan_dsv4.train --job.config_file ...`` (what run_train.sh launches).

Importing ``titan_dsv4`` first applies the CPU support when there is no accelerator, before torchtitan
is imported, then registers the ``deepseek_v4`` train spec; the rest is TorchTitan's own Trainer.
"""

import titan_dsv4  # noqa: F401  (CPU support + train spec registration, before torchtitan)

from torchtitan.train import Trainer, main  # noqa: E402

if __name__ == "__main__":
    main(Trainer)
