"""RemoteOptimizer where torch users put an optimizer: under torchrun, in HF's Trainer and in
Lightning, and the mistakes of a first run (a script run twice, a wrong address) told at once."""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from optserve.client import FailedPrecondition, RemoteOptimizer, Unavailable


def linear(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(6, 3)


def one_step(model, opt, scale: float = 1.0) -> None:
    opt.zero_grad()
    (scale * model(torch.ones(2, 6)).pow(2).sum()).backward()
    opt.step()


def test_rank_and_world_size_come_from_torchrun_s_environment(shard, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("OPTSERVE_SERVERS", shard.address)
    opt = RemoteOptimizer(linear().parameters(), "adamw", job="env", mode="async")
    assert (opt.rank, opt.spec.num_workers) == (1, 2)
    assert shard.store.job("env").spec.num_workers == 2
    opt.close()


def test_two_workers_under_torchrun_step_together(shard, tmp_path):
    """`torchrun --nproc_per_node 2` with neither rank nor servers in the script: both ranks
    end with the parameters torch's AdamW reaches on the mean of their gradients."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import sys, torch, torch.distributed as dist
        from optserve.client import RemoteOptimizer
        dist.init_process_group("gloo")
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        opt = RemoteOptimizer(model.parameters(), "adamw", job="torchrun", lr=0.1)
        for step in range(3):
            opt.zero_grad()
            ((dist.get_rank() + 1) * model(torch.ones(2, 6)).pow(2).sum()).backward()
            opt.step()
        torch.save([p.detach() for p in model.parameters()], sys.argv[1] + f".{dist.get_rank()}")
        opt.close()
        dist.destroy_process_group()
    """))
    out = tmp_path / "params"
    env = {"OPTSERVE_SERVERS": shard.address, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", str(script), str(out)],
                         env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    model = linear()
    oracle = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(3):
        grads = []
        for scale in (1.0, 2.0):
            model.zero_grad()
            (scale * model(torch.ones(2, 6)).pow(2).sum()).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        oracle.step()
    for got in ranks:
        for p, q in zip(got, model.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=1e-6, atol=1e-7)


def test_running_a_script_twice_needs_resume(shard):
    model = linear()
    first = RemoteOptimizer(model.parameters(), "adamw", servers=[shard.address], job="twice")
    one_step(model, first)
    first.close()
    again = linear()
    with pytest.raises(FailedPrecondition, match="resume=True"):
        RemoteOptimizer(again.parameters(), "adamw", servers=[shard.address], job="twice")
    resumed = RemoteOptimizer(again.parameters(), "adamw", servers=[shard.address], job="twice",
                              resume=True)
    assert resumed.version == 1
    for p, q in zip(again.parameters(), model.parameters()):   # it took the job's parameters
        assert torch.equal(p, q)
    one_step(again, resumed)
    assert shard.store.job("twice").version == 2
    resumed.close()


def test_a_closed_optimizer_can_still_delete_its_job(shard):
    model = linear()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[shard.address], job="closed")
    one_step(model, opt)
    opt.close()
    opt.delete_job()
    assert "closed" not in shard.store.jobs
    fresh = RemoteOptimizer(linear().parameters(), "adamw", servers=[shard.address], job="closed")
    assert fresh.version == 0       # a new job: no resume needed
    fresh.close()


def test_a_rank_new_to_the_job_needs_no_resume(shard):
    models = [linear(), linear()]
    opts = [RemoteOptimizer(models[0].parameters(), "adamw", servers=[shard.address],
                            job="late", mode="async", rank=0, world_size=2)]
    one_step(models[0], opts[0])
    opts.append(RemoteOptimizer(models[1].parameters(), "adamw", servers=[shard.address],
                                job="late", mode="async", rank=1, world_size=2))
    one_step(models[1], opts[1])
    assert shard.store.job("late").version == 2
    for o in opts:
        o.close()


def test_an_address_where_no_shard_answers_fails_at_once_naming_it():
    with socket.socket() as s:     # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    start = time.perf_counter()
    with pytest.raises(Unavailable, match=address):
        RemoteOptimizer(linear().parameters(), "adamw", servers=[address], job="nobody",
                        connect_timeout=2.0)
    assert time.perf_counter() - start < 5.0


def test_a_url_is_not_an_address(shard):
    with pytest.raises(ValueError, match="no scheme"):
        RemoteOptimizer(linear().parameters(), "adamw", servers=[f"http://{shard.address}"],
                        job="url")


# ---- frameworks -------------------------------------------------------------------------

def regression(n: int = 256):
    torch.manual_seed(1)
    x = torch.randn(n, 6)
    y = x @ torch.randn(6, 1) + 0.1 * torch.randn(n, 1)
    return x, y


@pytest.fixture
def pypi_kernels(monkeypatch):
    """The repository's root holds kernels/ (optserve.kernels). On sys.path, as pytest run
    from the root puts it, it shadows the PyPI package `kernels` that transformers' Trainer
    imports when it is installed: a user's script, run from anywhere else, never sees this."""
    root = pathlib.Path(__file__).resolve().parents[1]
    monkeypatch.setattr(sys, "path", [p for p in sys.path
                                      if pathlib.Path(p or ".").resolve() != root])
    found = sys.modules.get("kernels")
    if found is not None and root in pathlib.Path(found.__file__ or "").resolve().parents:
        monkeypatch.delitem(sys.modules, "kernels")


@pytest.mark.usefixtures("pypi_kernels")
def test_hf_trainer_trains_with_a_remote_optimizer(shard, tmp_path):
    """Trainer(optimizers=(opt, scheduler)): the loss falls to a tenth of its start."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    x, y = regression()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(6, 1)

        def forward(self, x, labels=None):
            out = self.net(x)
            return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"x": x[i], "labels": y[i]}

    model = Model()
    opt = RemoteOptimizer(model.named_parameters(), "adamw", servers=[shard.address],
                          job="trainer", lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    before = torch.nn.functional.mse_loss(model.net(x), y).item()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=8,
                                          per_device_train_batch_size=32, report_to=[],
                                          save_strategy="no", logging_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=Data(),
                         optimizers=(opt, sched)).train()
    opt.pull_parameters()
    after = torch.nn.functional.mse_loss(model.net(x), y).item()
    assert after < before / 10, (before, after)
    assert shard.store.job("trainer").version == 8 * len(x) // 32
    opt.close()


def test_lightning_trains_with_a_remote_optimizer(shard):
    """configure_optimizers returns a RemoteOptimizer: the loss falls to a tenth of its start."""
    lightning = pytest.importorskip("lightning")
    x, y = regression()
    address = shard.address

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(6, 1)

        def training_step(self, batch, _):
            xb, yb = batch
            return torch.nn.functional.mse_loss(self.net(xb), yb)

        def configure_optimizers(self):
            return RemoteOptimizer(self.parameters(), "adamw", servers=[address],
                                   job="lightning", lr=0.05)

    module = Module()
    before = torch.nn.functional.mse_loss(module.net(x), y).item()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    trainer = lightning.Trainer(max_epochs=8, accelerator="cpu", logger=False,
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False)
    trainer.fit(module, data)
    after = torch.nn.functional.mse_loss(module.net(x), y).item()
    assert after < before / 10, (before, after)
    assert shard.store.job("lightning").version == 8 * len(x) // 32
    trainer.optimizers[0].close()
