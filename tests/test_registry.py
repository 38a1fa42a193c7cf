"""The two registries agree, and every registered optimizer has every part: the API record
(optserve.proto.optimizers: defaults, wire form, validation, state fields) and the kernel
record (optserve.kernels.registry: view, reports, NumPy reference, CPU kernels, CUDA
kernels). Parity and oracle coverage are checked where those tests live
(test_kernels.py, test_reference.py, test_oracles.py each fail on an optimizer without a case).

The peer classes (optserve.proto.optimizers.PEERS) are held to the real classes: their
defaults to the classes' signatures, their state fields to the state the classes keep."""
from __future__ import annotations

import dataclasses
import inspect
import re

import adamp
import lion_pytorch
import numpy as np
import pytest
import torch
import transformers.optimization as hf

from optserve.kernels import Hyper, Report, cuda
from optserve.kernels.backend import View
from optserve.kernels.cuda_runtime import CSRC
from optserve.kernels.registry import KERNELS
from optserve.client import RemoteOptimizer
from optserve.proto.optimizers import PEERS, REGISTRY, group_to_proto, peer_class
from optserve.proto.v1 import optserve_pb2 as pb

CLASSES = [torch.optim.AdamW, torch.optim.Adam, torch.optim.Adafactor, adamp.AdamP, hf.Adafactor,
           lion_pytorch.Lion]


def test_the_api_and_the_kernels_register_the_same_optimizers():
    assert set(KERNELS) == set(REGISTRY)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_every_part_is_there(name):
    kernel = KERNELS[name]
    assert kernel.name == name and kernel.info is REGISTRY[name]
    assert isinstance(kernel.view, View)
    assert all(isinstance(r, Report) for r in kernel.reports)
    assert callable(kernel.reference) and callable(kernel.cpu) and callable(kernel.cuda.run)
    source = (CSRC / kernel.cuda.source).read_text()
    defined = set(re.findall(r'extern "C" __global__ void __launch_bounds__\(BLOCK\)\s*(\w+)\(',
                             source))
    assert kernel.cuda.kernels and set(kernel.cuda.kernels) <= defined
    assert set(kernel.cuda.kernels) <= set(cuda.kernel_names())


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_defaults_pass_their_own_validation_and_name_their_state(name):
    info = REGISTRY[name]
    h = group_to_proto(name, info.defaults, initial_lr=info.defaults["lr"] or 1e-2)
    for shape in [(7,), (4, 5), (2, 3, 4)]:
        fields = info.state_fields(shape, h)
        assert fields and all(f.startswith("exp_avg") for f in fields)   # the shard's names


def test_hyper_mirrors_the_wire_form():
    """Every field of Hyper is a Hyperparameters field of the same name."""
    wire = {f.name for f in pb.Hyperparameters.DESCRIPTOR.fields}
    ours = {f.name for f in dataclasses.fields(Hyper)}
    assert ours == wire


# ---- the peer classes ----------------------------------------------------------------------

def test_every_optimizer_class_is_a_peer_and_every_entry_has_one():
    assert {peer_class(cls).path for cls in CLASSES} == {p.path for p in PEERS.values()}
    assert {p.optimizer for p in PEERS.values()} == set(REGISTRY)
    for cls in CLASSES:   # the path is where the class is imported from
        module, _, name = peer_class(cls).path.rpartition(".")
        assert getattr(__import__(module, fromlist=[name]), name) is cls


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__qualname__)
def test_peer_defaults_are_the_class_signature(cls):
    """A peer's keyword arguments and defaults are read off the class itself."""
    signature = inspect.signature(cls.__init__).parameters
    theirs = {k: p.default for k, p in signature.items() if k not in ("self", "params")}
    assert peer_class(cls).defaults == theirs


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__qualname__)
def test_implementation_switches_change_nothing_on_the_wire(cls):
    peer = peer_class(cls)
    info, defaults = peer.resolve({})
    plain = group_to_proto(info.name, defaults, 1e-2)
    for switch in peer.switches:
        assert switch in peer.defaults
        for value in (True, False, None):
            assert group_to_proto(info.name, {**defaults, switch: value}, 1e-2) == plain


# (class, keyword arguments): each option that changes which state the class keeps
STATE_CASES = [(torch.optim.AdamW, {}), (torch.optim.AdamW, {"amsgrad": True}),
               (torch.optim.Adam, {"amsgrad": True, "decoupled_weight_decay": True}),
               (torch.optim.Adafactor, {}), (hf.Adafactor, {}), (hf.Adafactor, {"beta1": 0.9}),
               (adamp.AdamP, {}), (lion_pytorch.Lion, {})]


@pytest.mark.parametrize("cls,kwargs", STATE_CASES,
                         ids=[f"{c.__qualname__}-{'-'.join(k) or 'defaults'}" for c, k in STATE_CASES])
