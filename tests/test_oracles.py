"""End to end: RemoteOptimizer against a real shard matches the oracle optimizer trained
locally from the same seed, for 50 steps, for every optimizer and mode.

The model has a conv layer, BatchNorm, linear layers with biases, two param groups (one
without weight decay, with its own lr) and an LR scheduler wherever the optimizer takes one.
Cases name the optimizer by its registry name, or by the oracle's own class
(`RemoteOptimizer(groups, torch.optim.AdamW, amsgrad=True)`), which is then built with the
very same arguments and groups: every option of every class, each pair of amsgrad, weight
decay and maximize in some group. eps_mode="keras" is held to Keras itself
(tests/keras_oracle.py), at ε̂ = 1e-3, where its placement shows within a few steps, and at
Keras's default 1e-7.
"""
from __future__ import annotations

import math

import adamp
import lion_pytorch
import pytest
import torch
import transformers.optimization as hf

from keras_oracle import KerasAdam
from models import make_data, make_model, param_groups, train
from optserve.client import RemoteOptimizer
from optserve.proto.optimizers import REGISTRY, peer_class

STEPS = 50
LR = 1e-2
WD = 0.1


def cosine(opt):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=1e-4)


def one_cycle(opt):
    # cycles betas[0] as well as lr: the Step must carry both.
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=STEPS)


def step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)


def to_zero(opt):
    """Linear decay that reaches lr = 0 two thirds of the way and stays there (a warm-up
    and decay schedule's end, or a frozen group)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1 - i / (STEPS * 2 // 3)))


def groups_lr(model, wd, named=False):
    """Two groups; the second has no weight decay and half the learning rate."""
    groups = param_groups(model, wd, named)
    groups[1]["lr"] = LR / 2
    return groups


def decaying_groups(model):
    """groups_lr, with weight decay in the second group too."""
    groups = groups_lr(model, 1.0)
    groups[1]["weight_decay"] = 0.5
    return groups


def schedule_oracle_groups(model):
    """torch's AdamW with λ/lr₀ per group is the oracle for θ ← θ(1 − (lr/lr₀)·λ)."""
    groups = groups_lr(model, WD)
    for g in groups:
        g["weight_decay"] = g["weight_decay"] / g.get("lr", LR)
    return groups


def class_groups(model, **second):
    """Two groups: the weights take the constructor's arguments, the biases and BatchNorm
    `second`'s (and half the lr)."""
    groups = param_groups(model, 0.0)
    del groups[0]["weight_decay"]
    groups[1].update({"lr": LR / 2, **second})
    return groups


def same_class(cls, kwargs, second, scheduler=None):
    """A case whose oracle is `cls` itself, with the same arguments and groups."""
    return (cls, kwargs, lambda m: class_groups(m, **second),
            lambda m: cls(class_groups(m, **second), **kwargs), scheduler)


def complements(cls, options, lr, scheduler):
    """Cases that cover every combination of `options` (name: its "on" value; off is the
    class's plain value) between the two groups: each case takes a combination with the
    first option on in the constructor (the weights' group) and its complement in the second
    group, so that each option is on in the constructor in some case."""
    names = list(options)
    off = {"amsgrad": False, "maximize": False, "weight_decay": 0.0}
    cases = {}
    for bits in range(1, 2 ** len(names), 2):
        first = {n: options[n] if bits >> i & 1 else off[n] for i, n in enumerate(names)}
        second = {n: off[n] if bits >> i & 1 else options[n] for i, n in enumerate(names)}
        label = "-".join(n for n in names if first[n] != off[n]) or "plain"
        cases[f"{cls.__module__.split('.')[0]}.{cls.__name__}:{label}"] = same_class(
            cls, dict(first, lr=lr), second, scheduler)
    return cases


def keras_groups(model, **second):
    """groups_lr, with `second`'s options in the second group."""
    groups = groups_lr(model, WD)
    groups[1].update(second)
    return groups


def keras_case(optimizer, hyper, second, scheduler):
    """eps_mode="keras" against keras.optimizers.AdamW or Adam with the same arguments (the
    weights decay, the second group takes `second`)."""
    return (optimizer, dict(hyper, eps_mode="keras"), lambda m: keras_groups(m, **second),
            lambda m: KerasAdam(keras_groups(m, **second), decoupled=optimizer == "adamw",
                                **hyper), scheduler)


