"""The Kubernetes manifests (deploy/k8s), checked without a cluster.

The tools decide: `kubectl kustomize` renders every overlay; `kubernetes-validate --strict`
checks every object against the API schemas of Kubernetes 1.37 (the newest it knows) and 1.29
(the oldest these manifests are for: the pod-index label, backoffLimitPerIndex); checkov
passes, each skipped check with its reason; the ServiceMonitor validates against the
Prometheus Operator's CRD (vendored in tests/k8s/, checked by tests/k8s_crd.py). Each tool is
also shown a broken copy and must refuse it, so that a check that checks nothing fails.
Then the rendered objects run for real: the StatefulSet's container command starts shards,
probed as the kubelet probes them, and the Indexed Job's program trains against them with the
Job's environment.

kubectl comes with this machine class (the Google Cloud CLI's package); kubernetes-validate
and checkov are the k8s-check extra, in .venv-k8s (`make k8s-tools`, which .ci/run runs).
Without them a test is skipped here, with the reason, and fails under CI.
"""
from __future__ import annotations

import copy
import datetime
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from optserve import local
from support import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["base", "gpu", "worker-job"]
TOOLS = ROOT / ".venv-k8s" / "bin"
SERVICEMONITOR_CRD = ROOT / "tests" / "k8s" / "monitoring.coreos.com_servicemonitors.yaml"
KUBERNETES_VERSIONS = ["1.37", "1.29"]
SERVING = health_pb2.HealthCheckResponse.SERVING


def tool(name: str) -> str:
    """A k8s-check tool from .venv-k8s (or PATH); skipped, or failed under CI, without it."""
    path = TOOLS / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        skip_or_fail(f"{name} is not installed: `make k8s-tools` puts the k8s-check extra in "
                     ".venv-k8s")
    return found


