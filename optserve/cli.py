"""The `optserve` command: `server`, `demo`, `bench`, `health` and `compile-kernels`."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from optserve import logs


def _server(args: argparse.Namespace) -> int:
    if args.threads:  # read by numba when it is first imported, just below
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    if args.gpu is not None:  # read by CUDA when it first initialises, after this
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
    from optserve.server import Limits, ShardConfig, TLSFiles, serve
    from optserve.server.config import half_of_memory, most_tensors, quarter_of_memory
    from optserve.server.interceptors import load_tokens
    for flag in ("tls_cert", "tls_key", "tls_client_ca", "tokens_file"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise SystemExit(f"optserve server: --{flag.replace('_', '-')} {path}: no such file")
    try:
        config = ShardConfig(
            host=args.host, port=args.port, device=args.device,
            barrier_timeout=args.barrier_timeout, grace=args.grace,
            metrics_port=args.metrics_port, metrics_host=args.metrics_host,
            metrics_every=args.metrics_every, max_tensor_series=args.max_tensor_series,
            checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
            keep_checkpoints=args.keep_checkpoints,
            max_rpcs=args.max_rpcs, idle_timeout=args.idle_timeout,
            tls=(TLSFiles(args.tls_cert, args.tls_key, args.tls_client_ca)
                 if args.tls_cert or args.tls_key or args.tls_client_ca else None),
            tokens=load_tokens(args.tokens_file) if args.tokens_file else None,
            advertise_address=args.advertise_address, health_port=args.health_port,
            unix_socket=args.unix_socket,
            limits=Limits(max_jobs=args.max_jobs, max_params_per_job=args.max_params_per_job,
                          max_state_bytes=args.max_state_bytes or half_of_memory(),
                          max_device_bytes=args.max_device_bytes, max_workers=args.max_workers,
                          max_shards=args.max_shards,
                          max_tensors=args.max_tensors or most_tensors(),
                          max_inflight_bytes=args.max_inflight_bytes,
                          inflight_wait=args.inflight_wait,
                          shared_memory=args.shared_memory,
                          max_shared_memory_bytes=(args.max_shared_memory_bytes
                                                   or quarter_of_memory())))
        return serve(config, args.log_format)
    except (OSError, ValueError) as e:   # a port taken, TLS without a certificate, ...
        raise SystemExit(f"optserve server: {e}") from None


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0-65535; 0 picks a free one)")
    return port


def _nonnegative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be at least 0")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _health(args: argparse.Namespace) -> int:
    """Exit 0 when the shard at ADDRESS reports SERVING (for container health checks)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    if args.tls_ca or args.tls_cert:
        read = lambda path: open(path, "rb").read() if path else None  # noqa: E731
        credentials = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key),
                                                   read(args.tls_cert))
        channel = grpc.secure_channel(args.address, credentials)
    else:
        channel = grpc.insecure_channel(args.address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"{args.address}: {e.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _demo(args: argparse.Namespace) -> int:
    if args.compare:
        from optserve.compare import run_compare
        return run_compare(args)
    from optserve.demo import run_demo
    return run_demo(args)


def _compile_kernels(args: argparse.Namespace) -> int:
    import time

    from optserve.kernels import cuda
    from optserve.kernels.cuda_runtime import compile_kernels, kernel_cache
    source = cuda.source()
    for arch in args.arch:
        start = time.perf_counter()
        compile_kernels(source, arch)
        print(f"sm_{arch}: {time.perf_counter() - start:.1f} s", flush=True)
    print(f"cached in {kernel_cache()}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from optserve.bench import run_bench
    return run_bench(args)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to a flag's help, unless the help already speaks of its
    default (a default of None, "not given", is explained in words) or the flag is a switch."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _TopHelp(_Help, argparse.RawDescriptionHelpFormatter):
    """The top-level help: its description is the table of commands, as written."""


# The commands, one line each, in the order `optserve --help` lists them.
COMMANDS = {
    "server": "run one shard (a gRPC server) until SIGTERM or Ctrl-C",
    "demo": "train a small conv net through local shards and workers",
    "bench": "run a benchmark, write its results (see bench/README.md)",
    "health": "exit 0 if a shard is serving (grpc.health.v1)",
    "compile-kernels": "compile the CUDA kernels into the cache, no GPU needed",
}


def build_parser() -> argparse.ArgumentParser:
    from optserve import __version__
    from optserve.proto.optimizers import REGISTRY
    width = max(map(len, COMMANDS)) + 2
    parser = argparse.ArgumentParser(
        prog="optserve", usage="%(prog)s [-h] [--version] COMMAND ...",
        formatter_class=_TopHelp,
        description="An optimizer as a service: shards hold a training job's parameters and\n"
                    "optimizer state and step them with the gradients that PyTorch workers\n"
                    "(optserve.client.RemoteOptimizer) send.\n\ncommands:\n" + "".join(
                        f"  {name:<{width}}{summary}\n" for name, summary in COMMANDS.items()),
        epilog="`optserve COMMAND --help` shows a command's flags and their defaults.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # The table above lists the commands; argparse's own list would repeat it.
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help=argparse.SUPPRESS)

    def command(name: str, description: str | None = None):
        return sub.add_parser(name, prog=f"optserve {name}", formatter_class=_Help,
                              description=description or COMMANDS[name] + ".")

    server = command("server")
    server.description = "Run one shard, a gRPC server, until SIGTERM or Ctrl-C."
    server.add_argument("--host", default="127.0.0.1",
                        help="address to bind (0.0.0.0 for all interfaces)")
    server.add_argument("--port", type=_port, default=50051, help="gRPC port (0: a free one)")
    server.add_argument("--advertise-address", default=None,
                        help="host name or address workers reach this shard by, shown in its "
                             "'listening on' line and logs (default: --host, or this machine's "
                             "host name when --host is 0.0.0.0 or ::)")
    server.add_argument("--health-port", type=_port, default=None,
                        help="also serve grpc.health.v1, and nothing else, in plaintext on this "
                             "port: for probes that speak no TLS, such as Kubernetes' gRPC "
                             "probes (default: none; health is always on --port too)")
    server.add_argument("--unix-socket", default=None, metavar="PATH",
                        help="also serve on this Unix socket, mode 0600 (workers on this host "
                             "dial unix:PATH; default: none)")
    server.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one JSON object a line (time, level, logger, message, "
                             "exception), for a cluster's log pipeline")
    server.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "reference"],
                        help="optimizer backend; auto picks cuda when a GPU is visible, else cpu")
    server.add_argument("--threads", type=_positive, default=None,
                        help="threads of the CPU kernels (default: one per core); 1 where the "
                             "shard shares its cores with workers")
    server.add_argument("--barrier-timeout", type=float, default=300.0,
                        help="seconds a sync step waits for the other workers")
    server.add_argument("--grace", type=float, default=10.0,
                        help="seconds in-flight calls get to finish on SIGTERM")
    server.add_argument("--metrics-port", type=_port, default=None,
                        help="serve Prometheus metrics over HTTP on this port (default: no "
                             "metrics endpoint)")
    server.add_argument("--metrics-host", default=None,
                        help="address for the metrics endpoint (default: --host)")
    server.add_argument("--metrics-every", type=_positive, default=1,
                        help="update per-tensor metrics every N steps of a job")
    server.add_argument("--max-tensor-series", type=_positive, default=256,
                        help="per-tensor series per job; beyond it tensors are aggregated by "
                             "name prefix")
    server.add_argument("--checkpoint-dir", default=None,
                        help="checkpoint jobs here, and restore them from here on start "
                             "(default: no checkpoints)")
    server.add_argument("--checkpoint-every", type=int, default=0,
                        help="checkpoint every N versions of a job (0: only on SIGTERM or "
                             "request)")
    server.add_argument("--keep-checkpoints", type=_positive, default=3,
                        help="checkpoints kept per job")
    server.add_argument("--tls-cert", help="PEM certificate: serve TLS (default: plaintext)")
    server.add_argument("--tls-key", help="PEM private key of --tls-cert (default: none)")
    server.add_argument("--tls-client-ca",
                        help="PEM CA: require client certificates, mutual TLS (default: none "
                             "required)")
    server.add_argument("--tokens-file",
                        help='JSON {"job": "token"}: every call needs its job\'s bearer token '
                             "(default: no tokens)")
    server.add_argument("--max-jobs", type=_positive, default=64, help="jobs the shard holds")
    server.add_argument("--max-params-per-job", type=_positive, default=2_000_000_000,
                        help="parameters one job may have")
    server.add_argument("--max-state-bytes", type=_positive, default=None,
                        help="host memory all jobs may hold: parameters, optimizer state, and "
                             "per worker gradient buffers, cached replies and bookkeeping "
                             "(default: half of RAM)")
    server.add_argument("--max-device-bytes", type=_positive, default=None,
                        help="GPU memory all jobs may hold: state, gradient buffers, scratch "
                             "(default: 90%% of the GPU's)")
    server.add_argument("--max-workers", type=_positive, default=4096, help="workers per job")
    server.add_argument("--max-shards", type=_positive, default=1024,
                        help="shards a job may be spread over")
    server.add_argument("--max-tensors", type=_positive, default=None,
                        help="tensors per job, and parameter groups (default: the most for which "
                             "every header, the optimizer state's too, fits a gRPC message "
                             "whatever the shapes)")
    server.add_argument("--max-inflight-bytes", type=_positive, default=1 << 30,
                        help="bytes all uploads and downloads in flight may hold outside the "
                             "jobs' state (registrations, optimizer states); one call may "
                             "exceed it alone (default: %(default)s, 1 GiB)")
    server.add_argument("--no-shared-memory", dest="shared_memory", action="store_false",
                        help="never offer workers on this host a shared-memory segment: every "
                             "step's bytes travel on its gRPC stream")
    server.add_argument("--max-shared-memory-bytes", type=_positive, default=None,
                        help="bytes all workers' shared-memory segments may hold; a worker "
                             "beyond it steps over gRPC (default: a quarter of RAM)")
    server.add_argument("--inflight-wait", type=_positive_float, default=30.0,
                        help="seconds a call waits for room under --max-inflight-bytes (the "
                             "workers of a large job register at once) before "
                             "RESOURCE_EXHAUSTED")
    server.add_argument("--max-rpcs", type=_positive, default=4096,
                        help="calls open at once; beyond it RESOURCE_EXHAUSTED")
    server.add_argument("--idle-timeout", type=_positive_float, default=60.0,
                        help="seconds a call may wait for its client's next message, or for "
                             "it to take the next one of the answer")
    server.add_argument("--gpu", type=_nonnegative, default=None,
                        help="the GPU this shard uses: sets CUDA_VISIBLE_DEVICES, one shard per "
                             "GPU (default: as CUDA_VISIBLE_DEVICES says, else GPU 0)")
    server.set_defaults(func=_server)

    demo = command("demo", "Train a small conv net on generated shapes, once per optimizer, "
                   "through shards and worker processes it starts on this machine (or the "
                   "shards of --servers), and print a summary. --compare instead plots what "
                   "each optimizer does to scale-invariant weights. Ctrl-C stops it all (exit "
                   "status 130).")
    demo.add_argument("--workers", type=_positive, default=2, help="worker processes (ranks)")
    demo.add_argument("--shards", type=_positive, default=1,
                      help="shard processes to start (without --servers)")
    demo.add_argument("--mode", default="sync", choices=["sync", "async"],
                      help="sync: the shards average the workers' gradients each step; async: "
                           "they apply each as it comes")
    demo.add_argument("--servers", default=None,
                      help="comma-separated shard addresses to use instead of starting shards "
                           "(default: start --shards shards)")
    demo.add_argument("--rank", type=int, default=None,
                      help="run only this worker (with --servers), e.g. one container of a "
                           "cluster (default: all --workers ranks)")
    demo.add_argument("--job", default=None, help="job name prefix (default: demo-<pid>)")
    demo.add_argument("--resume", action="store_true",
                      help="continue jobs of this --job name that have taken steps (a rerun "
                           "against shards that kept them, e.g. from their checkpoints); "
                           "without it such a rerun is refused")
    demo.add_argument("--tokens-file", default=None,
                      help='JSON {"job": "token"}: the bearer token each job\'s workers send '
                           "(default: no tokens)")
    demo.add_argument("--metrics-port", type=_port, default=None,
                      help="first shard's Prometheus port (shard k uses this + k; default: "
                           "free ports, printed at the start)")
    demo.add_argument("--compare", action="store_true",
                      help="train a BatchNorm net under Adam+L2, AdamW, AdamP, Adafactor and "
                           "Lion through one local shard, and plot the conv weights' norm and "
                           "the angle they travel; and AdamW's first steps with torch's ε and "
                           "with Keras's ε̂")
    demo.add_argument("--compare-out", default=None,
                      help="where --compare writes its plot (default: optserve/compare.png in "
                           "the temporary directory, printed at the end)")
    demo.add_argument("--steps", type=_positive, default=None,
                      help="training steps per optimizer (default: 150, and 300 with "
                           "--compare)")
    demo.add_argument("--optimizers", default="adamw,adamp,adafactor",
                      help="comma-separated list of optimizers to run, one after another "
                           f"(any of {', '.join(REGISTRY)})")
    demo.add_argument("--device", default="cpu", choices=["auto", "cpu", "reference"],
                      help="backend of the shards the demo starts")
    demo.set_defaults(func=_demo)

    bench = command("bench", "Run a benchmark and write its results (see bench/README.md).")
    bench.add_argument("what", choices=["kernels", "e2e", "load", "metrics", "gpu"],
                       help="which benchmark")
    bench.add_argument("--quick", action="store_true", help="a reduced set, for smoke checks")
    bench.add_argument("--emulate", action="store_true",
                       help="gpu: on the CuPy test double at toy sizes (CI), no GPU figures")
    bench.add_argument("--source", default=None,
                       help="gpu: the source checkout, for its tests (default: this package's)")
    bench.add_argument("--out", default=None,
                       help="results folder (default: bench/results in the source tree)")
    bench.set_defaults(func=_bench)

    health = command("health", "Exit 0 when the shard at ADDRESS reports SERVING, 1 otherwise (for "
                     "container health checks).")
    health.add_argument("address", help="the shard's host:port")
    health.add_argument("--service", default="",
                        help="service name ('' for the whole shard; default: '')")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    health.add_argument("--tls-ca", help="PEM CA of the shard's certificate: check over TLS "
                                         "(default: plaintext)")
    health.add_argument("--tls-cert", help="PEM client certificate, mutual TLS (default: none)")
    health.add_argument("--tls-key", help="PEM key of --tls-cert (default: none)")
    health.set_defaults(func=_health)

    kernels = command("compile-kernels", "Compile the CUDA kernels with NVRTC into the kernel "
                      "cache ($OPTSERVE_KERNEL_CACHE, else ~/.cache/optserve/kernels); no GPU "
                      "needed (the shard image does this at build time).")
    kernels.add_argument("--arch", type=int, nargs="+", required=True,
                         help="compute capabilities, e.g. 80 90 (sm_80, sm_90)")
    kernels.set_defaults(func=_compile_kernels)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_format = getattr(args, "log_format", "text")
    logs.configure(log_format)
    try:
        return args.func(args)
    except KeyboardInterrupt:   # Ctrl-C: whatever the command started is stopped by now
        if log_format == "json":
            logging.getLogger(f"optserve.{args.command}").warning("interrupted")
        else:
            print(f"\noptserve {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except SystemExit as e:
        if log_format == "json" and isinstance(e.code, str):   # its message, as a record
            logging.getLogger(f"optserve.{args.command}").error(e.code)
            return 1
        raise
