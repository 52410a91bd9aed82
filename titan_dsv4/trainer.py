"""TorchTitan's Trainer with DeepSeek-V4's extras; ``python -m titan_dsv4.train`` (run_train.sh) runs it.

What it adds to Titan's own Trainer, each through a public extension point:
  * parallel degrees are checked against the world size before Titan builds its meshes (Titan asserts);
  * the checkpoint manager completes HF exports and optimizer state (``checkpoint/manager.py``);
  * the model is told the training step (the indexer's dense warm-up depends on it).
The stock ``python -m torchtitan.train --experimental.custom_import titan_dsv4`` path trains too; it refuses
the two options that need this Trainer (``checkpoint.last_save_in_hf``, ``deepseek_v4.indexer_warmup_steps``).
"""

from __future__ import annotations

from torchtitan.train import Trainer

from .checkpoint.manager import DeepSeekV4CheckpointManager
from .job_config import TRAINER_MARK, check_parallel_degrees, launch_world_size


class DeepSeekV4Trainer(Trainer):
    """Titan's Trainer plus early degree checks, complete HF exports and a step-aware model."""

    def __init__(self, job_config):
        check_parallel_degrees(job_config.parallelism, launch_world_size(job_config))
        setattr(job_config, TRAINER_MARK, True)
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

    def train_step(self, data_iterator):
        for part in self.model_parts:
            if hasattr(part, "set_training_step"):
                part.set_training_step(self.step)
        return super().train_step(data_iterator)
