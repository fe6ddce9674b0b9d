"""The paper's ViT-B/32 recipe (Radford et al. 2021, tables 19-20): 32,768 pairs per step, 32 epochs.

Hyper-parameters as published; mixed precision is bf16 (the paper used fp16 with loss scaling,
available as precision=fp16 on CUDA). The contrastive batch is split into chunks of 256 images
per encoder pass per process, so it fits on any number of GPUs.
"""
from clipforge.train.config import TrainConfig


def config() -> TrainConfig:
    cfg = TrainConfig(batch_size=32768, chunk_size=256, epochs=32, precision="bf16")
    cfg.model.name = "ViT-B/32"
    cfg.model.grad_checkpointing = True
    cfg.loss.tile_size = 4096
    cfg.optim.lr = 5e-4
    cfg.optim.weight_decay = 0.2
    cfg.optim.betas = (0.9, 0.98)
    cfg.optim.eps = 1e-6
    cfg.optim.warmup_steps = 2000
    cfg.data.workers = 8
    cfg.data.crop_scale = (0.9, 1.0)
    cfg.run.checkpoint_every = 1000
    cfg.run.log_every = 50
    return cfg
