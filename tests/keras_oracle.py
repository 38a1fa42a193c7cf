"""Keras 3's own Adam and AdamW, on its torch backend, as a torch optimizer: the oracle of
eps_mode="keras" (tests/test_oracles.py, tests/test_reference.py, tests/test_state_dict.py).

Keras has no param groups, so each group gets its own keras.optimizers.Adam or AdamW over
keras.Variables that start as float64 copies of the group's parameters; before every step it
takes the group's lr and betas (which torch's schedulers set), and after it the parameters
take the variables' values, rounded to float32. Float64, because Keras forms β^t in the
variables' dtype: in float32 its bias correction √(1 − β2^t) is off by ~6e-6 relative
(float32's 0.999 is 0.99900001), which over 50 steps at lr 1e-2 moves a weight by ~2e-6,
Keras's rounding rather than its formula, and more than the oracle tests' tolerance.

Keras has neither `maximize` nor coupled L2: its gradient is −g under maximize, plus λθ for
Adam's L2, as torch.optim.Adam forms them. The state it keeps shows under torch's names
(Keras's momentum, velocity and velocity_hat: m, the raw v and its running maximum), so that
the tests compare it and state dicts carry it.
"""
from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "torch"   # read when keras is first imported
import keras  # noqa: E402
import torch  # noqa: E402

if keras.backend.backend() != "torch":
    raise ImportError(f"the Keras oracle runs on Keras's torch backend; keras was imported with "
                      f"{keras.backend.backend()!r} first")


class KerasAdam(torch.optim.Optimizer):
    """keras.optimizers.AdamW (decoupled=True) or keras.optimizers.Adam, one per param group,
    with torch's argument names; Keras's default ε̂, 1e-7."""

    def __init__(self, params, *, decoupled: bool, lr=1e-3, betas=(0.9, 0.999), eps=1e-7,
                 weight_decay=0.0, amsgrad=False, maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize, eps_mode="keras"))
        self.decoupled = decoupled
        self.keras = []
        for group in self.param_groups:
            cls, decay = ((keras.optimizers.AdamW, {"weight_decay": group["weight_decay"]})
                          if decoupled else (keras.optimizers.Adam, {}))
            opt = cls(learning_rate=group["lr"], beta_1=group["betas"][0],
                      beta_2=group["betas"][1], epsilon=group["eps"], amsgrad=group["amsgrad"],
                      **decay)
            variables = [keras.Variable(p.detach().double()) for p in group["params"]]
            opt.build(variables)
            self.keras.append((opt, variables))

    @torch.no_grad()
    def step(self, closure=None):
        for group, (opt, variables) in zip(self.param_groups, self.keras):
            opt.learning_rate = group["lr"]
            opt.beta_1, opt.beta_2 = group["betas"]
            grads = []
            for p in group["params"]:
                g = -p.grad if group["maximize"] else p.grad
                if not self.decoupled and group["weight_decay"] != 0:
                    g = g.add(p, alpha=group["weight_decay"])   # torch.optim.Adam's L2
                grads.append(g.double())
            opt.apply_gradients(zip(grads, variables))
            for i, (p, var) in enumerate(zip(group["params"], variables)):
                p.copy_(var.value)
                state = {"step": torch.tensor(float(opt.iterations.value)),
                         "exp_avg": opt._momentums[i].value.float(),
                         "exp_avg_sq": opt._velocities[i].value.float()}
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = opt._velocity_hats[i].value.float()
                self.state[p] = state
