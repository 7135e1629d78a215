"""fastvq.train: the tokenizer trainer, its typed config and its checkpoints (docs/training.md).

Not imported by ``import fastvq``. ``Trainer(TrainConfig(preset="unitok-tiny", steps=200)).train()`` is what
``fastvq train tokenizer --preset unitok-tiny`` runs; under ``torchrun`` the same code runs DDP.
"""
from fastvq.train.checkpoint import CheckpointError, resolve_checkpoint, write_atomic, write_checkpoint
from fastvq.train.config import TrainConfig, apply_overrides
from fastvq.train.trainer import Trainer, TrainingError, WeightEMA, build_model, load_checkpoint_model, lr_at

__all__ = ["CheckpointError", "TrainConfig", "Trainer", "TrainingError", "WeightEMA", "apply_overrides",
           "build_model", "load_checkpoint_model", "lr_at", "resolve_checkpoint", "write_atomic", "write_checkpoint"]
