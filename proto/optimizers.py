"""The registry of optimizers the API offers: names, hyperparameters and state layout.

Both sides read it: the client to build torch-style param groups and to translate them
into `Hyperparameters`, the shard to validate a group and to size the state buffers.
It has no heavy dependencies (no torch, no numba).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from optserve.proto.errors import InvalidArgument
from optserve.proto.v1 import optserve_pb2 as pb

Shape = tuple[int, ...]

DECAY_MODES = {"lr": pb.WEIGHT_DECAY_LR, "schedule": pb.WEIGHT_DECAY_SCHEDULE,
               "fixed": pb.WEIGHT_DECAY_FIXED}
DECAY_MODE_NAMES = {v: k for k, v in DECAY_MODES.items()}
# Where Adam's ε sits: "torch" after the bias-corrected √v̂, "keras" (TensorFlow's ε̂) on the
# raw √v with the bias correction in the step size (kernels/adam.py).
EPS_MODES = {"torch": pb.EPS_TORCH, "keras": pb.EPS_KERAS}
EPS_MODE_NAMES = {v: k for k, v in EPS_MODES.items()}

# torch.optim.Adam(W)'s own group keys, kept so that state dicts load both ways.
_TORCH_ADAM_KEYS = dict(amsgrad=False, maximize=False, foreach=None, capturable=False,
                        differentiable=False, fused=None)


def _adam_state(shape: Shape, hyper: pb.Hyperparameters | None) -> dict[str, Shape]:
    fields = {"exp_avg": shape, "exp_avg_sq": shape}
    if hyper is not None and hyper.amsgrad:   # torch's AMSGrad keeps the running max of v
        fields["max_exp_avg_sq"] = shape
    return fields


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


def torch_adafactor_state(shape: Shape, hyper: pb.Hyperparameters | None) -> dict[str, Shape]:
    """torch.optim.Adafactor's row_var / col_var / variance, kept flat under the names of
    the same quantities in transformers' Adafactor (its `peer_state` maps them back)."""
    if len(shape) >= 2:
        return {"exp_avg_sq_row": shape[:-1], "exp_avg_sq_col": shape[:-2] + shape[-1:]}
    return {"exp_avg_sq": shape}


def _check_decoupled(group: Mapping[str, Any], decoupled: bool) -> None:
    """torch.optim.Adam's decoupled_weight_decay switch picks the optimizer: a group may not
    say otherwise than the job's optimizer does."""
    if bool(group.get("decoupled_weight_decay", decoupled)) != decoupled:
        raise ValueError(f"decoupled_weight_decay={not decoupled} in a group of an "
                         f"{'adamw' if decoupled else 'adam'} job: the whole job is "
                         f"{'decoupled (AdamW)' if decoupled else 'coupled L2 (Adam)'}")


def _adam_moments_to_proto(group: Mapping[str, Any], h: pb.Hyperparameters) -> None:
    h.lr = float(group["lr"])
    h.beta1, h.beta2 = (float(b) for b in group["betas"])
    h.eps = float(group["eps"])
    h.weight_decay = float(group["weight_decay"])


def _eps_mode_to_proto(group: Mapping[str, Any], h: pb.Hyperparameters) -> None:
    mode = group.get("eps_mode", "torch")
    if mode not in EPS_MODES:
        raise InvalidArgument(f"eps_mode must be one of {sorted(EPS_MODES)}, got {mode!r}")
    h.eps_mode = EPS_MODES[mode]


def _torch_adam_to_proto(group: Mapping[str, Any], h: pb.Hyperparameters, *,
                         decoupled: bool) -> None:
    _check_decoupled(group, decoupled)
    _adam_moments_to_proto(group, h)
    h.maximize = bool(group.get("maximize", False))
    h.amsgrad = bool(group.get("amsgrad", False))
    _eps_mode_to_proto(group, h)


def _adam_to_proto(group: Mapping[str, Any], h: pb.Hyperparameters) -> None:
    _torch_adam_to_proto(group, h, decoupled=False)


def _decay_mode_to_proto(mode: str, h: pb.Hyperparameters) -> None:
    if mode not in DECAY_MODES:
        raise InvalidArgument(f"weight_decay_mode must be one of {sorted(DECAY_MODES)}, got {mode!r}")
    h.weight_decay_mode = DECAY_MODES[mode]


