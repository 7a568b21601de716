"""Pure-PyTorch core of gdm-ray: data, models, triggers, attack, metrics, MESA.

Nothing here imports Ray, Hydra or boto3: the core is usable as a library
with no cluster running (DESIGN.md section 2).
"""

from gdm_ray.core.attack import AttackResult, BadNets
from gdm_ray.core.data import DataSpec, ImageSet, Splits, load_splits, make_synthetic
from gdm_ray.core.errors import ConfigError, DataError, GdmRayError, ModelLoadError
from gdm_ray.core.generator import StaircaseGenerators, TriggerGenerator
from gdm_ray.core.mesa import MESA, MESAConfig, MESAResult
from gdm_ray.core.metrics import attack_success_rate, clean_accuracy, predict
from gdm_ray.core.model_io import LoadedModel, load_model, save_safetensors, save_torchscript
from gdm_ray.core.models import ARCHS, ResNet9, SmallCNN, build_model
from gdm_ray.core.statistics_network import MINE, StaircaseStatistics, StatisticsNetwork
from gdm_ray.core.train import TrainConfig, train_classifier
from gdm_ray.core.triggers import Trigger, TriggerSpec, apply_trigger, make_trigger

__all__ = [
    "ARCHS",
    "AttackResult",
    "BadNets",
    "ConfigError",
    "DataError",
    "DataSpec",
    "GdmRayError",
    "ImageSet",
    "LoadedModel",
    "ModelLoadError",
    "ResNet9",
    "SmallCNN",
    "Splits",
    "Trigger",
    "TriggerSpec",
    "TrainConfig",
    "apply_trigger",
    "attack_success_rate",
    "build_model",
    "clean_accuracy",
    "load_model",
    "load_splits",
    "make_synthetic",
    "make_trigger",
    "predict",
    "save_safetensors",
    "save_torchscript",
    "train_classifier",
    "MESA",
    "MESAConfig",
    "MESAResult",
    "MINE",
    "StaircaseGenerators",
    "StaircaseStatistics",
    "StatisticsNetwork",
    "TriggerGenerator",
]
