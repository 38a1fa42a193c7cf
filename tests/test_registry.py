"""The two registries agree, and every registered optimizer has every part: the API record
(optserve.proto.optimizers: defaults, wire form, validation, state fields) and the kernel
record (optserve.kernels.registry: view, reports, NumPy reference, CPU kernels, CUDA
kernels). Parity and oracle coverage are checked where those tests live
(test_kernels.py, test_reference.py, test_oracles.py each fail on an optimizer without a case)."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from optserve.kernels import Hyper, Report, cuda
from optserve.kernels.backend import View
from optserve.kernels.cuda_runtime import CSRC
from optserve.kernels.registry import KERNELS
from optserve.proto.optimizers import REGISTRY, group_to_proto
from optserve.proto.v1 import optserve_pb2 as pb


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
        assert fields and all(f.startswith("exp_avg") for f in fields)   # torch's names


def test_hyper_mirrors_the_wire_form():
    """Every field of Hyper is a Hyperparameters field of the same name (amsgrad, refused by
    every optimizer, is the one field no kernel reads)."""
    wire = {f.name for f in pb.Hyperparameters.DESCRIPTOR.fields}
    ours = {f.name for f in dataclasses.fields(Hyper)}
    assert ours == wire - {"amsgrad"}


def test_hyper_from_groups_takes_each_tensors_group():
    a = group_to_proto("adafactor", {**REGISTRY["adafactor"].defaults, "beta1": 0.9}, 1e-2)
    b = group_to_proto("adafactor", {**REGISTRY["adafactor"].defaults, "lr": 3e-3,
                                     "relative_step": False, "scale_parameter": False}, 1e-2)
    h = Hyper.from_groups([a, b], [1, 0, 1], lr_divisor=2.0)
    np.testing.assert_array_equal(h.lr, [1.5e-3, 0.0, 1.5e-3])
    assert h.relative_step.dtype == bool and h.relative_step.tolist() == [False, True, False]
    assert np.isnan(h.adafactor_beta1[[0, 2]]).all() and h.adafactor_beta1[1] == 0.9
    assert h.at(1).adafactor_beta1 == 0.9 and isinstance(h.at(1).relative_step, bool)
