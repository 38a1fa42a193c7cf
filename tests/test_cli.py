"""The `optserve` command as a user meets it: its help, --version, and a demo that Ctrl-C
stops at once, with nothing left running and nothing left in the temporary directory."""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from optserve import compare, demo
from optserve.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["server", "demo", "bench", "health", "compile-kernels"]


def optserve(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "optserve", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, **kwargs)


# --- help and version ----------------------------------------------------------------------------

def test_version_is_the_installed_package_version():
    proc = optserve("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"optserve {importlib.metadata.version('optserve')}"


def test_top_level_help_lists_every_command_on_one_line():
    proc = optserve("--help")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    listed = {}
    for i, line in enumerate(lines):
        m = re.fullmatch(r"  (\S+)\s{2,}(\S.*)", line)
        if m and m.group(1) in COMMANDS:
            following = lines[i + 1] if i + 1 < len(lines) else ""
            assert not following.startswith("   "), f"{m.group(1)}'s summary wraps: {following!r}"
            listed[m.group(1)] = m.group(2)
    assert list(listed) == COMMANDS, proc.stdout
    parser_commands = set(subparsers(build_parser()))
    assert parser_commands == set(COMMANDS), "a command is missing from the help, or extra"
    assert "main job" not in proc.stdout


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def help_blocks(parser: argparse.ArgumentParser) -> dict[str, str]:
    """What `--help` shows for each option and positional (whitespace squeezed), keyed by its
    first option string, or by its name as the help writes it."""
    blocks, key = {}, None
    for line in parser.format_help().splitlines():
        if re.match(r"  \S", line):           # an option or positional starts in column 2
            key = line.split()[0].rstrip(",")
            blocks[key] = line
        elif key is not None and line.startswith("   "):
            blocks[key] += " " + line
        else:
            key = None
    return {k: " ".join(v.split()) for k, v in blocks.items()}


def help_key(action: argparse.Action) -> str:
    if action.option_strings:
        return action.option_strings[0]
    if action.metavar:
        return action.metavar
    return "{" + ",".join(action.choices) + "}" if action.choices else action.dest


SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction,
            argparse._VersionAction)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help_that_states_its_default(command, monkeypatch):
    """Each flag and positional of each command has help text in `optserve COMMAND --help`,
    and where the flag has a default, the help shows it: its value, or, where the default is
    "not given" (None), what that means, in words that say "default"."""
    monkeypatch.setenv("COLUMNS", "100")
    parser = subparsers(build_parser())[command]
    blocks = help_blocks(parser)
    checked = 0
    for action in parser._actions:
        key = help_key(action)
        assert key in blocks, f"optserve {command} --help does not show {key}"
        text = blocks[key]
        assert action.help and action.help is not argparse.SUPPRESS, f"{key}: no help"
        shown = text[len(key):].strip()
        assert len(shown) > 10, f"{key}: no help text shown ({text!r})"
        if isinstance(action, SWITCHES) or action.required or not action.option_strings:
            continue
        if action.default is None:
            assert "default" in shown, f"{key}: the help does not say what happens without it"
        else:
            assert f"default: {action.default}" in shown, f"{key}: default {action.default!r} " \
                                                          f"not shown in {shown!r}"
        checked += 1
    # flags with a default (compile-kernels has one flag, and it is required)
    assert checked >= {"server": 25, "demo": 10, "bench": 2, "health": 5}.get(command, 0)


def test_the_steps_help_states_the_defaults_the_demo_and_compare_use():
    blocks = help_blocks(subparsers(build_parser())["demo"])
    assert f"default: {demo.STEPS}, and {compare.STEPS} with --compare" in blocks["--steps"]


# --- Ctrl-C ---------------------------------------------------------------------------------------

def descendants(pid: int) -> dict[int, str]:
    """The processes below `pid` (from /proc): {pid: command line}."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                try:
                    found[child] = Path(f"/proc/{child}/cmdline").read_text().replace("\0", " ")
                except OSError:
                    continue
                todo.append(child)
    return found


def running(pid: int) -> bool:
    """Whether `pid` exists and has not exited (a zombie has: nobody here may reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def steps_taken(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == "optserve_steps_total")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("how", ["ctrl-c", "kill -INT", "kill -TERM"])
def test_a_signal_stops_the_demo_its_shard_and_workers(tmp_path, how):
    """`optserve demo` training with 2 workers: Ctrl-C at a terminal (SIGINT to the whole
    foreground process group), SIGINT to the demo alone, or SIGTERM (docker stop) ends it
    within 2 s with status 130 (143 for SIGTERM) and no traceback; no shard, worker or other
    child is left running, and no optserve-* folder is left in the temporary directory."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "optserve", "demo", "--workers", "2", "--steps", "100000",
         "--optimizers", "adamw,adamp"], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,   # its own process group
        env={**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"})
    try:
        head = []
        while not (m := re.search(r"(http://127\.0\.0\.1:\d+/metrics)", "".join(head))):
            line = proc.stdout.readline()
            assert line, "the demo ended before it printed its metrics URL:\n" + "".join(head)
            head.append(line)
        deadline = time.monotonic() + 120
        while steps_taken(m.group(1)) < 3:      # the shard has applied steps: training runs
            assert time.monotonic() < deadline, "no training steps within 120 s"
            time.sleep(0.2)
        children = descendants(proc.pid)
        kinds = " ".join(children.values())
        assert "optserve server" in kinds and kinds.count("--multiprocessing-fork") == 2, children

        start = time.monotonic()
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT if how == "kill -INT" else signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        took = time.monotonic() - start
        while time.monotonic() < start + 2.0 and any(map(running, children)):
            time.sleep(0.05)
        left = {pid: cmd for pid, cmd in children.items() if running(pid)}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = "".join(head) + rest
    assert proc.returncode == (143 if how == "kill -TERM" else 130), output
    assert took < 2.0, f"took {took:.2f} s\n{output}"
    assert "Traceback" not in output, output
    assert not left, f"still running 2 s after the signal: {left}"
    assert not list(tmp.glob("optserve-*")), list(tmp.iterdir())
