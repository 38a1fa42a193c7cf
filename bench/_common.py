"""Small helpers every benchmark shares: where results go, what machine made them, and
writing them as JSON records plus a Markdown table."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any, Sequence

# Committed results live next to the benchmarks, whatever the working directory.
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def out_dir(requested: str | None) -> Path:
    """The folder results are written to: `requested` (e.g. --out) or bench/results."""
    path = Path(requested) if requested else RESULTS_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def cpu_description() -> str:
    """"CPU: <model name>, N cores", from /proc/cpuinfo where there is one."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:  # not Linux: fall back to what the platform module knows
        pass
    model = model or platform.processor() or platform.machine() or "unknown"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU: {model}, {cores} cores"


def device_description(gpu: str | None = None) -> str:
    """The device a benchmark ran on: the CPU, plus `gpu` (e.g. a CUDA device name) if given."""
    return f"GPU: {gpu} ({cpu_description()})" if gpu else cpu_description()


def today() -> str:
    return datetime.date.today().isoformat()


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, as numpy's default."""
    xs = sorted(samples)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def write_json(path: Path, records: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> None:
    """{"meta": {...}, "records": [...]}, one record per measurement."""
    with open(path, "w") as f:
        json.dump({"meta": meta or {}, "records": records}, f, indent=1)
        f.write("\n")


def markdown_table(records: list[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of `records`; columns are (key, heading). Floats get 3 significant
    digits (no exponent), missing values a dash."""
    def cell(value: Any) -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.0f}" if abs(value) >= 99.95 else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for r in records:
        lines.append("| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, title: str, device: str, sections: Sequence[str]) -> None:
    """A results page: a title naming the device and date, then the given sections."""
    text = f"# {title}\n\n{device}; {today()}.\n\n" + "\n\n".join(s.strip() for s in sections)
    path.write_text(text + "\n")
