"""Servers as local child processes, for the demo, the benchmarks and the tests.

A server announces itself with one line on stdout, "... listening on ADDRESS" (a shard adds
" (metrics on port N)" when it serves metrics; with --log-format json the line is a JSON
object with that message); `start` waits for that line.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

_LISTENING = re.compile(r'listening on ([^\s"]+)(?: \(metrics on port (\d+)\))?')


@dataclass
class LocalServer:
    proc: subprocess.Popen
    address: str
    metrics_port: int | None

    @property
    def metrics_url(self) -> str | None:
        """Its metrics endpoint, on the host it announced (None: it serves no metrics)."""
        if self.metrics_port is None:
            return None
        return f"http://{self.address.rsplit(':', 1)[0]}:{self.metrics_port}/metrics"

    def stop(self, timeout: float = 30.0) -> None:
        stop(self.proc, timeout)


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_all(procs: Sequence, timeout: float) -> None:
    """Stops child processes together: SIGTERM to all at once, then SIGKILL to those still
    running `timeout` seconds later. `procs` are subprocess.Popen or multiprocessing.Process
    objects (not started ones are skipped)."""
    procs = [p for p in procs if p.pid is not None]
    for p in procs:
        if _running(p):
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        if not _wait(p, max(0.0, deadline - time.monotonic())):
            p.kill()
            _wait(p, None)


def _running(p) -> bool:
    return p.poll() is None if isinstance(p, subprocess.Popen) else p.exitcode is None


def _wait(p, timeout: float | None) -> bool:
    """Waits for `p` to exit (reaping it); whether it did within `timeout`."""
    if isinstance(p, subprocess.Popen):
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    p.join(timeout)
    return p.exitcode is not None


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """Blocks SIGINT in this thread while child processes start, so that they start with it
    blocked (a signal mask survives fork and exec): a Ctrl-C at the terminal, which signals
    the whole foreground process group, then reaches only this process, which stops its
    children in order instead of each of them dying with its own traceback. A Ctrl-C that
    comes meanwhile is delivered when the block ends. Start children only inside; wait for
    them outside."""
    if threading.current_thread() is not threading.main_thread():
        yield   # only the main thread receives Python's signals
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class Terminated(SystemExit):
    """SIGTERM, inside `stopped_by_signals`; the process exits with status 143."""


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[None]:
    """Turns SIGINT (Ctrl-C) into KeyboardInterrupt and SIGTERM into Terminated (exit status
    143) inside, and ignores both from the first one on, so that the `finally` blocks that stop
    this process's children run to the end however often Ctrl-C is pressed. A signal this
    process was started ignoring (SIGINT in a background job) stays ignored. Unless a signal
    came, the previous handlers come back on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def stop(signum, _frame):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        received.append(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(128 + signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        if not received:
            for s, handler in previous.items():
                signal.signal(s, handler)


def shard_command(*args: str) -> list[str]:
    """`optserve server ARGS` with this interpreter; on a free port unless ARGS name one."""
    port = [] if "--port" in args else ["--port", "0"]
    return [sys.executable, "-m", "optserve", "server", *port, *args]


def start(argv: Sequence[str], log: str | os.PathLike | None = None,
          cwd: str | os.PathLike | None = None) -> LocalServer:
    """Runs `argv` and waits until it says where it listens. Its stderr goes to the file
    `log` (or nowhere); a process that exits or says anything else first is an error that
    quotes the end of that log."""
    return listening(launch(argv, log, cwd), log)


def launch(argv: Sequence[str], log: str | os.PathLike | None = None,
           cwd: str | os.PathLike | None = None) -> subprocess.Popen:
    """The first half of `start`, for starting several servers at once."""
    with open(log, "w") if log else open(os.devnull, "w") as stderr:
        return subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=stderr, text=True,
                                cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def listening(proc: subprocess.Popen, log: str | os.PathLike | None = None) -> LocalServer:
    """The second half of `start`: waits for the line that says where `proc` listens."""
    line = proc.stdout.readline()
    match = _LISTENING.search(line)
    if not match:
        proc.kill()
        proc.wait()
        tail = open(log).read()[-2000:] if log else ""
        raise RuntimeError(f"{' '.join(proc.args)} did not start: {line!r}\n{tail}")
    port = match.group(2)
    return LocalServer(proc, match.group(1), int(port) if port else None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
