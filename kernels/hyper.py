"""Hyperparameters as every backend reads them: one array per field, one entry per tensor.

A job's parameter groups arrive as `Hyperparameters` messages (the API's wire form, one per
group); `Hyper.from_groups` turns them into this record once per step, each tensor taking
its group's values. Floats are float64 (coefficients are formed in float64, as torch forms
them from Python floats), flags are bool, `weight_decay_mode` holds `DecayMode` values,
`eps_mode` `EpsMode` values, and Adafactor's optional beta1 is NaN where it is unset.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import IntEnum
from typing import Sequence

import numpy as np
import numpy.typing as npt

from optserve.proto.v1 import optserve_pb2 as pb

F64 = npt.NDArray[np.float64]
Flags = npt.NDArray[np.bool_]


class DecayMode(IntEnum):
    """How decoupled weight decay scales θ (the proto's WeightDecayMode)."""
    LR = pb.WEIGHT_DECAY_LR              # θ ← θ(1 − lr·λ), torch.optim.AdamW
    SCHEDULE = pb.WEIGHT_DECAY_SCHEDULE  # θ ← θ(1 − (lr/lr₀)·λ), Loshchilov & Hutter, Alg. 2
    FIXED = pb.WEIGHT_DECAY_FIXED        # θ ← θ(1 − λ)


class EpsMode(IntEnum):
    """Where Adam's ε sits (the proto's EpsMode; kernels/adam.py has both updates)."""
    TORCH = pb.EPS_TORCH   # (lr/bc1)·m/(√v/√bc2 + ε), torch.optim.Adam(W)
    KERAS = pb.EPS_KERAS   # α_t·m/(√v + ε̂), α_t = lr·√bc2/bc1: Keras, TensorFlow


def decay_factor(mode: DecayMode, lr: float, weight_decay: float, initial_lr: float) -> float:
    """The multiplier of θ in decoupled weight decay, for one tensor (the reference's form)."""
    if mode == DecayMode.LR:
        return 1.0 - lr * weight_decay
    if mode == DecayMode.SCHEDULE:
        return 1.0 - (lr / initial_lr) * weight_decay
    if mode == DecayMode.FIXED:
        return 1.0 - weight_decay
    raise ValueError(f"unknown weight decay mode {mode!r}")


@dataclass(frozen=True)
class Hyper:
    """Per-tensor hyperparameters, under the proto's field names (docs/optimizers.md says
    which optimizer reads which)."""
    lr: F64
    beta1: F64
    beta2: F64
    eps: F64
    weight_decay: F64
    weight_decay_mode: npt.NDArray[np.int64]
    initial_lr: F64
    maximize: Flags
    amsgrad: Flags
    delta: F64
    wd_ratio: F64
    nesterov: Flags
    eps2: F64
    clip_threshold: F64
    decay_rate: F64
    adafactor_beta1: F64         # NaN: None (no momentum)
    scale_parameter: Flags
    relative_step: Flags
    warmup_init: Flags
    eps_mode: npt.NDArray[np.int64]

    @classmethod
    def from_groups(cls, groups: Sequence[pb.Hyperparameters], group_of: npt.ArrayLike,
                    lr_divisor: float = 1.0) -> "Hyper":
        """Tensor i takes groups[group_of[i]]; every lr is divided by `lr_divisor` (async
        jobs with staleness_lr)."""
        group_of = np.asarray(group_of, np.int64)
        fields = pb.Hyperparameters.DESCRIPTOR.fields_by_name
        values = {}
        for f in dataclasses.fields(cls):
            d = fields[f.name]
            if d.type == d.TYPE_BOOL:
                per_group = np.array([getattr(h, f.name) for h in groups], bool)
            elif d.type == d.TYPE_ENUM:
                per_group = np.array([getattr(h, f.name) for h in groups], np.int64)
            else:
                per_group = np.array([getattr(h, f.name) if not d.has_presence or h.HasField(f.name)
                                      else np.nan for h in groups], np.float64)
            values[f.name] = per_group[group_of]
        values["lr"] = values["lr"] / lr_divisor
        return cls(**values)

    def at(self, i: int) -> "Hyper":
        """Tensor i's hyperparameters as Python scalars (float, bool, int), for the
        reference, which states each equation with scalars."""
        return Hyper(**{f.name: getattr(self, f.name)[i].item() for f in dataclasses.fields(self)})

    def decay_factors(self, active: Flags) -> F64:
        """decay_factor of every tensor, vectorised; 1 where weight_decay == 0."""
        lr, wd, mode = self.lr, self.weight_decay, self.weight_decay_mode
        if not np.isin(mode[active], list(DecayMode)).all():
            raise ValueError(f"unknown weight decay mode in {np.unique(mode[active])}")
        lr0 = np.where(self.initial_lr != 0, self.initial_lr, lr)   # `initial_lr or lr`
        with np.errstate(all="ignore"):   # inactive tensors may hold anything
            factor = np.select([mode == DecayMode.LR, mode == DecayMode.SCHEDULE],
                               [1.0 - lr * wd, 1.0 - (lr / lr0) * wd], 1.0 - wd)
        return np.where(wd != 0, factor, 1.0)
