"""TLS, mutual TLS, per-job tokens and resource limits, with certificates made here."""
from __future__ import annotations

import datetime
import threading
import time

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from models import make_data, make_model
from optserve import cli
from optserve.client import (PermissionDenied, RemoteOptimizer, ResourceExhausted,
                             Unauthenticated, Unavailable)
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.v1 import optserve_pb2_grpc as pb_grpc
from optserve.server import Limits, ShardConfig, ShardServer, TLSFiles
from support import DEVICE


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, issuer, key, issuer_key, ca: bool, san: list[str] = ()):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in san]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a shard certificate for localhost, a client certificate, and a stranger's."""
    d = tmp_path_factory.mktemp("pki")
    files = {}

    def write(name, cert, key):
        files[name] = (str(d / f"{name}.crt"), str(d / f"{name}.key"))
        (d / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    write("ca", _cert("optserve-test-ca", "optserve-test-ca", ca_key, ca_key, True), ca_key)
    for name, issuer_key, issuer in (("shard", ca_key, "optserve-test-ca"),
                                     ("worker", ca_key, "optserve-test-ca")):
        key = ec.generate_private_key(ec.SECP256R1())
        write(name, _cert(name, issuer, key, issuer_key, False, ["localhost"]), key)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    write("rogue", _cert("rogue", "rogue-ca", key, rogue_key, False, ["localhost"]), key)
    return files


def one_step(address, job="secure", **kwargs):
    x, y = make_data()
    model = make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[address], job=job, retries=0,
                          rpc_timeout=10, **kwargs)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.close()
    return opt


def test_tls(pki):
    shard, key = pki["shard"]
    server = ShardServer(ShardConfig(host="localhost", port=0, device=DEVICE,
                                     tls=TLSFiles(shard, key))).start()
    try:
        one_step(server.address, tls_ca=pki["ca"][0])
        with pytest.raises(Unavailable):
            one_step(server.address, job="plain")  # plaintext to a TLS port
        assert cli.main(["health", server.address, "--tls-ca", pki["ca"][0]]) == 0
        assert cli.main(["health", server.address, "--timeout", "2"]) == 1   # plaintext
    finally:
        server.stop(0)


def check(channel, service=""):
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_port_serves_health_alone_in_plaintext_beside_tls(pki):
    """--health-port: Kubernetes' gRPC probes speak no TLS, so beside a TLS port the shard
    serves grpc.health.v1, and nothing else, in plaintext on a second port, from the same
    servicer: NOT_SERVING on shutdown shows there while in-flight calls finish."""
    SERVING, NOT_SERVING = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    shard, key = pki["shard"]
    server = ShardServer(ShardConfig(host="localhost", port=0, health_port=0, device=DEVICE,
                                     tls=TLSFiles(shard, key))).start()
    health_address = f"localhost:{server.health_port}"
    tls = grpc.ssl_channel_credentials(open(pki["ca"][0], "rb").read())
    try:
        one_step(server.address, tls_ca=pki["ca"][0])   # the gRPC port: TLS, as before
        assert cli.main(["health", health_address]) == 0   # plaintext, as the kubelet asks
        assert cli.main(["health", server.address, "--timeout", "2"]) == 1
        with grpc.insecure_channel(health_address) as channel:
            assert check(channel) == check(channel, "optserve.v1.Optimizer") == SERVING
            # nothing but Health: neither the Optimizer service nor reflection
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.OptimizerStub(channel).Checkpoint(pb.CheckpointRequest(job="secure"),
                                                          timeout=5)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
            with pytest.raises(grpc.RpcError) as e:
                list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # Shutting down with a call in flight on the TLS port (a Watch): while it has its
        # grace, the plaintext port says NOT_SERVING, and so does the watch.
        with grpc.secure_channel(server.address, tls) as secure, \
                grpc.insecure_channel(health_address) as channel:
            watch = health_pb2_grpc.HealthStub(secure).Watch(health_pb2.HealthCheckRequest())
            assert next(watch).status == SERVING
            stopping = threading.Thread(target=server.stop, args=(30.0,))
            started = time.monotonic()
            stopping.start()
            while check(channel) == SERVING:
                assert time.monotonic() - started < 5, "still SERVING after stop()"
                time.sleep(0.05)
            assert check(channel, "optserve.v1.Optimizer") == NOT_SERVING
            assert next(watch).status == NOT_SERVING
            watch.cancel()   # the last call in flight: the shard stops now
            stopping.join(timeout=20)
            assert not stopping.is_alive() and time.monotonic() - started < 20
            with pytest.raises(grpc.RpcError) as e:
                check(channel)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE   # the port is closed
    finally:
        server.stop(0)


def test_mutual_tls(pki):
    shard, key = pki["shard"]
    server = ShardServer(ShardConfig(host="localhost", port=0, device=DEVICE,
                         tls=TLSFiles(shard, key, client_ca=pki["ca"][0]))).start()
    try:
        one_step(server.address, tls_ca=pki["ca"][0], tls_cert=pki["worker"][0],
                 tls_key=pki["worker"][1])
        for kwargs in ({}, {"tls_cert": pki["rogue"][0], "tls_key": pki["rogue"][1]}):
            with pytest.raises(Unavailable):  # the handshake fails: no or a foreign certificate
                one_step(server.address, job="nocert", tls_ca=pki["ca"][0], **kwargs)
    finally:
        server.stop(0)


def test_tokens(tmp_path):
    tokens = {"alpha": "s3cret-alpha", "beta": "s3cret-beta"}
    server = ShardServer(ShardConfig(port=0, device=DEVICE, tokens=tokens)).start()
    try:
        one_step(server.address, job="alpha", token="s3cret-alpha")
        with pytest.raises(Unauthenticated, match="missing bearer token"):
            one_step(server.address, job="alpha")
        with pytest.raises(Unauthenticated, match="invalid token"):
            one_step(server.address, job="alpha", token="guess")
        with pytest.raises(PermissionDenied, match="does not grant job 'alpha'"):
            one_step(server.address, job="alpha", token="s3cret-beta")
        with pytest.raises(PermissionDenied, match="does not grant job 'gamma'"):
            one_step(server.address, job="gamma", token="s3cret-beta")
        # health stays open to probes without a token
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        with grpc.insecure_channel(server.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)


@pytest.mark.parametrize("limits,message", [
    (Limits(max_jobs=1), "holds 1 jobs, its limit"),
    (Limits(max_params_per_job=1000), "over the limit of 1000"),
    (Limits(max_state_bytes=50_000), "bytes of state"),
])
def test_limits(limits, message):
    server = ShardServer(ShardConfig(port=0, device=DEVICE, limits=limits)).start()
    try:
        if limits.max_jobs == 1:
            one_step(server.address, job="first")
        with pytest.raises(ResourceExhausted, match=message):
            one_step(server.address, job="second")
        assert "second" not in server.store.jobs
    finally:
        server.stop(0)


def test_oversized_message_is_refused(shard):
    from optserve.proto.v1 import optserve_pb2 as pb
    from optserve.proto.v1 import optserve_pb2_grpc as pb_grpc
    with grpc.insecure_channel(shard.address, options=[
            ("grpc.max_send_message_length", 64 * 2**20)]) as channel:
        stub = pb_grpc.OptimizerStub(channel)
        big = pb.StepRequest(chunk=pb.Chunk(offset=0, data=b"\0" * (9 * 2**20)))
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Step(iter([big])))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
