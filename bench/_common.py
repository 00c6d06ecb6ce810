"""Helpers shared by the benchmarks: device, date, results files, memory sampling, tables.

Every benchmark writes ``bench/results/<stage>.json`` (DESIGN.md, Benchmarks)::

    {"device": "...", "date": "YYYY-MM-DD", "command": "...", "metrics": {"name": number, ...}}

Import ``cellfoundry.runtime`` before ``ray`` in a benchmark (loopback-only clusters); this
module never imports ``ray`` at import time.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shlex
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
OUT_DIR = BENCH_DIR / "out"  # scratch data (gitignored)

_MB = 1024.0**2


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown CPU" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def n_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_string() -> str:
    """E.g. ``cpu: Intel(R) Xeon(R) Processor, 2 cores`` (a GPU benchmark names its GPU instead)."""
    return f"cpu: {cpu_model()}, {n_cores()} cores"


def today() -> str:
    """Today's date, ``YYYY-MM-DD``."""
    return _dt.date.today().isoformat()


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that ran this benchmark, repo-relative, e.g. ``python bench/corpus.py --cells 20000``."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve() if argv else BENCH_DIR
    try:
        script_s = str(script.relative_to(REPO_ROOT))
    except ValueError:
        script_s = str(script)
    return shlex.join(["python", script_s, *argv[1:]])


