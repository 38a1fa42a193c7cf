"""The registry of optimizers the API offers: names, hyperparameters and state layout.

Both sides read it: the client to build torch-style param groups and to translate them
into `Hyperparameters`, the shard to validate a group and to size the state buffers.
It has no heavy dependencies (no torch, no numba).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from optserve.proto.errors import InvalidArgument
from optserve.proto.v1 import optserve_pb2 as pb

Shape = tuple[int, ...]

DECAY_MODES = {"lr": pb.WEIGHT_DECAY_LR, "schedule": pb.WEIGHT_DECAY_SCHEDULE,
               "fixed": pb.WEIGHT_DECAY_FIXED}
DECAY_MODE_NAMES = {v: k for k, v in DECAY_MODES.items()}

# torch.optim.Adam(W)'s own group keys, kept so that state dicts load both ways.
_TORCH_ADAM_KEYS = dict(amsgrad=False, maximize=False, foreach=None, capturable=False,
                        differentiable=False, fused=None)


def _adam_state(shape: Shape, hyper: pb.Hyperparameters) -> dict[str, Shape]:
    return {"exp_avg": shape, "exp_avg_sq": shape}


def _momentum_state(shape: Shape, hyper: pb.Hyperparameters) -> dict[str, Shape]:
    return {"exp_avg": shape}


def adafactor_state(shape: Shape, hyper: pb.Hyperparameters) -> dict[str, Shape]:
    fields: dict[str, Shape] = {}
    if hyper.HasField("adafactor_beta1"):
        fields["exp_avg"] = shape
    if len(shape) >= 2:  # factored over the last two dims, leading dims are a batch
        fields["exp_avg_sq_row"] = shape[:-1]
        fields["exp_avg_sq_col"] = shape[:-2] + shape[-1:]
    else:
        fields["exp_avg_sq"] = shape
    return fields


def _adam_to_proto(group: Mapping[str, Any], h: pb.Hyperparameters) -> None:
    h.lr = float(group["lr"])
    h.beta1, h.beta2 = (float(b) for b in group["betas"])
    h.eps = float(group["eps"])
    h.weight_decay = float(group["weight_decay"])
    h.maximize = bool(group.get("maximize", False))
    h.amsgrad = bool(group.get("amsgrad", False))


def _decay_mode_to_proto(mode: str, h: pb.Hyperparameters) -> None:
    if mode not in DECAY_MODES:
        raise InvalidArgument(f"weight_decay_mode must be one of {sorted(DECAY_MODES)}, got {mode!r}")
    h.weight_decay_mode = DECAY_MODES[mode]


def _adamw_to_proto(group, h):
    _adam_to_proto(group, h)
    _decay_mode_to_proto(group.get("weight_decay_mode", "lr"), h)


def _lion_to_proto(group, h):
    h.lr = float(group["lr"])
    h.beta1, h.beta2 = (float(b) for b in group["betas"])
    h.weight_decay = float(group["weight_decay"])
    h.maximize = bool(group.get("maximize", False))
    mode = group.get("weight_decay_mode", "lr")
    if group.get("decoupled_weight_decay"):   # lion-pytorch's name for λ/lr₀
        if mode not in ("lr", "schedule"):
            raise ValueError(f"decoupled_weight_decay=True is weight_decay_mode='schedule', "
                             f"not {mode!r}")
        mode = "schedule"
    _decay_mode_to_proto(mode, h)


def _adamp_to_proto(group, h):
    _adam_to_proto(group, h)
    h.delta = float(group["delta"])
    h.wd_ratio = float(group["wd_ratio"])
    h.nesterov = bool(group["nesterov"])


def _adafactor_to_proto(group, h):
    if group["lr"] is None and not group["relative_step"]:
        raise ValueError("adafactor needs an lr when relative_step=False")
    h.lr = 0.0 if group["lr"] is None else float(group["lr"])
    h.eps, h.eps2 = (float(e) for e in group["eps"])
    h.clip_threshold = float(group["clip_threshold"])
    h.decay_rate = float(group["decay_rate"])
    if group["beta1"] is not None:
        h.adafactor_beta1 = float(group["beta1"])
    h.weight_decay = float(group["weight_decay"])
    h.scale_parameter = bool(group["scale_parameter"])
    h.relative_step = bool(group["relative_step"])
    h.warmup_init = bool(group["warmup_init"])


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidArgument(message)


# The kernels compute in float32 with coefficients formed in float64: every hyperparameter,
# and every coefficient formed from them alone, must be a finite float32.
FLOAT32_MAX = 3.4028234663852886e38


def _fits_float32(what: str, value: float) -> None:
    _check(abs(value) <= FLOAT32_MAX, f"{what} must be finite in float32 (at most "
                                      f"{FLOAT32_MAX:.8g} in size), got {value}")


def _finite(h: pb.Hyperparameters, *names: str) -> None:
    for name in names:
        _fits_float32(name, getattr(h, name))


def _validate_adam(h: pb.Hyperparameters) -> None:
    _finite(h, "lr", "beta1", "beta2", "eps", "weight_decay")
    _check(h.lr >= 0, f"lr must be >= 0, got {h.lr}")
    _check(0 <= h.beta1 < 1 and 0 <= h.beta2 < 1, f"betas must be in [0, 1), got ({h.beta1}, {h.beta2})")
    _check(h.eps >= 0, f"eps must be >= 0, got {h.eps}")
    _check(h.weight_decay >= 0, f"weight_decay must be >= 0, got {h.weight_decay}")
    _check(not h.amsgrad, "amsgrad is not supported by optserve v1")
    # the step size lr/(1 − β1^t) is largest at t = 1
    _fits_float32("lr / (1 - beta1)", h.lr / (1.0 - h.beta1))


def _validate_decay_mode(h: pb.Hyperparameters) -> None:
    """Decoupled decay multiplies θ by 1 − lr·λ, 1 − (lr/lr₀)·λ or 1 − λ (kernels/hyper.py)."""
    _check(h.weight_decay_mode in DECAY_MODE_NAMES, f"unknown weight_decay_mode {h.weight_decay_mode}")
    if h.weight_decay_mode == pb.WEIGHT_DECAY_SCHEDULE:
        _check(h.initial_lr > 0, "weight_decay_mode='schedule' needs an initial lr > 0")
        _finite(h, "initial_lr")
        _fits_float32("lr / initial_lr * weight_decay", h.lr / h.initial_lr * h.weight_decay)
    elif h.weight_decay_mode == pb.WEIGHT_DECAY_LR:
        _fits_float32("lr * weight_decay", h.lr * h.weight_decay)


def _validate_adamw(h):
    _validate_adam(h)
    _validate_decay_mode(h)


def _validate_lion(h):
    _finite(h, "lr", "beta1", "beta2", "weight_decay")
    _check(h.lr >= 0, f"lr must be >= 0, got {h.lr}")
    _check(0 <= h.beta1 <= 1 and 0 <= h.beta2 <= 1, f"betas must be in [0, 1], got ({h.beta1}, {h.beta2})")
    _check(h.weight_decay >= 0, f"weight_decay must be >= 0, got {h.weight_decay}")
    _validate_decay_mode(h)


def _validate_adamp(h):
    _validate_adam(h)
    _finite(h, "delta", "wd_ratio")
    _check(h.delta > 0, f"delta must be > 0, got {h.delta}")
    _check(0 <= h.wd_ratio <= 1, f"wd_ratio must be in [0, 1], got {h.wd_ratio}")
    _fits_float32("lr * weight_decay", h.lr * h.weight_decay)   # θ·(1 − lr·λ·ratio)


def _validate_adafactor(h):
    _finite(h, "lr", "eps", "eps2", "clip_threshold", "decay_rate", "weight_decay")
    _check(h.relative_step or h.lr >= 0, f"adafactor needs lr >= 0, got {h.lr}")
    _check(not (h.relative_step and h.lr != 0),
           "adafactor cannot combine a manual lr with relative_step=True")
    _check(not h.warmup_init or h.relative_step, "warmup_init=True requires relative_step=True")
    _check(h.clip_threshold > 0, f"clip_threshold must be > 0, got {h.clip_threshold}")
    _check(h.decay_rate < 0, f"decay_rate must be < 0, got {h.decay_rate}")
    _check(h.eps >= 0 and h.eps2 >= 0, "eps must be >= 0")
    if h.HasField("adafactor_beta1"):
        _check(0 <= h.adafactor_beta1 < 1, f"beta1 must be in [0, 1), got {h.adafactor_beta1}")
    # the step size α is at least lr·ε2 (scale_parameter) or lr; decay takes θ·λ·α
    alpha = h.lr * (h.eps2 if h.scale_parameter else 1.0)
    _fits_float32("the step size", alpha)
    _fits_float32("weight_decay times the step size", h.weight_decay * alpha)


def _group_initial_lr(group: Mapping[str, Any], defaults: Mapping[str, Any]) -> float:
    """lr₀ of a group: the `initial_lr` a scheduler recorded, else its lr."""
    return group.get("initial_lr", group["lr"]) or 0.0


def _lion_initial_lr(group: Mapping[str, Any], defaults: Mapping[str, Any]) -> float:
    """lion-pytorch's decoupled decay divides λ by the optimizer's own lr, for every group."""
    return defaults["lr"] if group.get("decoupled_weight_decay") else _group_initial_lr(group, defaults)


@dataclass(frozen=True)
class OptimizerInfo:
    """What one optimizer accepts and keeps.

    defaults: torch-style param-group defaults, as the class each one is tested against
    (named beside its entry) names them.
    """
    name: str
    defaults: Mapping[str, Any]
    to_proto: Callable[[Mapping[str, Any], pb.Hyperparameters], None]
    validate: Callable[[pb.Hyperparameters], None]
    state_fields: Callable[[Shape, pb.Hyperparameters], dict[str, Shape]]
    # The per-tensor "step" in a state dict: torch keeps a float32 tensor, the others an int.
    step_is_tensor: bool
    # lr₀ of a group (weight_decay_mode="schedule"), from the group and the optimizer's defaults.
    initial_lr: Callable[[Mapping[str, Any], Mapping[str, Any]], float] = _group_initial_lr


REGISTRY: dict[str, OptimizerInfo] = {
    "adamw": OptimizerInfo(  # oracle: torch.optim.AdamW
        "adamw",
        dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, weight_decay_mode="lr",
             decoupled_weight_decay=True, **_TORCH_ADAM_KEYS),
        _adamw_to_proto, _validate_adamw, _adam_state, True),
    "adam": OptimizerInfo(  # oracle: torch.optim.Adam
        "adam",
        dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
             decoupled_weight_decay=False, **_TORCH_ADAM_KEYS),
        _adam_to_proto, _validate_adam, _adam_state, True),
    "adamp": OptimizerInfo(  # oracle: adamp.AdamP 0.3.0
        "adamp",
        dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, delta=0.1, wd_ratio=0.1,
             nesterov=False),
        _adamp_to_proto, _validate_adamp, _adam_state, False),
    "adafactor": OptimizerInfo(  # oracle: transformers.optimization.Adafactor
        "adafactor",
        dict(lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None,
             weight_decay=0.0, scale_parameter=True, relative_step=True, warmup_init=False),
        _adafactor_to_proto, _validate_adafactor, adafactor_state, False),
    "lion": OptimizerInfo(  # oracle: lion_pytorch.Lion
        "lion",
        dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, weight_decay_mode="lr",
             decoupled_weight_decay=False, maximize=False),
        _lion_to_proto, _validate_lion, _momentum_state, False, _lion_initial_lr),
}


def get(name: str) -> OptimizerInfo:
    try:
        return REGISTRY[name]
    except KeyError:
        raise InvalidArgument(f"unknown optimizer {name!r}; choose one of {sorted(REGISTRY)}") from None


def group_to_proto(optimizer: str, group: Mapping[str, Any], initial_lr: float) -> pb.Hyperparameters:
    """Translates a torch-style param group into the wire form, validated."""
    info = get(optimizer)
    h = pb.Hyperparameters()
    try:
        info.to_proto(group, h)
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidArgument(f"bad hyperparameter for {optimizer}: {e}") from None
    h.initial_lr = float(initial_lr)
    info.validate(h)
    return h
