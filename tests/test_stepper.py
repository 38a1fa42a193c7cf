"""Steps taken in parts on the job's stepper thread while their replies stream out
(server/stepper.py). A part is at least one reply chunk (4 MiB), so only large steps take
that path; here the floor is 16 bytes (the cap of 16 parts a step still holds), so small
models take it. The oracle tests of training in sync and async mode run both ways too
(the `step_path` fixture in conftest.py)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from models import make_model, train
from optserve.client import Internal, RemoteOptimizer, Unavailable, delete_job
from optserve.kernels import get_backend
from optserve.server import ShardConfig, ShardServer
from optserve.server.checkpoint import Checkpointer
from support import DEVICE, steps_in_parts

# The backend the shards here run; tests make its step fail or slow.
BACKEND = get_backend(DEVICE)


@pytest.fixture(autouse=True)
def small_parts(monkeypatch):
    """Every step of these tests runs on the stepper, in parts of 16 bytes or more; and did."""
    started = steps_in_parts(monkeypatch)
    yield
    assert started, "no step ran on the stepper"


def test_checkpoints_written_by_the_stepper_hold_their_version(tmp_path):
    """A checkpoint due at a step is written by that step's stepper run: each one holds the
    parameters of its own version, against torch's AdamW taken as many steps."""
    server = ShardServer(ShardConfig(port=0, device=DEVICE, checkpoint_dir=str(tmp_path),
                         checkpoint_every=1)).start()
    try:
        model, ref_model = make_model(), make_model()
        opt = RemoteOptimizer(model.parameters(), "adamw", servers=[server.address],
                              job="ckpt", lr=1e-2)
        ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
        reader = Checkpointer(tmp_path, keep=3)
        for version in range(1, 4):
            train(model, opt, 1)
            train(ref_model, ref, 1)
            manifest, _spec, state = reader.load_version("ckpt", version)
            assert manifest["version"] == version and manifest["worker_steps"] == {"0": version}
            flat = torch.cat([q.detach().reshape(-1) for q in ref_model.parameters()])
            torch.testing.assert_close(torch.from_numpy(state.param), flat, rtol=1e-5, atol=1e-6)
        opt.close()
    finally:
        server.stop(grace=0)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_step_that_fails_on_the_stepper_is_internal_and_the_job_goes_on(shard, monkeypatch,
                                                                          mode):
    """A backend failure halfway through a step (a fault no input can cause, so the backend
    is made to raise) ends the call with INTERNAL and does not wedge the job: reads wait
    only for the failed step, its retry is answered as a late step, and the next step runs."""
    model = make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[shard.address], job="fails",
                          mode=mode, lr=1e-2, rpc_timeout=30)
    step, calls = BACKEND.step, []

    def second_call_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("no room for the second part")
        return step(*args, **kwargs)

    monkeypatch.setattr(BACKEND, "step", second_call_fails)
    with pytest.raises(Internal, match="the step failed before its reply was written"):
        train(model, opt, 1)
    monkeypatch.setattr(BACKEND, "step", step)
    opt.pull_parameters()
    job = shard.store.job("fails")
    assert job.version == 1 and job.stepper.pending == 0 and not job.stepper.reading
    train(model, opt, 2)
    assert opt.dropped_steps == 1 and job.version == 2
    opt.close()


def test_reads_are_not_starved_by_a_busy_stepper(shard, monkeypatch):
    """Three async workers keep the stepper busy without a pause (each backend call is
    slowed to make sure of it); pulls and state reads of a fourth still get their turn."""
    step = BACKEND.step

    def slow_step(*args, **kwargs):
        time.sleep(0.005)
        return step(*args, **kwargs)

    monkeypatch.setattr(BACKEND, "step", slow_step)
    models = [make_model() for _ in range(3)]
    opts = [RemoteOptimizer(m.parameters(), "adamw", servers=[shard.address], job="busy",
                            rank=r, world_size=4, mode="async", lr=1e-3)
            for r, m in enumerate(models)]
    stop = threading.Event()

    def work(m, o):
        while not stop.is_set():
            train(m, o, 1)

    threads = [threading.Thread(target=work, args=mo) for mo in zip(models, opts)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        reader = RemoteOptimizer(make_model().parameters(), "adamw", servers=[shard.address],
                                 job="busy", rank=3, world_size=4, mode="async", lr=1e-3,
                                 rpc_timeout=10, retries=0)
        before = shard.store.job("busy").version
        for _ in range(3):
            reader.pull_parameters()
            reader.state_dict()
        assert shard.store.job("busy").version > before   # the workers kept stepping
    finally:
        stop.set()
        for t in threads:
            t.join()
    for o in opts:
        o.close()


def test_a_name_is_reserved_until_its_deletion_has_cleaned_up(tmp_path, monkeypatch):
    """DeleteJob waits for a running step before it removes the job's series and checkpoints
    (by name); a registration of the same name meanwhile is UNAVAILABLE, and the one after
    it gets a clean job: its own series, checkpoints and steps (oracle: torch's AdamW)."""
    step = BACKEND.step
    slow = threading.Event()

    def slow_step(*args, **kwargs):
        if slow.is_set():
            time.sleep(0.3)
        return step(*args, **kwargs)

    monkeypatch.setattr(BACKEND, "step", slow_step)
    server = ShardServer(ShardConfig(port=0, device=DEVICE, checkpoint_dir=str(tmp_path),
                         checkpoint_every=1)).start()
    try:
        old = make_model()
        opt = RemoteOptimizer(old.parameters(), "adamw", servers=[server.address], job="again")
        slow.set()
        stepping = threading.Thread(target=train, args=(old, opt, 1))
        stepping.start()
        while server.store.jobs["again"].stepper.pending == 0:   # on the stepper, slowed
            time.sleep(0.005)
        deleting = threading.Thread(target=delete_job, args=([server.address], "again"))
        deleting.start()
        while "again" not in server.store.deleting:
            time.sleep(0.005)
        with pytest.raises(Unavailable, match="being deleted"):
            RemoteOptimizer(make_model().parameters(), "adamw", servers=[server.address],
                            job="again", retries=0)
        stepping.join()
        deleting.join()
        slow.clear()
        opt.close(leave=False)

        model, reference = make_model(), make_model()
        opt = RemoteOptimizer(model.parameters(), "adamw", servers=[server.address], job="again",
                              lr=1e-2)
        train(model, opt, 2)
        train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2), 2)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert Checkpointer(tmp_path).versions("again") == [1, 2]
        assert server.store.job("again").version == 2
        opt.close()
    finally:
        server.stop(grace=0)