def run(*cmd: str, ok: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, \
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def dump(objects: list[dict], path: Path) -> Path:
    path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    return path


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind
                and (name is None or o["metadata"]["name"] == name)]
    return found


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    """{overlay: its manifests as `kubectl kustomize` renders them}."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        skip_or_fail("kubectl is not installed (this machine class has it, from the Google "
                     "Cloud CLI's packages)")
    out = tmp_path_factory.mktemp("k8s")
    paths = {}
    for overlay in OVERLAYS:
        proc = run(kubectl, "kustomize", str(K8S / overlay))
        paths[overlay] = out / f"{overlay}.yaml"
        paths[overlay].write_text(proc.stdout)
    return paths


# --- what the tools decide -------------------------------------------------------------------

def test_kubectl_kustomize_renders_every_overlay(rendered):
    kinds = {overlay: sorted({o["kind"] for o in load(path)}) for overlay, path in rendered.items()}
    shards = ["ConfigMap", "Namespace", "NetworkPolicy", "PodDisruptionBudget", "Service",
              "ServiceAccount", "ServiceMonitor", "StatefulSet"]
    assert kinds == {"base": shards, "gpu": shards,
                     "worker-job": ["ConfigMap", "Job", "NetworkPolicy"]}


def test_kubernetes_validate_strict_accepts_every_object(rendered, tmp_path):
    validate = tool("kubernetes-validate")
    # a control: a misspelt field (terminationGracePeriod), which strict validation refuses
    objects = load(rendered["base"])
    find(objects, "StatefulSet")["spec"]["template"]["spec"]["terminationGracePeriod"] = 120
    control = dump(objects, tmp_path / "control.yaml")
    for version in KUBERNETES_VERSIONS:
        proc = run(validate, "--strict", "-k", version, *map(str, rendered.values()))
        passed = re.findall(r"passed for resource (\S+) against version", proc.stdout + proc.stderr)
        unknown = re.findall(r"Couldn't find schema for kind (\S+)", proc.stdout + proc.stderr)
        expected = [f"{o['kind'].lower()}/{o['metadata']['name']}"
                    for path in rendered.values() for o in load(path) if o["kind"] != "ServiceMonitor"]
        assert sorted(passed) == sorted(expected), proc.stdout + proc.stderr
        # the ServiceMonitor is a custom resource: its schema is the CRD's (the next test)
        assert set(unknown) == {"ServiceMonitor"}, proc.stdout + proc.stderr
        refused = run(validate, "--strict", "-k", version, str(control), ok=False)
        assert refused.returncode != 0 and "terminationGracePeriod" in refused.stdout + refused.stderr, \
            refused.stdout + refused.stderr


def test_the_servicemonitor_matches_the_prometheus_operator_crd(rendered, tmp_path):
    # tests/k8s_crd.py runs in kubernetes-validate's environment, for its jsonschema
    python = Path(tool("kubernetes-validate")).with_name("python")
    if not python.exists():
        skip_or_fail(f"no Python beside kubernetes-validate ({python}): `make k8s-tools`")
    for overlay in ("base", "gpu"):
        proc = run(str(python), "tests/k8s_crd.py", str(SERVICEMONITOR_CRD),
                   str(rendered[overlay]))
        assert "ServiceMonitor/optserve-shard: valid" in proc.stdout, proc.stdout
    # a control: a misspelt field, a number for a duration, an unknown relabel action
    monitor = copy.deepcopy(find(load(rendered["base"]), "ServiceMonitor"))
    endpoint = monitor["spec"]["endpoints"][0]
    endpoint["scrapeIntervall"] = endpoint.pop("interval")
    endpoint["scrapeTimeout"] = 10
    endpoint["relabelings"][0]["action"] = "rename"
    control = dump([monitor], tmp_path / "control.yaml")
    proc = run(str(python), "tests/k8s_crd.py", str(SERVICEMONITOR_CRD), str(control), ok=False)
    assert proc.returncode == 1, proc.stdout
    for error in ("'scrapeIntervall' was unexpected", "scrapeTimeout: 10 is not of type 'string'",
                  "action: 'rename' is not one of"):
        assert error in proc.stdout, proc.stdout


def test_checkov_passes_every_overlay_with_each_skip_justified(rendered, tmp_path):
    """One checkov run over all overlays (it spends most of its time starting), and a control
    with a writable root filesystem and privilege escalation, which it must fail."""
    checkov = tool("checkov")
    scan = tmp_path / "scan"
    scan.mkdir()
    for overlay, path in rendered.items():
        shutil.copy(path, scan / f"{overlay}.yaml")
    objects = load(rendered["base"])
    container = find(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"].update(readOnlyRootFilesystem=False, allowPrivilegeEscalation=True)
    dump(objects, scan / "control.yaml")
    start = time.monotonic()
    proc = run(checkov, "--skip-download", "--framework", "kubernetes", "-d", str(scan),
               "-o", "json", ok=False)
    seconds = time.monotonic() - start
    report = json.loads(proc.stdout)
    results = report["results"]
    failed: dict[str, set] = {}
    for check in results["failed_checks"]:
        failed.setdefault(Path(check["file_path"]).stem, set()).add(check["check_id"])
    assert set(failed) == {"control"}, json.dumps(results["failed_checks"], indent=1)[:4000]
    assert {"CKV_K8S_20", "CKV_K8S_22"} <= failed["control"]   # the checks did run
    passed = {Path(c["file_path"]).stem for c in results["passed_checks"]}
    assert set(OVERLAYS) <= passed
    for check in results["skipped_checks"]:
        reason = (check.get("check_result") or {}).get("suppress_comment") or ""
        assert len(reason.split()) >= 5, f"{check['check_id']} skipped without a reason"
    print(f"checkov: {seconds:.1f} s for {len(rendered) + 1} files")


# --- what the manifests wire together ----------------------------------------------------------

def container_of(workload: dict) -> dict:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def flags(container: dict) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in container["args"] if a.startswith("--"))


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_the_objects_refer_to_each_other(rendered):
    """What no schema checks: selectors that select, ports and paths that exist."""
    shards = load(rendered["base"])
    statefulset, service = find(shards, "StatefulSet"), find(shards, "Service")
    pod = statefulset["spec"]["template"]
    container = container_of(statefulset)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = flags(container)
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    for selector in (statefulset["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
                     find(shards, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                     find(shards, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]):
        assert matches(selector, pod["metadata"]["labels"]), selector
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {
        "grpc": "grpc", "metrics": "metrics"}
    assert (int(args["port"]), int(args["health-port"]), int(args["metrics-port"])) == (
        ports["grpc"], ports["health"], ports["metrics"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == ports["health"], probe
    # the SIGTERM checkpoint fits in the termination grace
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(args["grace"]) + 60
    # files the flags name are where the volumes are mounted
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claims = {c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]}
    assert mounts[args["checkpoint-dir"]] in claims
    for flag in ("tokens-file", "tls-cert", "tls-key"):
        assert mounts[os.path.dirname(args[flag])] in {v["name"] for v in pod["spec"]["volumes"]
                                                        if "secret" in v}
    # the ServiceMonitor scrapes the Service's metrics port; `shard` from the pod-index label
    monitor = find(shards, "ServiceMonitor")
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert monitor["spec"]["endpoints"][0]["relabelings"][0]["sourceLabels"] == [
        "__meta_kubernetes_pod_label_apps_kubernetes_io_pod_index"]
    # the dashboards ConfigMap holds every generated dashboard, for the sidecar
    dashboards = find(shards, "ConfigMap", "optserve-dashboards")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(dashboards["data"]) == {p.name for p in (ROOT / "deploy/grafana/dashboards").glob("*.json")}
    # the GPU overlay: one GPU per shard, the cuda backend
    gpu = container_of(find(load(rendered["gpu"]), "StatefulSet"))
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {e["name"]: e.get("value") for e in gpu["env"]}["OPTSERVE_DEVICE"] == "cuda"
    # the workers: admitted by the shards' NetworkPolicy, one rank per index, every shard
    job = find(load(rendered["worker-job"]), "Job")
    worker = container_of(job)
    env = {e["name"]: e for e in worker["env"]}
    allowed = find(shards, "NetworkPolicy")["spec"]["ingress"][0]
    assert matches(allowed["from"][0]["podSelector"]["matchLabels"],
                   job["spec"]["template"]["metadata"]["labels"])
    assert [p["port"] for p in allowed["ports"]] == ["grpc"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert int(env["WORLD_SIZE"]["value"]) == job["spec"]["completions"] == job["spec"]["parallelism"]
    name, domain = statefulset["metadata"]["name"], service["metadata"]["name"]
    namespace = statefulset["metadata"]["namespace"]
    assert job["metadata"]["namespace"] == namespace
    assert env["OPTSERVE_SERVERS"]["value"].split(",") == [
        f"{name}-{i}.{domain}.{namespace}.svc:{ports['grpc']}"
        for i in range(statefulset["spec"]["replicas"])]
    # ... which is what each shard advertises
    assert args["advertise-address"] == \
        f"{name}-$(SHARD_INDEX).{domain}.$(POD_NAMESPACE).svc"


# --- the rendered objects, run --------------------------------------------------------------------

def certificate(directory: Path, names: list[str]) -> dict[str, Path]:
    """A CA and a certificate for `names` signed by it, as the optserve-tls Secret holds."""
    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def build(subject, public_key, ca, san=()):
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name("test-ca"))
             .public_key(public_key).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in san]),
                                critical=False)
        return b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    files = {"ca.crt": build("test-ca", ca_key.public_key(), True),
             "tls.crt": build(names[0], key.public_key(), False, names),
             "tls.key": key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())}
    for file, data in files.items():
        (directory / file).write_bytes(data)
    return {file: directory / file for file in files}


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def pod_env(container: dict, downward: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet sets it: values, and for valueFrom the
    values the downward API would give (`downward`, by variable name)."""
    env = {}
    for e in container.get("env", []):
        env[e["name"]] = expand(e["value"], env) if "value" in e else downward[e["name"]]
    return env


