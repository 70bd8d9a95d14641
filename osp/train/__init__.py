"""Training: LatteT2V with accelerate (``osp.train.t2v``; ``osp train-t2v`` is its command line), its
EMA (``ema``), atomic checkpoints (``checkpoint``), per-step randomness (``rng``), validation
sampling (``validation``), and the latent cache writer (``latent_cache``; ``osp cache-latents``)."""
from .checkpoint import latest_checkpoint, list_checkpoints
from .ema import EMA
from .t2v import ConfigError, TrainConfig, check_config, collate, train

__all__ = ["EMA", "ConfigError", "TrainConfig", "check_config", "collate", "latest_checkpoint", "list_checkpoints",
           "train"]
