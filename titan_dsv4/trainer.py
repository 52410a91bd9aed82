"""TorchTitan's Trainer with what Titan gives no extension point for; ``python -m titan_dsv4.train`` runs it.

Everything else DeepSeek-V4 needs comes through the train spec, so TorchTitan's stock entry
(``python -m torchtitan.train --experimental.custom_import titan_dsv4.stock``) trains every shipped config
the same way, the indexer's warm-up included (the model's step comes from the LR schedulers,
``infra/optimizer.py``).
What only this Trainer adds:
  * ``checkpoint.last_save_in_hf``: the HF export is completed with the int64 hash tables, config.json and
    the tokenizer (``checkpoint/manager.py``); Titan has no hook after its HF save, so the stock entry
    refuses this option, and no shipped config sets it;
  * parallel degrees are checked against the world size before Titan builds its meshes, where Titan would
    assert (on the stock entry Titan's own assertion stands).
"""

from __future__ import annotations

from torchtitan.train import Trainer

from .checkpoint.manager import DeepSeekV4CheckpointManager
from .job_config import check_parallel_degrees, launch_world_size
from .spec import for_trainer


class DeepSeekV4Trainer(Trainer):
    """Titan's Trainer plus early degree checks and complete HF exports."""

    def __init__(self, job_config):
        check_parallel_degrees(job_config.parallelism, launch_world_size(job_config))
        super().__init__(job_config)
        if job_config.checkpoint.enable:
            self.checkpointer = DeepSeekV4CheckpointManager.replacing(
                self.checkpointer,
                dataloader=self.dataloader,
                model_parts=self.model_parts,
                optimizers=self.optimizers,
                lr_schedulers=self.lr_schedulers,
                states={"train_state": self},
                checkpoint_config=job_config.checkpoint,
                sd_adapter=self.checkpointer.sd_adapter,
                base_folder=job_config.job.dump_folder,
            )

    @property
    def train_spec(self):
        return self._train_spec

    @train_spec.setter
    def train_spec(self, spec) -> None:
        # Titan sets the registered spec; this Trainer runs it with the job checks that accept the HF export.
        self._train_spec = for_trainer(spec)
