"""Shared pieces of the evaluation reports: summary statistics, Markdown tables, JSON, and
the inputs of an evaluation artifact (those with a manifest, fingerprints of the others)."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from cellfoundry import artifacts, storage

__all__ = [
    "input_signatures",
    "markdown_table",
    "paired_difference",
    "summarize",
    "write_json",
]


def _num(x: float) -> float | None:
    """A JSON-safe float (None for NaN)."""
    x = float(x)
    return None if math.isnan(x) else x


def summarize(values: np.ndarray) -> dict[str, Any]:
    """n, mean, std (ddof 0), median, q25, q75, min, max of a 1-D array (None when empty)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return {"n": 0, **dict.fromkeys(("mean", "std", "median", "q25", "q75", "min", "max"))}
    q25, median, q75 = np.quantile(v, [0.25, 0.5, 0.75])
    return {
        "n": int(v.size), "mean": _num(v.mean()), "std": _num(v.std()), "median": _num(median),
        "q25": _num(q25), "q75": _num(q75), "min": _num(v.min()), "max": _num(v.max()),
    }  # fmt: skip


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Per-item differences a - b: their summary, how often a wins / loses / ties, and the
    two-sided Wilcoxon signed-rank p-value (None with fewer than one non-zero difference)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = a - b
    out = summarize(d)
    out.update(
        wins=int((d > 0).sum()), losses=int((d < 0).sum()), ties=int((d == 0).sum()),
        difference_of_means=_num(a.mean() - b.mean()) if a.size else None,
    )  # fmt: skip
    p = None
    if np.count_nonzero(d) >= 1:
        from scipy.stats import wilcoxon

        with warnings.catch_warnings():  # small samples: scipy warns about the approximation
            warnings.simplefilter("ignore")
            p = _num(wilcoxon(d, zero_method="wilcox").pvalue)
    out["wilcoxon_p"] = p
    return out


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.4f}"
    return str(x)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table (floats with 4 decimals, None as a dash)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (NaN written as null)."""
    path.write_text(json.dumps(data, indent=2, default=str, allow_nan=False) + "\n")
    return path


def _remote_signature(uri: str) -> str:
    """Sizes and modification times of an object, or of the objects under a prefix."""
    fs, path = storage.resolve(uri)
    found = fs.get_file_info(path)
    if found.type != pafs.FileType.File:
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    items = sorted((found if isinstance(found, list) else [found]), key=lambda i: i.path)
    return ";".join(
        f"{i.path[len(path):].lstrip('/') or i.base_name}:{i.size}:{i.mtime_ns}"
        for i in items if i.type == pafs.FileType.File
    )  # fmt: skip


def input_signatures(paths: Mapping[str, str | Path]) -> tuple[dict[str, str], dict[str, str]]:
    """Split an evaluation's inputs into artifacts (a folder with manifest.json, for
    ``write_artifact``'s ``inputs``) and the others, fingerprinted by their files' sizes and
    modification times (so a changed model or embeddings file is never mistaken for reuse).
    Paths may be ``s3://`` / ``gs://`` URIs (objects' sizes and modification times)."""
    with_manifest: dict[str, str] = {}
    others: dict[str, str] = {}
    for name, p in paths.items():
        if storage.is_remote(p):
            if storage.is_file(storage.join(p, artifacts.MANIFEST)):
                with_manifest[name] = storage.normalize(p)
            else:
                others[name] = _remote_signature(str(p))
            continue
        p = Path(p)
        if p.is_dir() and (p / artifacts.MANIFEST).is_file():
            with_manifest[name] = str(p)
            continue
        files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
        others[name] = ";".join(
            f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.exists()
        )
    return with_manifest, others