def _adamw_to_proto(group, h):
    _torch_adam_to_proto(group, h, decoupled=True)
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
    _adam_moments_to_proto(group, h)
    h.maximize = bool(group.get("maximize", False))   # refused: a group may not ask for them
    h.amsgrad = bool(group.get("amsgrad", False))
    _eps_mode_to_proto(group, h)
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
    h.maximize = bool(group.get("maximize", False))   # refused, as a group may not ask for it


# torch.optim.Adafactor's eps1 = None: the machine epsilon of the parameter's dtype, float32
# for every tensor a shard keeps (torch.finfo(torch.float32).eps).
FLOAT32_EPS = 2.0 ** -23


def _torch_adafactor_to_proto(group, h):
    h.lr = float(group["lr"])
    h.decay_rate = float(group["beta2_decay"])
    eps1, eps2 = group["eps"]
    h.eps = FLOAT32_EPS if eps1 is None else float(eps1)
    h.eps2 = float(eps2)
    h.clip_threshold = float(group["d"])
    h.weight_decay = float(group["weight_decay"])
    h.maximize = bool(group.get("maximize", False))


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
    _check(h.eps_mode in EPS_MODE_NAMES, f"unknown eps_mode {h.eps_mode}")
    _finite(h, "lr", "beta1", "beta2", "eps", "weight_decay")
    _check(h.lr >= 0, f"lr must be >= 0, got {h.lr}")
    _check(0 <= h.beta1 < 1 and 0 <= h.beta2 < 1, f"betas must be in [0, 1), got ({h.beta1}, {h.beta2})")
    _check(h.eps >= 0, f"eps must be >= 0, got {h.eps}")
    _check(h.weight_decay >= 0, f"weight_decay must be >= 0, got {h.weight_decay}")
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


def _no_amsgrad(name: str, h: pb.Hyperparameters) -> None:
    _check(not h.amsgrad, f"{name} has no amsgrad")


def _validate_lion(h):
    _no_amsgrad("lion", h)
    _finite(h, "lr", "beta1", "beta2", "weight_decay")
    _check(h.lr >= 0, f"lr must be >= 0, got {h.lr}")
    _check(0 <= h.beta1 <= 1 and 0 <= h.beta2 <= 1, f"betas must be in [0, 1], got ({h.beta1}, {h.beta2})")
    _check(h.weight_decay >= 0, f"weight_decay must be >= 0, got {h.weight_decay}")
    _validate_decay_mode(h)


def _validate_adamp(h):
    _validate_adam(h)
    _no_amsgrad("adamp", h)
    _check(not h.maximize, "adamp has no maximize (adamp.AdamP has none)")
    _check(h.eps_mode == pb.EPS_TORCH, "adamp has no eps_mode (adamp.AdamP places ε as torch)")
    _finite(h, "delta", "wd_ratio")
    _check(h.delta > 0, f"delta must be > 0, got {h.delta}")
    _check(0 <= h.wd_ratio <= 1, f"wd_ratio must be in [0, 1], got {h.wd_ratio}")
    _fits_float32("lr * weight_decay", h.lr * h.weight_decay)   # θ·(1 − lr·λ·ratio)


def _validate_adafactor(h):
    _finite(h, "lr", "eps", "eps2", "clip_threshold", "decay_rate", "weight_decay")
    _check(not h.maximize, "adafactor has no maximize (transformers' Adafactor has none; "
                           "torch.optim.Adafactor's is 'torch_adafactor')")
    _no_amsgrad("adafactor", h)
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


def _validate_torch_adafactor(h):
    """torch.optim.Adafactor's own checks (lr >= 0, beta2_decay <= 0, eps >= 0, d >= 1,
    weight_decay >= 0), and float32 room for what the kernels form: ε1², 1 − lr·λ."""
    _no_amsgrad("torch_adafactor", h)
    _finite(h, "lr", "eps", "eps2", "clip_threshold", "decay_rate", "weight_decay")
    _check(h.lr >= 0, f"lr must be >= 0, got {h.lr}")
    _check(h.decay_rate <= 0, f"beta2_decay must be <= 0, got {h.decay_rate}")
    _check(h.eps >= 0 and h.eps2 >= 0, f"eps must be >= 0, got ({h.eps}, {h.eps2})")
    _check(h.clip_threshold >= 1, f"d must be >= 1, got {h.clip_threshold}")
    _check(h.weight_decay >= 0, f"weight_decay must be >= 0, got {h.weight_decay}")
    _fits_float32("eps[0] squared", h.eps * h.eps)
    _fits_float32("lr * weight_decay", h.lr * h.weight_decay)


