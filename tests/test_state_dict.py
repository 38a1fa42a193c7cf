"""state_dict() / load_state_dict() speak torch's format, both ways."""
from __future__ import annotations

import adamp
import lion_pytorch
import pytest
import torch
import transformers.optimization as hf

from keras_oracle import KerasAdam
from models import make_data, make_model, param_groups, train
from optserve.client import RemoteOptimizer


def assert_same_params(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_adamw_state_dict_round_trips_with_torch(shard):
    # torch -> optserve: 10 local steps, then continue remotely.
    local, remote, reference = make_model(), make_model(), make_model()
    torch_opt = torch.optim.AdamW(param_groups(local, 0.1), lr=1e-2)
    ref_opt = torch.optim.AdamW(param_groups(reference, 0.1), lr=1e-2)
    train(local, torch_opt, 10, lambda _: make_data(0))
    train(reference, ref_opt, 10, lambda _: make_data(0))
    remote.load_state_dict(local.state_dict())
    opt = RemoteOptimizer(param_groups(remote, 0.1), "adamw", servers=[shard.address],
                          job="sd", lr=1e-2)
    opt.load_state_dict(torch_opt.state_dict())
    train(remote, opt, 10, lambda _: make_data(2))
    train(reference, ref_opt, 10, lambda _: make_data(2))
    assert_same_params(remote, reference)

    # optserve -> torch: the remote state continues in a local AdamW.
    back = torch.optim.AdamW(param_groups(remote, 0.1), lr=1e-2)
    back.load_state_dict(opt.state_dict())
    assert back.param_groups[0]["decoupled_weight_decay"] is True
    train(remote, back, 10, lambda _: make_data(3))
    train(reference, ref_opt, 10, lambda _: make_data(3))
    assert_same_params(remote, reference)
    opt.close()


def round_trip(shard, cls, job, kwargs, steps=8):
    """torch -> optserve -> torch with the class itself: `steps` local steps of `cls`, the
    state dict into a RemoteOptimizer built with the same class and arguments, `steps`
    remote steps, its state dict back into a fresh `cls`, `steps` more; each leg matches
    a reference that took every step locally. Returns the remote state dict."""
    local, remote, reference = make_model(), make_model(), make_model()
    theirs = cls(param_groups(local, 0.1), **kwargs)
    ref = cls(param_groups(reference, 0.1), **kwargs)
    train(local, theirs, steps, lambda _: make_data(0))
    train(reference, ref, steps, lambda _: make_data(0))
    remote.load_state_dict(local.state_dict())
    opt = RemoteOptimizer(param_groups(remote, 0.1), cls, servers=[shard.address], job=job,
                          **kwargs)
    opt.load_state_dict(theirs.state_dict())
    train(remote, opt, steps, lambda _: make_data(2))
    train(reference, ref, steps, lambda _: make_data(2))
    assert_same_params(remote, reference)

    sd = opt.state_dict()
    back = cls(param_groups(remote, 0.1), **kwargs)
    back.load_state_dict(sd)
    train(remote, back, steps, lambda _: make_data(3))
    train(reference, ref, steps, lambda _: make_data(3))
    assert_same_params(remote, reference)
    opt.close()
    return sd


def test_amsgrad_state_dict_round_trips_with_torch(shard):
    """max_exp_avg_sq travels both ways, with AdamW's (and Adam's) own state names."""
    for cls, job in [(torch.optim.AdamW, "sd-amsgrad"), (torch.optim.Adam, "sd-adam-amsgrad")]:
        sd = round_trip(shard, cls, job, dict(lr=1e-2, amsgrad=True, maximize=cls is torch.optim.Adam))
        state = sd["state"][0]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert sd["param_groups"][0]["amsgrad"] is True


def test_torch_adafactor_state_dict_round_trips_with_torch(shard):
    """torch.optim.Adafactor's row_var / col_var (with their kept dims) and variance."""
    sd = round_trip(shard, torch.optim.Adafactor, "sd-torch-adafactor",
                    dict(lr=2e-2, weight_decay=0.1, eps=(1e-3, 1e-3), beta2_decay=-0.7))
    shapes = {name: tuple(v.shape) for name, v in sd["state"][0].items()}   # conv (6, 3, 3, 3)
    assert shapes == {"step": (), "row_var": (6, 3, 3, 1), "col_var": (6, 3, 1, 3)}
    assert set(sd["state"][3]) == {"step", "variance"}                       # a bias
    assert sd["param_groups"][0]["beta2_decay"] == -0.7


def test_a_state_dict_that_does_not_fit_the_job_is_refused(shard):
    """amsgrad decides the state a job keeps (fixed at registration), and another
    optimizer's state is not silently read as zeros."""
    model = make_model()
    local = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, local, 2, lambda _: make_data(0))
    opt = RemoteOptimizer(model.parameters(), torch.optim.AdamW, servers=[shard.address],
                          job="sd-refused", lr=1e-2, amsgrad=True)
    with pytest.raises(ValueError, match=r"group 0 has \{'amsgrad': False\}, the job was "
                                         r"registered with \{'amsgrad': True\}"):
        opt.load_state_dict(local.state_dict())
    assert opt.param_groups[0]["amsgrad"] is True   # left as it was

    other = hf.Adafactor(model.parameters(), lr=1e-2, relative_step=False)   # groups that fit
    train(model, other, 2, lambda _: make_data(0))
    ours = RemoteOptimizer(model.parameters(), torch.optim.Adafactor, servers=[shard.address],
                           job="sd-refused-adafactor")
    with pytest.raises(ValueError, match=r"has no 'col_var' \(it has \['RMS', 'exp_avg_sq_col', "
                                         r"'exp_avg_sq_row', 'step'\]\)"):
        ours.load_state_dict(other.state_dict())
    opt.close()
    ours.close()


