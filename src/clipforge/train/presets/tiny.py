"""Smoke-test sized run for a laptop CPU: the tiny ViT for 50 steps, checkpoints every 25."""
from clipforge.train.config import TrainConfig


def config() -> TrainConfig:
    cfg = TrainConfig(batch_size=16, steps=50)
    cfg.model.name = "tiny-vit"
    cfg.optim.lr = 1e-3
    cfg.optim.warmup_steps = 5
    cfg.data.workers = 0
    cfg.run.checkpoint_every = 25
    cfg.run.log_every = 5
    return cfg
