"""An example worker of an Indexed Job: trains a small regression model through the shards.

RemoteOptimizer takes its rank, world size and shard addresses from RANK, WORLD_SIZE and
OPTSERVE_SERVERS (job.yaml sets them from the completion index and the shards' DNS names),
so the training code names none of them. The job's name, its bearer token and the CA of the
shards' certificate come from OPTSERVE_JOB, OPTSERVE_TOKEN_FILE and OPTSERVE_TLS_CA. A pod
that fails comes back with the same index and takes its rank back (resume=True) at the step
the job has reached; a shard that restored an older checkpoint rolls the job back
(RolledBack), and training replays from there.
"""
from __future__ import annotations

import json
import os
import pathlib

import torch

from optserve.client import RemoteOptimizer, RolledBack


def main() -> None:
    steps = int(os.environ.get("STEPS", "200"))
    token_file = os.environ.get("OPTSERVE_TOKEN_FILE")
    torch.manual_seed(0)   # every rank builds the same initial model
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = RemoteOptimizer(
        model.named_parameters(), "adamw", job=os.environ["OPTSERVE_JOB"], lr=1e-2,
        resume=True,   # a restarted pod continues its rank
        token=pathlib.Path(token_file).read_text().strip() if token_file else None,
        tls_ca=os.environ.get("OPTSERVE_TLS_CA"),
        connect_timeout=60,   # the shards may still be starting
        retries=60)           # ~4 minutes of retries: a shard rescheduled, restoring
    target = torch.randn(16, generator=torch.Generator().manual_seed(1))
    step, loss = opt.version, None
    while step < steps:
        # Each rank draws its own batch for this step: a replayed step draws the same one.
        g = torch.Generator().manual_seed(1000 * step + opt.rank)
        x = torch.randn(64, 16, generator=g)
        try:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x).squeeze(1), x @ target)
            loss.backward()
            opt.step()
            step += 1
        except RolledBack as e:
            step = e.step
    print(json.dumps({"rank": opt.rank, "world_size": opt.spec.num_workers, "steps": step,
                      "loss": None if loss is None else loss.item()}), flush=True)
    opt.close()


if __name__ == "__main__":
    main()