def _check_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, (dict, list, tuple)):
            raise ValueError(f"metric {key!r} must be a single figure, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"metric {key!r} is {value}; measure it or leave it out")
        flat[str(key)] = value
    return flat


def write_results(
    stage: str,
    metrics: dict[str, Any],
    *,
    command: str | None = None,
    device: str | None = None,
    results_dir: Path = RESULTS_DIR,
) -> Path:
    """Write ``<results_dir>/<stage>.json`` in the DESIGN format (atomically); return its path.

    ``metrics`` is flat: name -> number (or a short string such as a unit note).
    """
    doc = {
        "device": device or device_string(),
        "date": today(),
        "command": command or command_line(),
        "metrics": _check_metrics(metrics),
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{stage}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    """``with timed() as t: ...`` then ``t["s"]`` holds the elapsed wall seconds."""
    out: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["s"] = time.perf_counter() - start


def is_ray_worker(proc: Any) -> bool:
    """Whether a psutil process is a Ray worker (``ray::...`` title or default_worker.py)."""
    try:
        name = proc.name()
        if name.startswith("ray::"):
            return True
        return any("default_worker.py" in part for part in proc.cmdline())
    except Exception:  # the process ended or is not ours to read
        return False


class BackgroundLoop:
    """Calls ``tick()`` every ``interval`` seconds in a daemon thread while in a ``with``
    block; ``tick()`` runs once more on exit."""

    interval: float = 0.2

    def tick(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.interval)

    def __enter__(self) -> BackgroundLoop:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.tick()


class MemorySampler(BackgroundLoop):
    """Peak memory of this process and of the Ray workers it started, sampled in a thread
    (with the host's 1-minute load average, to tell how busy the machine was).

    Every ``interval`` seconds it reads the RSS of the driver (this process) and of each Ray
    worker process among its descendants (a local cluster's raylet is a child of the
    driver, its workers are children of the raylet), so concurrent clusters of other
    processes are not counted. RSS of a worker includes the object-store pages it maps;
    ``uss`` (private memory) is sampled too when ``uss=True`` (slower: reads smaps).
    Uses the psutil that ships with Ray.
    """

    def __init__(self, interval: float = 0.2, uss: bool = True) -> None:
        import psutil
        import ray  # noqa: F401  (puts Ray's bundled psutil on sys.path)

        self._psutil = psutil
        self.interval = interval
        self.uss = uss
        self.me = psutil.Process(os.getpid())
        self.peak: dict[str, float] = {
            "driver_rss_mb": 0.0,
            "worker_rss_mb": 0.0,
            "worker_uss_mb": 0.0,
            "workers_total_uss_mb": 0.0,
            "all_rss_mb": 0.0,
        }
        self.max_workers = 0
        self.samples = 0
        self.load_sum = self.load_max = 0.0  # 1-minute load average of the host
        #: label of what runs now (set it around a phase); peaks are also kept per phase
        self.phase = ""
        self.by_phase: dict[str, dict[str, float]] = {}

    def tick(self) -> None:
        peak = self.peak
        try:
            driver = self.me.memory_info().rss / _MB
        except self._psutil.Error:
            return
        peak["driver_rss_mb"] = max(peak["driver_rss_mb"], driver)
        total_rss, total_uss, n, worker_max = driver, 0.0, 0, 0.0
        for proc in self.me.children(recursive=True):
            try:
                rss = proc.memory_info().rss / _MB
                total_rss += rss
                if not is_ray_worker(proc):
                    continue
                n += 1
                worker_max = max(worker_max, rss)
                peak["worker_rss_mb"] = max(peak["worker_rss_mb"], rss)
                if self.uss:
                    uss = proc.memory_full_info().uss / _MB
                    total_uss += uss
                    peak["worker_uss_mb"] = max(peak["worker_uss_mb"], uss)
            except self._psutil.Error:
                continue
        peak["workers_total_uss_mb"] = max(peak["workers_total_uss_mb"], total_uss)
        peak["all_rss_mb"] = max(peak["all_rss_mb"], total_rss)
        self.max_workers = max(self.max_workers, n)
        self.samples += 1
        load = os.getloadavg()[0]
        self.load_sum += load
        self.load_max = max(self.load_max, load)
        if self.phase:
            ph = self.by_phase.setdefault(self.phase, {"worker_rss_mb": 0.0, "driver_rss_mb": 0.0})
            ph["worker_rss_mb"] = max(ph["worker_rss_mb"], worker_max)
            ph["driver_rss_mb"] = max(ph["driver_rss_mb"], driver)

    @contextmanager
    def in_phase(self, label: str) -> Iterator[None]:
        """Attribute samples taken inside the block to ``label`` (nesting restores the outer)."""
        outer, self.phase = self.phase, label
        try:
            yield
        finally:
            self.phase = outer

    def result(self) -> dict[str, float]:
        """Peaks in MB (``driver_rss_mb``, ``worker_rss_mb``, ``worker_uss_mb``, ...)."""
        return {
            **{k: round(v, 1) for k, v in self.peak.items()},
            "max_workers": self.max_workers,
            "host_load_1m_mean": round(self.load_sum / max(1, self.samples), 2),
            "host_load_1m_max": round(self.load_max, 2),
        }

    def phase_result(self) -> dict[str, dict[str, float]]:
        """Peak worker and driver RSS (MB) per phase label."""
        return {p: {k: round(v, 1) for k, v in d.items()} for p, d in self.by_phase.items()}


def refuse_imported(modules: Sequence[str]) -> None:
    """Raise if a dry run imported any of ``modules``: the GPU image lacks them, so the dry
    run would pass where the GPU run fails."""
    import sys

    leaked = [m for m in modules if sys.modules.get(m) is not None]
    if leaked:
        raise RuntimeError(f"the benchmark imported {leaked}: the GPU image lacks them")


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain fixed-width text table (numbers right-aligned)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 100 else f"{v:,.3g}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    text = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(header)]
    numeric = [all(isinstance(r[i], (int, float)) for r in rows) for i in range(len(header))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        )

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in text]
    return "\n".join(out)


def update_results_section(
    stage: str, lines: Sequence[str], *, row: str | None = None, device: str | None = None
) -> Path:
    """Replace ``stage``'s section of RESULTS.md (between its begin/end markers; appended
    when missing) with ``lines``. With ``row``: keep the section's earlier result rows
    (``| 2...``) of other devices (second column != ``device``) and append ``row``."""
    path = BENCH_DIR / "RESULTS.md"
    begin, end = f"<!-- bench/{stage}.py: begin -->", f"<!-- bench/{stage}.py: end -->"
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    kept: list[str] = []
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        section, after = rest.split(end, 1)
        if row is not None:
            kept = [
                ln for ln in section.splitlines()
                if ln.startswith("| 2") and ln.split("|")[2].strip() != device
            ]  # fmt: skip
    else:
        before, after = text.rstrip("\n") + "\n\n", "\n"
    body = [begin, *lines, *kept, *([row] if row is not None else []), end]
    path.write_text(before + "\n".join(body) + after)
    return path