def _group_initial_lr(group: Mapping[str, Any], defaults: Mapping[str, Any]) -> float:
    """lr₀ of a group: the `initial_lr` a scheduler recorded, else its lr."""
    return group.get("initial_lr", group["lr"]) or 0.0


def _lion_initial_lr(group: Mapping[str, Any], defaults: Mapping[str, Any]) -> float:
    """lion-pytorch's decoupled decay divides λ by the optimizer's own lr, for every group."""
    return defaults["lr"] if group.get("decoupled_weight_decay") else _group_initial_lr(group, defaults)


def _no_fixed_options(h: pb.Hyperparameters) -> tuple:
    return ()


def _adam_options(h: pb.Hyperparameters) -> tuple:
    return (("amsgrad", h.amsgrad), ("eps_mode", EPS_MODE_NAMES[h.eps_mode]))


def _beta1_option(h: pb.Hyperparameters) -> tuple:
    return (("beta1", "set" if h.HasField("adafactor_beta1") else "None"),)


def _keepdim_row(shape: Shape) -> Shape:
    return shape[:-1] + (1,)


def _keepdim_col(shape: Shape) -> Shape:
    return shape[:-2] + (1,) + shape[-1:]


def _same_shape(shape: Shape) -> Shape:
    return shape


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
    # The options of a group fixed when the job is registered, as (name, value) pairs: a step
    # may not change them, nor a loaded state dict. They decide which state fields its tensors
    # keep (amsgrad, Adafactor's beta1), or which rule the state was built under (eps_mode).
    fixed_options: Callable[[pb.Hyperparameters], tuple] = _no_fixed_options
    # The peer's own name and shape (from the parameter's shape) of a state field, where
    # its state dict differs from the shard's flat fields; state dicts use the peer's.
    peer_state: Mapping[str, tuple[str, Callable[[Shape], Shape]]] = field(default_factory=dict)

    def peer_field(self, name: str, param_shape: Shape) -> tuple[str, Shape | None]:
        """(the peer's name of state field `name`, its shape in the peer's state dict, or
        None where it is the shard's own)."""
        if name in self.peer_state:
            peer_name, shape = self.peer_state[name]
            return peer_name, shape(tuple(param_shape))
        return name, None


REGISTRY: dict[str, OptimizerInfo] = {
    "adamw": OptimizerInfo(  # oracles: torch.optim.AdamW; keras.optimizers.AdamW (eps_mode="keras")
        "adamw",
        dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, weight_decay_mode="lr",
             eps_mode="torch", decoupled_weight_decay=True, **_TORCH_ADAM_KEYS),
        _adamw_to_proto, _validate_adamw, _adam_state, True, fixed_options=_adam_options),
    "adam": OptimizerInfo(  # oracles: torch.optim.Adam; keras.optimizers.Adam (eps_mode="keras")
        "adam",
        dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, eps_mode="torch",
             decoupled_weight_decay=False, **_TORCH_ADAM_KEYS),
        _adam_to_proto, _validate_adam, _adam_state, True, fixed_options=_adam_options),
    "adamp": OptimizerInfo(  # oracle: adamp.AdamP 0.3.0
        "adamp",
        dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, delta=0.1, wd_ratio=0.1,
             nesterov=False),
        _adamp_to_proto, _validate_adamp, _adam_state, False),
    "adafactor": OptimizerInfo(  # oracle: transformers.optimization.Adafactor
        "adafactor",
        dict(lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None,
             weight_decay=0.0, scale_parameter=True, relative_step=True, warmup_init=False),
        _adafactor_to_proto, _validate_adafactor, adafactor_state, False,
        fixed_options=_beta1_option),
    "torch_adafactor": OptimizerInfo(  # oracle: torch.optim.Adafactor
        "torch_adafactor",
        dict(lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0,
             foreach=None, maximize=False),
        _torch_adafactor_to_proto, _validate_torch_adafactor, torch_adafactor_state, True,
        peer_state={"exp_avg_sq_row": ("row_var", _keepdim_row),
                    "exp_avg_sq_col": ("col_var", _keepdim_col),
                    "exp_avg_sq": ("variance", _same_shape)}),
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


# ---- the peers' own classes ----------------------------------------------------------------

