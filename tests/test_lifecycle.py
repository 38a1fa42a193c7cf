"""A job's end (DeleteJob) and the client's refusals of what it cannot do, on real shards."""
from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import urllib.request

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from models import make_data, make_model, train
from optserve.client import (FailedPrecondition, NotFound, RemoteOptimizer, Unauthenticated,
                             delete_job)
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.v1 import optserve_pb2_grpc as pb_grpc
from optserve.server import Limits, ShardConfig, ShardServer
from optserve.server.checkpoint import Checkpointer
from support import DEVICE


def job_series(port: int, job: str) -> list[str]:
    """The names of the scraped samples labelled with training job `job`."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return [s.name for family in text_string_to_metric_families(text) for s in family.samples
            if s.labels.get("training_job") == job]


def test_delete_job_frees_its_name_slot_metrics_and_checkpoints(tmp_path):
    """With room for one job: after delete_job the name and the slot are free again (a job
    with another spec registers under the same name and trains as torch's AdamW does), no
    series names the old job, and no checkpoint is left for a restart to bring back."""
    server = ShardServer(ShardConfig(port=0, device=DEVICE, checkpoint_dir=str(tmp_path),
                         checkpoint_every=1, limits=Limits(max_jobs=1))).start()
    port = server.serve_metrics(0)
    try:
        model = make_model()
        opt = RemoteOptimizer(model.parameters(), "adamp", servers=[server.address], job="gone")
        train(model, opt, 2)
        assert "optserve_weight_norm" in job_series(port, "gone")
        assert Checkpointer(tmp_path).versions("gone")
        opt.delete_job()

        assert job_series(port, "gone") == []
        assert not Checkpointer(tmp_path).job_dir("gone").exists()
        with grpc.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.RpcError) as e:
                list(pb_grpc.OptimizerStub(channel).PullParameters(
                    pb.PullParametersRequest(job="gone")))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        # a restart on a copy of the directory, which the running shard holds
        copy = shutil.copytree(tmp_path, tmp_path.with_name(tmp_path.name + "-copy"))
        restarted = ShardServer(ShardConfig(port=0, device=DEVICE, checkpoint_dir=str(copy)))
        assert "gone" not in restarted.store.jobs
        restarted.stop(grace=0)

        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(6, 3))
        reference = torch.nn.Sequential(torch.nn.Linear(6, 3))
        reference.load_state_dict(model.state_dict())
        opt = RemoteOptimizer(model.parameters(), "adamw", servers=[server.address], job="gone",
                              lr=1e-2)
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
        x = torch.randn(8, 6)
        for m, o in ((model, opt), (reference, ref_opt)):
            for _ in range(3):
                o.zero_grad()
                m(x).square().mean().backward()
                o.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
        opt.close()
    finally:
        server.stop(grace=0)


def test_deleting_a_sync_job_releases_a_worker_waiting_for_its_round(shard):
    model = make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[shard.address], job="wait",
                          rank=0, world_size=2)
    outcome = []

    def step():
        try:
            train(model, opt, 1)   # waits for rank 1, which never comes
        except Exception as e:     # noqa: BLE001 (the test inspects it)
            outcome.append(e)

    worker = threading.Thread(target=step)
    worker.start()
    while shard.store.jobs["wait"].barrier.round is None:   # rank 0's gradient is in
        worker.join(0.01)
    delete_job([shard.address], "wait")
    worker.join(10)
    assert not worker.is_alive(), "the waiting step was not released"
    assert isinstance(outcome[0], NotFound) and "deleted" in str(outcome[0])
    opt.close()


def test_a_registration_that_failed_part_way_can_be_deleted(shard):
    """The second shard refuses the job (it checks tokens, and this job has none): the
    registration fails after the first shard took the job; delete_job clears it there, and
    the job registers on the first shard alone."""
    with ShardServer(ShardConfig(port=0, device=DEVICE, tokens={"other": "t"})).start() as guarded:
        servers = [shard.address, guarded.address]
        with pytest.raises(Unauthenticated):
            RemoteOptimizer(make_model().parameters(), "adamw", servers=servers, job="half",
                            retries=0, rpc_timeout=10)
    assert "half" in shard.store.jobs
    with pytest.raises(FailedPrecondition, match="num_shards"):
        RemoteOptimizer(make_model().parameters(), "adamw", servers=servers[:1], job="half")
    delete_job(servers[:1], "half")
    opt = RemoteOptimizer(make_model().parameters(), "adamw", servers=servers[:1], job="half")
    opt.close()


def test_client_refuses_what_a_job_cannot_hold(shard):
    model = make_model()
    servers = [shard.address]
    with pytest.raises(TypeError, match="list of addresses"):
        RemoteOptimizer(model.parameters(), "adamw", servers=shard.address, job="c")
    with pytest.raises(ValueError, match="more than once"):
        RemoteOptimizer(model.parameters(), "adamw", servers=servers * 2, job="c")
    weight = next(model.parameters())
    with pytest.warns(UserWarning, match="duplicate parameters"), \
            pytest.raises(ValueError, match="listed twice"):
        RemoteOptimizer([weight, weight], "adamw", servers=servers, job="c")
    double = torch.nn.Linear(3, 2).double()
    with pytest.raises(ValueError, match="'weight'.*float64"):
        RemoteOptimizer(double.named_parameters(), "adamw", servers=servers, job="c")
    assert "c" not in shard.store.jobs   # nothing above reached the shard

    opt = RemoteOptimizer(model.named_parameters(), "adamw", servers=servers, job="c")
    with pytest.raises(NotImplementedError, match="fixed when it is registered"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    assert len(opt.param_groups) == 1
    train(model, opt, 1)   # still steps


def test_a_gradient_the_wire_cannot_carry_is_refused_before_anything_is_sent(shard):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = RemoteOptimizer(emb.named_parameters(), "adamw", servers=[shard.address], job="s")
    before = emb.weight.detach().clone()
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="'weight' has a torch.sparse_coo gradient"):
        opt.step()
    emb.weight.grad = None
    emb.weight.data = torch.zeros(10, 5)
    emb.weight.grad = torch.ones(10, 5)
    with pytest.raises(ValueError, match=r"'weight' has shape \(10, 5\); the job registered \(10, 4\)"):
        opt.step()
    assert shard.store.jobs["s"].version == 0
    emb.weight.data = torch.zeros(10, 4)
    opt.pull_parameters()
    torch.testing.assert_close(emb.weight.detach(), before, rtol=0, atol=0)
    opt.close()


def test_close_twice_is_fine_and_use_after_close_says_closed(shard):
    model = make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[shard.address], job="closed")
    opt.close()
    opt.close()
    with pytest.raises(ValueError, match="is closed"):
        train(model, opt, 1)
    with RemoteOptimizer(model.parameters(), "adamw", servers=[shard.address], job="closed") as o:
        o.close()   # and __exit__ closes again


@pytest.mark.parametrize("argv, message", [
    (["--port", "99999"], "99999 is not a port"),
    (["--max-jobs", "0"], "0 must be at least 1"),
    (["--tokens-file", "/nonexistent/tokens.json"], "--tokens-file /nonexistent/tokens.json: no such file"),
])
def test_server_refuses_bad_flags_with_one_line(argv, message):
    done = subprocess.run([sys.executable, "-m", "optserve", "server", *argv],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_a_second_client_with_the_same_rank_takes_the_worker_over(shard):
    """Two processes that both think they are rank 0 (say, `rank=` forgotten): the later
    registration holds the worker, the earlier client's steps are refused, and what the job
    applies is exactly the later client's training (oracle: torch's AdamW)."""
    first, second, reference = make_model(), make_model(), make_model()
    a = RemoteOptimizer(first.parameters(), "adamw", servers=[shard.address], job="twice", lr=1e-2)
    b = RemoteOptimizer(second.parameters(), "adamw", servers=[shard.address], job="twice", lr=1e-2)
    with pytest.raises(FailedPrecondition, match="held by another client"):
        train(first, a, 1)
    train(second, b, 2)
    train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2), 2)
    for p, q in zip(second.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    a.close(leave=False)
    b.close()


def test_unbalanced_placement_is_reported_only_where_it_costs(shards, caplog):
    """One 2M-parameter tensor beside small ones leaves one of two shards with ~2x the mean:
    logged. The same shape of imbalance in a 4K-parameter model is not worth a warning."""
    servers = [s.address for s in shards]
    for size, warned in ((1 << 21, True), (1 << 12, False)):
        params = [torch.nn.Parameter(torch.zeros(size)), torch.nn.Parameter(torch.zeros(100))]
        caplog.clear()
        with caplog.at_level("WARNING", logger="optserve.client"):
            RemoteOptimizer(params, "adamw", servers=servers, job=f"place{size}").delete_job()
        assert ("placement is unbalanced" in caplog.text) == warned, caplog.text


def test_calls_that_found_the_job_before_it_was_deleted_change_nothing(tmp_path):
    """A checkpoint, leave, pull or state write that looked the job up just before DeleteJob
    ran gets NOT_FOUND and writes nothing: no checkpoint for a restart to bring back."""
    server = ShardServer(ShardConfig(port=0, device=DEVICE, checkpoint_dir=str(tmp_path))).start()
    try:
        model = make_model()
        opt = RemoteOptimizer(model.parameters(), "adamw", servers=[server.address], job="late",
                              rank=0, world_size=2)
        stale = server.store.job("late")
        server.store.delete("late")
        for call in (stale.checkpoint, lambda: stale.leave(1), stale.pull,
                     stale.get_state, lambda: stale.join(1),
                     lambda: stale.roll_back(0)):
            with pytest.raises(NotFound, match="deleted"):
                call()
        assert [p.name for p in tmp_path.iterdir()] == ["LOCK"]   # the shard's, and no job
        opt.close(leave=False)
    finally:
        server.stop(grace=0)


def test_a_client_that_lost_its_rank_cannot_make_it_leave(shard):
    """Sync, two workers. Rank 0 is taken over by a newer client; the old one's close()
    must not take rank 0 out of the quorum, so the new rank 0 and rank 1 still step
    together: both gradients averaged into one step (oracle: torch's AdamW on the mean)."""
    models = [make_model() for _ in range(3)]
    old, new, other = (RemoteOptimizer(m.parameters(), "adamw", servers=[shard.address],
                                       job="quorum", rank=r, world_size=2, lr=1e-2)
                       for m, r in zip(models, (0, 0, 1)))
    old.close()   # refused on the shard (logged), so rank 0 stays a member
    assert shard.store.job("quorum").barrier.members == {0, 1}
    data = [make_data(seed=s) for s in (1, 2)]
    threads = [threading.Thread(target=lambda m=m, o=o, d=d: (
        torch.nn.functional.cross_entropy(m(d[0]), d[1]).backward(), o.step()))
        for m, o, d in ((models[1], new, data[0]), (models[2], other, data[1]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert new.dropped_steps == other.dropped_steps == 0
    reference = make_model()
    grads = []
    for x, y in data:
        reference.zero_grad()
        torch.nn.functional.cross_entropy(reference(x), y).backward()
        grads.append([p.grad.clone() for p in reference.parameters()])
    for p, g0, g1 in zip(reference.parameters(), *grads):
        p.grad = (g0 + g1) / 2
    torch.optim.AdamW(reference.parameters(), lr=1e-2).step()
    for p, q in zip(models[1].parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    new.close()
    other.close()


def test_a_skipped_step_counts_once_however_many_shards(shards):
    """nonfinite="skip" over two shards: one NaN gradient skips one step (both shards drop
    it), the model keeps its parameters bit for bit, and the next step applies."""
    model = make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[s.address for s in shards],
                          job="skip2", nonfinite="skip")
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert opt.dropped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    train(model, opt, 1)
    assert opt.dropped_steps == 1
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.close()


@pytest.mark.parametrize("mode, options", [
    ("sync", dict(max_staleness=2)), ("sync", dict(staleness_lr=True)),
    ("async", dict(backup_workers=1)), ("async", dict(timeout=5.0)),
    ("async", dict(on_timeout="proceed")),
])
def test_options_of_the_other_mode_are_refused(mode, options):
    with pytest.raises(ValueError, match="are for mode="):
        RemoteOptimizer(make_model().parameters(), "adamw", servers=["127.0.0.1:1"], job="m",
                        mode=mode, world_size=2, **options)