def test_state_fields_are_the_state_the_class_keeps(cls, kwargs):
    """After one step of the real class, its state holds, per parameter, exactly the buffers
    (names and shapes) that optserve's state dict gives it."""
    shapes = [(7,), (4, 5), (2, 3, 4), (3, 1)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape)
    opt = cls(params, **kwargs)
    opt.step()
    info, defaults = peer_class(cls).resolve(kwargs)
    h = group_to_proto(info.name, {**defaults, **kwargs}, defaults["lr"] or 1e-2)
    for p, shape in zip(params, shapes):
        theirs = {k: tuple(v.shape) for k, v in opt.state[p].items()
                  if isinstance(v, torch.Tensor) and v.ndim > 0}
        ours = {}
        for name, field_shape in info.state_fields(shape, h).items():
            peer_name, peer_shape = info.peer_field(name, shape)
            ours[peer_name] = peer_shape or field_shape
        assert ours == theirs, (shape, ours, theirs)
        if "step" in opt.state[p]:   # lion-pytorch keeps none
            assert isinstance(opt.state[p]["step"], torch.Tensor) == info.step_is_tensor


def _remote(cls, **kwargs):
    """The constructor, up to where it would connect: argument errors come first."""
    model = torch.nn.Linear(3, 2)
    return RemoteOptimizer(model.parameters(), cls, servers=["127.0.0.1:9"], job="refused",
                           rpc_timeout=0.1, retries=1, **kwargs)


@pytest.mark.parametrize("cls,kwargs,message", [
    (torch.optim.AdamW, {"weight_decay_mode": "fixed"},
     r"torch.optim.AdamW got unexpected keyword argument 'weight_decay_mode' \('weight_decay_mode' "
     r"is optserve's own: pass optimizer='adamw'"),
    (torch.optim.Adam, {"lr": 1e-3, "amsgard": True}, r"torch.optim.Adam got unexpected keyword argument 'amsgard'"),
    (torch.optim.Adafactor, {"relative_step": False}, r"'relative_step'"),
    (hf.Adafactor, {"maximize": True}, r"transformers.optimization.Adafactor got unexpected .* 'maximize'"),
    (adamp.AdamP, {"amsgrad": True}, r"adamp.AdamP got unexpected keyword argument 'amsgrad'"),
    (lion_pytorch.Lion, {"maximize": True}, r"'maximize' is optserve's own: pass optimizer='lion'"),
    (torch.optim.Adam, {"eps_mode": "keras"},
     r"'eps_mode' is optserve's own: pass optimizer='adam'"),
    (torch.optim.SGD, {}, r"optserve does not run torch.optim.sgd.SGD; it runs adamp.AdamP, "),
])
def test_a_class_refuses_what_it_does_not_take_by_name(cls, kwargs, message):
    with pytest.raises(TypeError, match=message):
        _remote(cls, **kwargs)


@pytest.mark.parametrize("optimizer,group,message", [
    ("adamp", {"maximize": True}, "adamp has no maximize"),
    ("adamp", {"amsgrad": True}, "adamp has no amsgrad"),
    ("adamp", {"eps_mode": "keras"}, "adamp has no eps_mode"),
    ("adamw", {"eps_mode": "tf"}, r"eps_mode must be one of \['keras', 'torch'\], got 'tf'"),
    ("adafactor", {"maximize": True}, "adafactor has no maximize"),
    ("adam", {"decoupled_weight_decay": True}, "decoupled_weight_decay=True in a group of an adam job"),
    ("torch_adafactor", {"d": 0.5}, r"d must be >= 1"),
    ("torch_adafactor", {"beta2_decay": 0.1}, r"beta2_decay must be <= 0"),
    ("torch_adafactor", {"eps": (1e20, 1e-3)}, r"eps\[0\] squared must be finite in float32"),
])
def test_a_group_option_the_optimizer_lacks_is_refused_by_name(optimizer, group, message):
    """In a param group (where torch takes any key), when the optimizer is built."""
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=message):
        RemoteOptimizer([{"params": model.parameters(), **group}], optimizer,
                        servers=["127.0.0.1:9"], job="refused", rpc_timeout=0.1, retries=1)


def test_an_instance_is_refused_with_a_hint():
    instance = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    with pytest.raises(TypeError, match="pass the class, not an instance"):
        _remote(instance)


def test_adam_with_decoupled_weight_decay_runs_as_adamw_with_adams_defaults():
    info, defaults = peer_class(torch.optim.Adam).resolve({"decoupled_weight_decay": True})
    assert info.name == "adamw" and defaults["weight_decay"] == 0.0
    info, defaults = peer_class(torch.optim.AdamW).resolve({})
    assert info.name == "adamw" and defaults["weight_decay"] == 1e-2
    assert peer_class(torch.optim.Adam).resolve({})[0].name == "adam"


def test_hyper_from_groups_takes_each_tensors_group():
    a = group_to_proto("adafactor", {**REGISTRY["adafactor"].defaults, "beta1": 0.9}, 1e-2)
    b = group_to_proto("adafactor", {**REGISTRY["adafactor"].defaults, "lr": 3e-3,
                                     "relative_step": False, "scale_parameter": False}, 1e-2)
    h = Hyper.from_groups([a, b], [1, 0, 1], lr_divisor=2.0)
    np.testing.assert_array_equal(h.lr, [1.5e-3, 0.0, 1.5e-3])
    assert h.relative_step.dtype == bool and h.relative_step.tolist() == [False, True, False]
    assert np.isnan(h.adafactor_beta1[[0, 2]]).all() and h.adafactor_beta1[1] == 0.9
    assert h.at(1).adafactor_beta1 == 0.9 and isinstance(h.at(1).relative_step, bool)
