"""Entry point: ``python -m titan_dsv4.train --job.config_file ...`` (what run_train.sh launches).

TorchTitan's ``main`` with ``DeepSeekV4Trainer`` (``titan_dsv4/trainer.py``), after the explicit CPU support
(Titan's device is fixed up where it was copied at import) and inside ``refusals_exit`` (a refused job prints
one message and exits 2).
"""

from torchtitan.train import main

from titan_dsv4.cpu import apply_cpu_support
from titan_dsv4.refusals import refusals_exit
from titan_dsv4.trainer import DeepSeekV4Trainer

if __name__ == "__main__":
    apply_cpu_support()
    with refusals_exit():
        main(DeepSeekV4Trainer)
