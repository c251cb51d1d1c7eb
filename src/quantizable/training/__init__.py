"""Pre-training and fine-tuning with the paper's recipes on Hugging Face accelerate."""

from quantizable.training.config import (DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, list_presets,
                                         load_config)
from quantizable.training.trainer import TrainingDivergedError, TrainingInterrupted, build_model, train

__all__ = [
    "DataConfig", "ModelConfig", "OptimConfig", "RunConfig", "TrainConfig", "TrainingDivergedError",
    "TrainingInterrupted", "build_model", "list_presets", "load_config", "train",
]