ADAM_OPTIONS = dict(amsgrad=True, weight_decay=WD, maximize=True)
ADAFACTOR_OPTIONS = dict(weight_decay=WD, maximize=True)

# name: (optimizer (registry name or class), remote hyperparameters, remote groups,
#        oracle factory, scheduler)
CASES = {
    "adamw-lr": ("adamw", dict(lr=LR, weight_decay=WD),
                 lambda m: groups_lr(m, WD, named=True),
                 lambda m: torch.optim.AdamW(groups_lr(m, WD), lr=LR), cosine),
    "adamw-schedule": ("adamw", dict(lr=LR, weight_decay_mode="schedule"),
                       lambda m: groups_lr(m, WD, named=True),
                       lambda m: torch.optim.AdamW(schedule_oracle_groups(m), lr=LR), cosine),
    "adamw-fixed": ("adamw", dict(lr=LR, weight_decay_mode="fixed"),
                    lambda m: groups_lr(m, 1e-3),
                    lambda m: torch.optim.AdamW(
                        [dict(g, weight_decay=g["weight_decay"] / g.get("lr", LR))
                         for g in groups_lr(m, 1e-3)], lr=LR), None),
    "adamw-maximize": ("adamw", dict(lr=LR, weight_decay=WD, maximize=True),
                       lambda m: groups_lr(m, WD),
                       lambda m: torch.optim.AdamW(groups_lr(m, WD), lr=LR, maximize=True), step_lr),
    "adam-l2": ("adam", dict(lr=LR, betas=(0.9, 0.99)),
                lambda m: groups_lr(m, WD),
                lambda m: torch.optim.Adam(groups_lr(m, WD), lr=LR, betas=(0.9, 0.99)), one_cycle),
    "adamp": ("adamp", dict(lr=LR),
              lambda m: groups_lr(m, 0.0),
              lambda m: adamp.AdamP(groups_lr(m, 0.0), lr=LR), cosine),
    "adamp-wd-nesterov": ("adamp", dict(lr=LR, nesterov=True),
                          lambda m: groups_lr(m, WD),
                          lambda m: adamp.AdamP(groups_lr(m, WD), lr=LR, nesterov=True), cosine),
    "adamp-wd": ("adamp", dict(lr=LR, delta=0.2),
                 lambda m: groups_lr(m, WD),
                 lambda m: adamp.AdamP(groups_lr(m, WD), lr=LR, delta=0.2), step_lr),
    "adafactor-relative": ("adafactor", dict(),
                           lambda m: param_groups(m, 0.0),
                           lambda m: hf.Adafactor(param_groups(m, 0.0)), None),
    "adafactor-warmup-beta1": ("adafactor", dict(warmup_init=True, beta1=0.9, clip_threshold=0.5),
                               lambda m: param_groups(m, 0.01),
                               lambda m: hf.Adafactor(param_groups(m, 0.01), warmup_init=True,
                                                      beta1=0.9, clip_threshold=0.5), None),
    "adafactor-lr": ("adafactor", dict(lr=LR, relative_step=False, decay_rate=-0.5),
                     lambda m: groups_lr(m, WD),
                     lambda m: hf.Adafactor(groups_lr(m, WD), lr=LR, relative_step=False,
                                            decay_rate=-0.5), cosine),
    "adafactor-lr-unscaled": ("adafactor", dict(lr=1e-3, relative_step=False, scale_parameter=False,
                                                beta1=0.8),
                              lambda m: param_groups(m, 0.0),
                              lambda m: hf.Adafactor(param_groups(m, 0.0), lr=1e-3,
                                                     relative_step=False, scale_parameter=False,
                                                     beta1=0.8), step_lr),
    "adafactor-lr-to-zero": ("adafactor", dict(lr=LR, relative_step=False),
                             lambda m: groups_lr(m, WD),
                             lambda m: hf.Adafactor(groups_lr(m, WD), lr=LR, relative_step=False),
                             to_zero),
    "adafactor-vs-torch": ("adafactor", dict(),
                           lambda m: param_groups(m, 0.0),
                           lambda m: torch.optim.Adafactor(param_groups(m, 0.0), lr=1e-2), None),
    "lion": ("lion", dict(lr=1e-3, weight_decay=WD),
             lambda m: groups_lr(m, WD),
             lambda m: lion_pytorch.Lion(groups_lr(m, WD), lr=1e-3, weight_decay=WD), cosine),
    # both groups decay, at different lrs: lion-pytorch divides λ by its constructor's lr
    "lion-decoupled": ("lion", dict(lr=LR, betas=(0.95, 0.98), decoupled_weight_decay=True),
                       lambda m: decaying_groups(m),
                       lambda m: lion_pytorch.Lion(decaying_groups(m), lr=LR, betas=(0.95, 0.98),
                                                   decoupled_weight_decay=True), step_lr),
    # ---- Keras's ε̂ (eps_mode="keras"): amsgrad, maximize and weight decay in some group ----
    "adamw-keras-eps1e-3": keras_case("adamw", dict(lr=LR, eps=1e-3), {"maximize": True}, cosine),
    "adamw-keras-eps1e-7-amsgrad": keras_case("adamw", dict(lr=LR, eps=1e-7, amsgrad=True), {},
                                              step_lr),
    "adam-keras-eps1e-3-amsgrad": keras_case("adam", dict(lr=LR, eps=1e-3),
                                             {"amsgrad": True, "maximize": True}, one_cycle),
    "adam-keras-eps1e-7": keras_case("adam", dict(lr=LR, eps=1e-7, betas=(0.9, 0.99)), {},
                                     cosine),
    # ---- the classes themselves, with their own arguments and defaults ----
    **complements(torch.optim.AdamW, ADAM_OPTIONS, LR, cosine),
    **complements(torch.optim.Adam, ADAM_OPTIONS, LR, one_cycle),
    "torch.AdamW:defaults": same_class(torch.optim.AdamW, {}, {}),   # lr 1e-3, λ 1e-2
    # Adam(decoupled_weight_decay=True) is AdamW, with Adam's own default λ (0) in group 2
    "torch.Adam:decoupled-amsgrad": same_class(
        torch.optim.Adam, dict(lr=LR, weight_decay=WD, decoupled_weight_decay=True,
                               amsgrad=True, foreach=True, fused=False), {"maximize": True}, step_lr),
    **complements(torch.optim.Adafactor, ADAFACTOR_OPTIONS, 1e-2, None),
    "torch.Adafactor:eps-d-beta2_decay-lr": same_class(
        torch.optim.Adafactor, dict(lr=0.05, eps=(1e-3, 1e-2), d=1.5, beta2_decay=-0.6,
                                    weight_decay=WD), {"eps": (None, 0.1), "d": 1.0}, cosine),
    # foreach is torch's other implementation: the oracle runs it, optserve ignores it
    "torch.Adafactor:defaults-foreach": same_class(torch.optim.Adafactor, dict(foreach=True),
                                                   {"weight_decay": 0.5}, step_lr),
    "adamp.AdamP:nesterov": same_class(adamp.AdamP, dict(lr=LR, weight_decay=WD, nesterov=True),
                                       {"delta": 0.2}, cosine),
    "transformers.Adafactor:beta1": same_class(hf.Adafactor, dict(beta1=0.9, weight_decay=0.01),
                                               {"clip_threshold": 0.5, "lr": None}),
    "lion_pytorch.Lion:weight_decay": same_class(lion_pytorch.Lion, dict(lr=1e-3, weight_decay=WD,
                                                                      use_triton=False), {}, cosine),
}


