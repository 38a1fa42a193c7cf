"""Every optimizer the shard runs, by name: one `Kernel` record each (kernels/backend.py),
defined beside its reference and kernels in its own module. The API side of each one
(accepted hyperparameters, validation, state fields) is `optserve.proto.optimizers`, under
the same name; tests/test_registry.py checks that the two registries agree."""
from __future__ import annotations

from optserve.kernels.adafactor import ADAFACTOR
from optserve.kernels.adam import ADAM, ADAMW
from optserve.kernels.adamp import ADAMP
from optserve.kernels.backend import Kernel
from optserve.kernels.lion import LION
from optserve.kernels.torch_adafactor import TORCH_ADAFACTOR

KERNELS: dict[str, Kernel] = {k.name: k for k in (ADAMW, ADAM, ADAMP, ADAFACTOR, TORCH_ADAFACTOR,
                                                  LION)}


def get(name: str) -> Kernel:
    try:
        return KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(KERNELS)}") from None