def localise(text: str, mounts: dict[str, Path], ports: dict[int, int]) -> str:
    """A pod's path or flag (--flag=value), here: a path under a mount is under its folder,
    a container port is a free port."""
    flag, sep, value = text.rpartition("=") if text.startswith("--") else ("", "", text)
    if value.isdigit() and int(value) in ports:
        return f"{flag}{sep}{ports[int(value)]}"
    for mount in sorted(mounts, key=len, reverse=True):   # the innermost mount
        if value == mount or value.startswith(mount + "/"):
            return f"{flag}{sep}{mounts[mount]}{value[len(mount):]}"
    return text


def health(address: str, service: str = "", credentials=None, name: str | None = None):
    options = [("grpc.ssl_target_name_override", name)] if name else []
    channel = (grpc.secure_channel(address, credentials, options) if credentials
               else grpc.insecure_channel(address))
    with channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_the_statefulset_runs_shards_that_the_indexed_job_trains_against(rendered, tmp_path):
    """The StatefulSet's container command, as the kubelet would run it (its $(VARS) from the
    downward API, its volumes as folders, its ports mapped to free ones) starts shards that
    the kubelet's gRPC probes find SERVING in plaintext while the gRPC port speaks TLS only,
    for the DNS names the workers dial; the Job's program, from the rendered ConfigMap, trains
    one rank per completion index with the Job's environment; SIGTERM checkpoints and stops
    every shard within the termination grace, and every log line of theirs is JSON."""
    shards = load(rendered["base"])
    statefulset, service = find(shards, "StatefulSet"), find(shards, "Service")
    container = container_of(statefulset)
    namespace, sts, domain = statefulset["metadata"]["namespace"], statefulset["metadata"]["name"], \
        service["metadata"]["name"]
    replicas = statefulset["spec"]["replicas"]
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    tls = certificate(secrets, [f"*.{domain}.{namespace}.svc", "localhost"])
    job = find(load(rendered["worker-job"]), "Job")
    job_name = pod_env(container_of(job), {"RANK": "0"})["OPTSERVE_JOB"]
    (secrets / "tokens.json").write_text(json.dumps({job_name: "example-token"}))
    (secrets / "token").write_text("example-token\n")
    cpus = str(math.ceil(float(container["resources"]["limits"]["cpu"])))

    procs, logs, health_ports = [], [], []
    try:
        for index in range(replicas):
            pod = tmp_path / f"{sts}-{index}"
            mounts = {m["mountPath"]: pod / m["name"] for m in container["volumeMounts"]}
            for m in container["volumeMounts"]:
                mounts[m["mountPath"]].mkdir(parents=True)
                if m["name"] in ("tls", "tokens"):   # the Secrets' files
                    for source in (tls["tls.crt"], tls["tls.key"], secrets / "tokens.json"):
                        shutil.copy(source, mounts[m["mountPath"]])
            ports = {p["containerPort"]: local.free_port() for p in container["ports"]}
            env = pod_env(container, {"SHARD_INDEX": str(index), "POD_NAMESPACE": namespace,
                                      "CPU_LIMIT": cpus})
            env = {k: localise(v, mounts, ports) for k, v in env.items()}
            # numba's cache stays this machine's: in an empty one it compiles for seconds
            for cache in ("NUMBA_CACHE_DIR", "CUPY_CACHE_DIR"):
                env.pop(cache)
            argv = [localise(expand(a, env), mounts, ports)
                    for a in container["command"] + container["args"]]
            assert argv[:2] == ["optserve", "server"]
            logs.append(pod / "stderr.log")
            with open(logs[-1], "w") as stderr:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "optserve", *argv[1:]], cwd=pod, text=True,
                    stdout=subprocess.PIPE, stderr=stderr,
                    env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}))
            procs[-1].ports = ports
            health_ports.append(ports[container["startupProbe"]["grpc"]["port"]])
        servers = [local.listening(p, log) for p, log in zip(procs, logs)]

        ca = grpc.ssl_channel_credentials(tls["ca.crt"].read_bytes())
        for index, (server, proc) in enumerate(zip(servers, procs)):
            dns = f"{sts}-{index}.{domain}.{namespace}.svc"
            grpc_port = proc.ports[int(flags(container)["port"])]
            assert server.address == f"{dns}:{grpc_port}"   # advertised
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                service_name = container[probe]["grpc"].get("service", "")
                assert health(f"127.0.0.1:{health_ports[index]}", service_name) == SERVING, probe
            # the gRPC port: TLS for the name in OPTSERVE_SERVERS, and nothing in plaintext
            assert health(f"127.0.0.1:{grpc_port}", credentials=ca, name=dns) == SERVING
            with pytest.raises(grpc.RpcError):
                health(f"127.0.0.1:{grpc_port}")

        # the workers: the Job's program and environment, one process per completion index
        train = find(load(rendered["worker-job"]), "ConfigMap")["data"]["train.py"]
        (tmp_path / "train.py").write_text(train)
        worker = container_of(job)
        workers = []
        for index in range(job["spec"]["completions"]):
            env = pod_env(worker, {"RANK": str(index)})
            # the workers dial what the shards advertise; here on loopback, by a name their
            # certificate holds too
            grpc_port = int(flags(container)["port"])
            assert env["OPTSERVE_SERVERS"].split(",") == [
                f"{s.address.rsplit(':', 1)[0]}:{grpc_port}" for s in servers]
            addresses = [f"localhost:{p.ports[grpc_port]}" for p in procs]
            secret_volumes = {v["name"] for v in job["spec"]["template"]["spec"]["volumes"]
                              if "secret" in v}
            mounts = {m["mountPath"]: secrets for m in worker["volumeMounts"]
                      if m["name"] in secret_volumes}   # token, ca.crt
            # HOME: the pod's is an emptyDir; here this machine's
            env = {k: localise(v, mounts, {}) for k, v in env.items() if k != "HOME"}
            env.update(OPTSERVE_SERVERS=",".join(addresses), STEPS="8")
            workers.append(subprocess.Popen(
                [sys.executable, str(tmp_path / "train.py")], cwd=tmp_path, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env}))
        results = []
        for w in workers:
            out, err = w.communicate(timeout=180)
            assert w.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
        assert sorted(r["rank"] for r in results) == list(range(job["spec"]["completions"]))
        assert {r["world_size"] for r in results} == {job["spec"]["completions"]}
        assert {r["steps"] for r in results} == {8}

        grace = statefulset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(timeout=grace) == 0
    finally:
        local.stop_all(procs, timeout=10)
    for index, log in enumerate(logs):
        checkpoints = tmp_path / f"{sts}-{index}" / "checkpoints"
        assert list(checkpoints.glob("*/*.json")), f"shard {index} wrote no checkpoint on SIGTERM"
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        assert any("received SIGTERM" in r["message"] for r in records)