def test_keras_eps_state_dict_says_so_and_no_torch_eps_job_takes_it(shard):
    """Keras's AdamW (tests/keras_oracle.py, its state under torch's names) -> an
    eps_mode="keras" job, which continues as Keras does from the step counts it loaded. Its own
    state dict says eps_mode="keras" in every group, and a job with torch's ε, by class or by
    name, refuses it (torch.optim.AdamW itself would take it and ignore the key)."""
    local, remote, reference = make_model(), make_model(), make_model()
    hyper = dict(lr=1e-2, eps=1e-3, weight_decay=0.1)
    theirs = KerasAdam(param_groups(local, 0.1), decoupled=True, **hyper)
    ref = KerasAdam(param_groups(reference, 0.1), decoupled=True, **hyper)
    train(local, theirs, 8, lambda _: make_data(0))
    train(reference, ref, 8, lambda _: make_data(0))
    remote.load_state_dict(local.state_dict())
    opt = RemoteOptimizer(param_groups(remote, 0.1), "adamw", servers=[shard.address],
                          job="sd-keras", eps_mode="keras", **hyper)
    opt.load_state_dict(theirs.state_dict())
    train(remote, opt, 8, lambda _: make_data(2))
    train(reference, ref, 8, lambda _: make_data(2))
    assert_same_params(remote, reference)

    sd = opt.state_dict()
    assert [g["eps_mode"] for g in sd["param_groups"]] == ["keras", "keras"]
    assert float(sd["state"][0]["step"]) == 16
    for k, optimizer in enumerate((torch.optim.AdamW, "adamw")):
        torch_eps = RemoteOptimizer(param_groups(make_model(), 0.1), optimizer,
                                    servers=[shard.address], job=f"sd-torch-eps-{k}", **hyper)
        with pytest.raises(ValueError, match=r"group 0 has \{'eps_mode': 'keras'\}, the job was "
                                             r"registered with \{'eps_mode': 'torch'\}"):
            torch_eps.load_state_dict(sd)
        assert torch_eps.param_groups[0]["eps_mode"] == "torch"   # left as it was
        torch_eps.close()
    opt.close()


def test_adamp_state_dict_loads_into_adamp_package(shard):
    remote, reference = make_model(), make_model()
    opt = RemoteOptimizer(remote.parameters(), "adamp", servers=[shard.address], job="sd-adamp",
                          lr=1e-2, weight_decay=0.01)
    ref = adamp.AdamP(reference.parameters(), lr=1e-2, weight_decay=0.01)
    train(remote, opt, 5, lambda _: make_data(0))
    train(reference, ref, 5, lambda _: make_data(0))
    sd = opt.state_dict()
    assert sd["state"][0]["step"] == 5 and sd["param_groups"][0]["delta"] == 0.1
    fresh = adamp.AdamP(remote.parameters())
    fresh.load_state_dict(sd)
    train(remote, fresh, 5, lambda _: make_data(4))
    train(reference, ref, 5, lambda _: make_data(4))
    assert_same_params(remote, reference)
    opt.close()


def test_lion_state_dict_round_trips_with_lion_pytorch(shard):
    """lion_pytorch keeps no step count, only exp_avg: its momentum still carries over, both
    ways."""
    local, remote, reference = make_model(), make_model(), make_model()
    theirs = lion_pytorch.Lion(local.parameters(), lr=1e-3, weight_decay=0.1)
    ref = lion_pytorch.Lion(reference.parameters(), lr=1e-3, weight_decay=0.1)
    train(local, theirs, 3, lambda _: make_data(0))
    train(reference, ref, 3, lambda _: make_data(0))
    remote.load_state_dict(local.state_dict())
    opt = RemoteOptimizer(remote.parameters(), "lion", servers=[shard.address], job="sd-lion",
                          lr=1e-3, weight_decay=0.1)
    opt.load_state_dict(theirs.state_dict())
    assert len(opt.state_dict()["state"]) == len(list(remote.parameters()))
    train(remote, opt, 3, lambda _: make_data(5))
    train(reference, ref, 3, lambda _: make_data(5))
    assert_same_params(remote, reference)

    back = lion_pytorch.Lion(remote.parameters(), lr=1e-3, weight_decay=0.1)
    back.load_state_dict(opt.state_dict())
    train(remote, back, 3, lambda _: make_data(6))
    train(reference, ref, 3, lambda _: make_data(6))
    assert_same_params(remote, reference)
    opt.close()


def test_second_worker_starts_from_the_jobs_parameters(shard):
    """A worker joining an existing job takes the shard's parameters, not its own init."""
    first, second = make_model(0), make_model(7)
    opt1 = RemoteOptimizer(first.parameters(), "adamw", servers=[shard.address], job="join",
                           mode="async", rank=0, world_size=2)
    train(first, opt1, 3, lambda _: make_data(0))
    opt2 = RemoteOptimizer(second.parameters(), "adamw", servers=[shard.address], job="join",
                           mode="async", rank=1, world_size=2)
    for p, q in zip(first.parameters(), second.parameters()):
        assert torch.equal(p, q)
    opt1.close()
    opt2.close()
