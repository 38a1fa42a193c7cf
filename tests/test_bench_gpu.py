"""`optserve bench gpu`, the prepared device run (bench/gpu.py), in its `--emulate` mode on the
CuPy test double: every section runs and the kill -9 restores the checkpoint, so that the
script works the first time it meets a GPU. Its figures are the emulation's and mean
nothing; the test checks what was measured, not how fast."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from optserve.bench import gpu
from support import CUPY_DOUBLE

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def emulated(cupy_double):
    if not CUPY_DOUBLE:
        pytest.skip("a GPU is visible: run `optserve bench gpu` itself")


def test_the_emulated_run_measures_every_section(emulated, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "optserve", "bench", "gpu", "--emulate",
                           "--out", str(tmp_path), "--source", str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu-emulated.json").read_text())
    sections = result["sections"]
    assert list(sections) == ["environment", "tests", "sanitizer", "kernels", "transfers",
                              "e2e", "crash"]
    assert not [name for name, s in sections.items() if "error" in s]
    assert result["meta"]["emulated"] and "test double" in result["meta"]["device"]
    assert result["meta"]["cold_compile_s"] > 0
    kernels = sections["kernels"]["records"]
    for optimizer in gpu.OPTIMIZERS:
        for layout in gpu.LAYOUTS:
            impls = {r["impl"] for r in kernels if (r["optimizer"], r["layout"]) == (optimizer, layout)}
            assert {"optserve", "optserve+sums"} <= impls, (optimizer, layout, impls)
    assert all("fraction_of_copy" in r for r in kernels
               if r["optimizer"] == "adamw" and r["impl"] == "optserve")
    assert {(r["memory"], r["direction"]) for r in sections["transfers"]["records"]} == {
        (m, d) for m in ("pinned", "pageable") for d in ("h2d", "d2h")}
    assert {r["backend"] for r in sections["e2e"]["records"]} == {"cpu", "cuda"}
    crash = sections["crash"]["records"][0]
    assert crash["ok"] and crash["rolled_back_to"] == 4 and crash["parameters_restored"]
    page = (tmp_path / "gpu-emulated.md").read_text()
    assert "EMULATED" in page and "Not judged" in page


def test_the_sanitizer_target_runs(emulated):
    """What compute-sanitizer runs on a GPU: here only that it runs to its end."""
    proc = subprocess.run([sys.executable, "-m", "optserve.bench.gpu", "sanitize-target"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "sanitize-target: done" in proc.stdout, proc.stderr[-3000:]


def test_a_missed_target_is_reported_as_missed(tmp_path):
    run = gpu.Run(tmp_path, emulate=False)
    base = dict(optimizer="adamw", layout="one-tensor", size="268M", params=1 << 28)
    run.sections["kernels"] = dict(records=[
        dict(base, impl="optserve", gb_per_s=2000.0, params_per_s=7e10),
        dict(base, impl="torch.AdamW(fused)", gb_per_s=2500.0, params_per_s=8.9e10),
        dict(base, impl="copy (28 B/param)", gb_per_s=4000.0, params_per_s=1.4e11)])
    gpu._ratios(run.sections["kernels"]["records"])
    run.sections["e2e"] = dict(records=[
        dict(backend="cuda", params_label="100M", speedup_over_cpu=3.0)])
    verdicts = gpu._verdicts(run)
    assert "0.79× torch.AdamW(fused) (target ≥ 1.0×): MISSED" in verdicts
    assert "50 % of the copy bandwidth (target ≥ 90 %): MISSED" in verdicts
    assert "3.00× as fast as --device cpu (target > 1): met" in verdicts
