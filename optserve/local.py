"""Servers as local child processes, for the demo, the benchmarks and the tests.

A server announces itself with one line on stdout, "... listening on ADDRESS" (a shard adds
" (metrics on port N)" when it serves metrics); `start` waits for that line.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Sequence

_LISTENING = re.compile(r"listening on (\S+)(?: \(metrics on port (\d+)\))?")


@dataclass
class LocalServer:
    proc: subprocess.Popen
    address: str
    metrics_port: int | None

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