# Keyword arguments of torch's optimizers that choose an implementation (a for-loop, foreach,
# fused or graph-capturable kernel, autograd through the step) and change nothing in the
# result: accepted and ignored.
TORCH_SWITCHES = frozenset({"foreach", "fused", "capturable", "differentiable"})


@dataclass(frozen=True)
class PeerClass:
    """An optimizer class that RemoteOptimizer takes in place of a registry name: its own
    keyword arguments, with its own defaults (its signature's; tests/test_registry.py
    reads them off the class), and the registry entry that runs it. Matched by its
    package and qualified name, so that neither side imports the peer's package."""
    path: str                        # where it is imported from, e.g. "torch.optim.AdamW"
    defaults: Mapping[str, Any]
    optimizer: str
    switches: frozenset[str] = frozenset()   # implementation switches, accepted and ignored
    # The registry entry when an argument picks another one: (argument, value, entry).
    variant: tuple[str, Any, str] | None = None

    @property
    def key(self) -> tuple[str, str]:
        package, _, qualname = self.path.rpartition(".")
        return package.partition(".")[0], qualname

    def resolve(self, kwargs: Mapping[str, Any]) -> tuple["OptimizerInfo", dict[str, Any]]:
        """(the registry entry, the param-group defaults) for these keyword arguments, as
        the class would take them; an argument the class does not have is refused by name."""
        unknown = sorted(set(kwargs) - set(self.defaults))
        if unknown:
            ours = [k for k in unknown if k in REGISTRY[self.optimizer].defaults]
            hint = (f" ({', '.join(map(repr, ours))} {'is' if len(ours) == 1 else 'are'} "
                    f"optserve's own: pass optimizer={self.optimizer!r} to use "
                    f"{'it' if len(ours) == 1 else 'them'})") if ours else ""
            raise TypeError(f"{self.path} got unexpected keyword argument"
                            f"{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(map(repr, unknown))}{hint}")
        name = self.optimizer
        if self.variant is not None:
            arg, value, other = self.variant
            if kwargs.get(arg, self.defaults[arg]) == value:
                name = other
        info = REGISTRY[name]
        return info, {**info.defaults, **self.defaults}


_TORCH_ADAM_ARGS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, amsgrad=False, maximize=False,
                        foreach=None, capturable=False, differentiable=False, fused=None)

PEERS: dict[tuple[str, str], PeerClass] = {p.key: p for p in (
    PeerClass("torch.optim.AdamW", dict(_TORCH_ADAM_ARGS, weight_decay=1e-2), "adamw",
              TORCH_SWITCHES),
    # Adam(decoupled_weight_decay=True) is AdamW (with Adam's default weight_decay, 0)
    PeerClass("torch.optim.Adam", dict(_TORCH_ADAM_ARGS, weight_decay=0.0,
                                       decoupled_weight_decay=False), "adam", TORCH_SWITCHES,
              variant=("decoupled_weight_decay", True, "adamw")),
    PeerClass("torch.optim.Adafactor", dict(REGISTRY["torch_adafactor"].defaults),
              "torch_adafactor", frozenset({"foreach"})),
    PeerClass("transformers.optimization.Adafactor", dict(REGISTRY["adafactor"].defaults),
              "adafactor"),
    PeerClass("adamp.AdamP", dict(REGISTRY["adamp"].defaults), "adamp"),
    # use_triton picks lion-pytorch's Triton kernel for CUDA tensors: the same update
    PeerClass("lion_pytorch.Lion", dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0,
                                        use_triton=False, decoupled_weight_decay=False),
              "lion", frozenset({"use_triton"})),
)}


def peer_class(cls: Any) -> PeerClass:
    """The PeerClass of an optimizer class, from its package and qualified name; anything
    else is refused (TypeError), naming what is taken."""
    taken = ", ".join(sorted(p.path for p in PEERS.values()))
    if not isinstance(cls, type):
        raise TypeError(f"optimizer must be a registry name ({', '.join(sorted(REGISTRY))}) or "
                        f"an optimizer class ({taken}), not {type(cls).__name__} "
                        f"{cls!r:.80}" + (" (pass the class, not an instance)"
                                          if hasattr(cls, "param_groups") else ""))
    key = (getattr(cls, "__module__", "").partition(".")[0], cls.__qualname__)
    if key not in PEERS:
        raise TypeError(f"optserve does not run {cls.__module__}.{cls.__qualname__}; it runs "
                        f"{taken} (or a registry name: {', '.join(sorted(REGISTRY))})")
    return PEERS[key]