def minibatches(x, y):
    """Step i trains on the (i mod 4)-th batch of 8."""
    return lambda i: (x[(i % 4) * 8:(i % 4 + 1) * 8], y[(i % 4) * 8:(i % 4 + 1) * 8])


def registry_name(optimizer, hyper) -> str:
    if isinstance(optimizer, str):
        return optimizer
    return peer_class(optimizer).resolve(hyper)[0].name


def test_every_registered_optimizer_has_a_case():
    covered = {registry_name(case[0], case[1]) for case in CASES.values()}
    assert covered == set(REGISTRY), f"optimizers without an oracle case: {set(REGISTRY) - covered}"


def test_every_optimizer_class_has_a_case_and_every_option_pair_a_group():
    """Each class is a case; for Adam and AdamW every combination of amsgrad, weight decay
    and maximize, and for torch's Adafactor of weight decay and maximize, is some group's."""
    classes = {case[0] for case in CASES.values() if not isinstance(case[0], str)}
    assert classes == {torch.optim.AdamW, torch.optim.Adam, torch.optim.Adafactor, adamp.AdamP,
                       hf.Adafactor, lion_pytorch.Lion}
    for cls, options in [(torch.optim.AdamW, ADAM_OPTIONS), (torch.optim.Adam, ADAM_OPTIONS),
                         (torch.optim.Adafactor, ADAFACTOR_OPTIONS)]:
        seen = set()
        for optimizer, hyper, remote_groups, _, _ in CASES.values():
            if optimizer is cls:
                for group in remote_groups(make_model()):
                    merged = {**peer_class(cls).defaults, **hyper, **group}
                    seen.add(tuple(bool(merged[n]) for n in options))
        assert len(seen) == 2 ** len(options), (cls, seen)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_oracle(shard, case):
    optimizer, hyper, remote_groups, oracle, scheduler = CASES[case]
    x, y = make_data()
    ours, theirs = make_model(), make_model()
    opt = RemoteOptimizer(remote_groups(ours), optimizer, servers=[shard.address], job=case, **hyper)
    ref = oracle(theirs)
    batches = minibatches(x, y)
    train(ours, opt, STEPS, batches, scheduler(opt) if scheduler else None)
    train(theirs, ref, STEPS, batches, scheduler(ref) if scheduler else None)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    if keeps_the_same_state(opt, ref):
        ours_state, ref_state = opt.state_dict()["state"], ref.state_dict()["state"]
        assert ours_state.keys() == ref_state.keys()
        for k in ref_state:
            for field, value in ref_state[k].items():
                if isinstance(value, torch.Tensor) and value.ndim > 0:
                    torch.testing.assert_close(ours_state[k][field], value, rtol=1e-5, atol=1e-6)
                elif field == "step":
                    assert float(ours_state[k][field]) == float(value)
    opt.close()


