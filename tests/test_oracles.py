"""End to end: RemoteOptimizer against a real shard matches the oracle optimizer trained
locally from the same seed, for 50 steps, for every optimizer and mode.

The model has a conv layer, BatchNorm, linear layers with biases, two param groups (one
without weight decay, with its own lr) and an LR scheduler wherever the optimizer takes one.
"""
from __future__ import annotations

import math

import adamp
import lion_pytorch
import pytest
import torch
import transformers.optimization as hf

from models import make_data, make_model, param_groups, train
from optserve.client import RemoteOptimizer
from optserve.proto.optimizers import REGISTRY

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


# name: (optimizer, remote hyperparameters, remote groups, oracle factory, scheduler)
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
}


def minibatches(x, y):
    """Step i trains on the (i mod 4)-th batch of 8."""
    return lambda i: (x[(i % 4) * 8:(i % 4 + 1) * 8], y[(i % 4) * 8:(i % 4 + 1) * 8])


def test_every_registered_optimizer_has_a_case():
    covered = {case[0] for case in CASES.values()}
    assert covered == set(REGISTRY), f"optimizers without an oracle case: {set(REGISTRY) - covered}"


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
    if not isinstance(ref, torch.optim.Adafactor):  # same state names as the oracle
        ours_state, ref_state = opt.state_dict()["state"], ref.state_dict()["state"]
        assert ours_state.keys() == ref_state.keys()
        for k in ref_state:
            for field, value in ref_state[k].items():
                if isinstance(value, torch.Tensor) and value.ndim > 0:
                    torch.testing.assert_close(ours_state[k][field], value, rtol=1e-5, atol=1e-6)
                elif field == "step":
                    assert float(ours_state[k][field]) == float(value)
    opt.close()


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
