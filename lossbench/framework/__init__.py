"""The training framework (timm, torchvision): config, data, models, trainer, checkpoints, distributed.

Built on the :mod:`lossbench` loss library; never imported by it. ``train.py`` is argument parsing
plus :class:`Trainer`.
"""

from .augment import AugmentSpec, BatchAugment
from .builders import classification_metrics, load_run, make_loader, predict
from .checkpoint import CheckpointError, check_resumable, load_checkpoint, save_checkpoint
from .config import ConfigError, parse_args
from .data import DataBundle, DatasetNotFoundError, get_data
from .ood_sets import get_ood_dataset
from .image_cache import DecodedImages, decode_image_folder
from .mixup import SOFT_TARGET_LOSSES
from .models import Classifier, create_model
from .stems import use_small_stem
from .trainer import Trainer

__all__ = [
    "Trainer", "parse_args", "ConfigError", "CheckpointError", "check_resumable", "load_checkpoint",
    "save_checkpoint", "DataBundle", "DatasetNotFoundError", "get_data", "get_ood_dataset", "Classifier",
    "create_model", "classification_metrics", "load_run", "make_loader", "predict", "AugmentSpec",
    "BatchAugment", "DecodedImages", "decode_image_folder", "SOFT_TARGET_LOSSES", "use_small_stem",
]