def keeps_the_same_state(opt, ref) -> bool:
    """Whether the oracle keeps the job's state under the same names: a class of the same
    registry entry, or Keras (whose state tests/keras_oracle.py names as torch does)."""
    if isinstance(ref, KerasAdam):
        return True
    peer = peer_class(type(ref))
    return opt.info.name in (peer.optimizer, peer.variant and peer.variant[2])


def test_two_shards_match_oracle(shards):
    """One job spread over two shards takes the same steps as a local AdamW."""
    x, y = make_data()
    ours, theirs = make_model(), make_model()
    opt = RemoteOptimizer(groups_lr(ours, WD), "adamw", servers=[s.address for s in shards],
                          job="two-shards", lr=LR)
    ref = torch.optim.AdamW(groups_lr(theirs, WD), lr=LR)
    train(ours, opt, STEPS, minibatches(x, y), cosine(opt))
    train(theirs, ref, STEPS, minibatches(x, y), cosine(ref))
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    held = [len(s.store.job("two-shards").tensors) for s in shards]
    assert all(held) and sum(held) == len(list(ours.parameters()))


def test_parameters_without_grad_are_left_alone(shard):
    """As in torch: a parameter whose .grad is None is not stepped, not even decayed."""
    x, y = make_data()
    ours, theirs = make_model(), make_model()
    for m in (ours, theirs):
        m.fc2.weight.requires_grad_(False)
    opt = RemoteOptimizer(ours.parameters(), "adamw", servers=[shard.address], job="frozen",
                          lr=LR, weight_decay=WD)
    ref = torch.optim.AdamW(theirs.parameters(), lr=LR, weight_decay=WD)
    frozen = ours.fc2.weight.detach().clone()
    train(ours, opt, STEPS, minibatches(x, y))
    train(theirs, ref, STEPS, minibatches(x, y))
    assert torch.equal(ours.fc2.weight, frozen)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    sd = opt.state_dict()
    assert len(sd["state"]) == len(ref.state_dict()["state"])


def test_step_closure_returns_loss(shard):
    x, y = make_data()
    model = make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[shard.address], job="closure")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure)
    assert isinstance(first, torch.Tensor) and math.isfinite(first.item())
    expected = torch.nn.functional.cross_entropy(make_model()(x), y)
    torch.testing.assert_close(first, expected)
