"""Per-tensor step coefficients that both fast backends hand to their kernels.

Formed in float64 with vectorised NumPy over every tensor of a job at once, from the
hyperparameter arrays (`HYPER_KEYS`) and the per-tensor step counts; each backend puts them
into its own coefficient table. The equations are the reference's (`kernels/reference.py`,
shared/OPTIMIZERS.md).
"""
from __future__ import annotations

import numpy as np


def decoupled_decay(h: dict, active: np.ndarray) -> np.ndarray:
    """reference.decay_factor per tensor; 1 where weight_decay == 0."""
    lr, wd, mode = h["lr"], h["weight_decay"], h["weight_decay_mode"]
    if not np.isin(mode[active], (0, 1, 2)).all():
        raise ValueError(f"unknown weight decay mode in {np.unique(mode[active])}")
    lr0 = np.where(h["initial_lr"] != 0, h["initial_lr"], lr)  # `initial_lr or lr`
    factor = np.select([mode == 0, mode == 1], [1.0 - lr * wd, 1.0 - (lr / lr0) * wd], 1.0 - wd)
    return np.where(wd != 0, factor, 1.0)


def adam_bias_correction(h: dict, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(√bc2, lr/bc1) with bc_i = 1 − β_i^t: the update is (lr/bc1)·m/(√v/√bc2 + ε)."""
    return np.sqrt(1.0 - h["beta2"] ** steps), h["lr"] / (1.0 - h["beta1"] ** steps)


def adafactor_beta2t(h: dict, steps: np.ndarray) -> np.ndarray:
    """β2_t = 1 − t^decay_rate."""
    return 1.0 - steps ** h["decay_rate"]


def adafactor_rho(h: dict, steps: np.ndarray) -> np.ndarray:
    """ρ_t: min(1e-2 (1e-6·t with warmup_init), 1/√t) with relative_step, else lr."""
    relative = np.minimum(np.where(h["warmup_init"] != 0, 1e-6 * steps, 1e-2), 1.0 / np.sqrt(steps))
    return np.where(h["relative_step"] != 0, relative, h["lr"])
