"""Optimizers and learning-rate schedules, by name: `optimizer=adam|adamw`, `optimizer.scheduler=none|exponential`."""
from __future__ import annotations

import torch

from .config import OptimizerConfig

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
SCHEDULERS = ("none", "exponential")  # exponential: lr *= gamma at the end of every epoch


def build_optimizer(cfg: OptimizerConfig, model: torch.nn.Module, fused: bool = False):
    """The optimizer over the model's parameters (fused kernels when asked), and its per-epoch LR schedule."""
    optimizer = OPTIMIZERS[cfg.name](model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=tuple(cfg.betas), **({"fused": True} if fused else {}))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, cfg.gamma) if cfg.scheduler == "exponential" else None
    return optimizer, scheduler
