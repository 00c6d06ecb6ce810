"""Write a :class:`~cellfoundry.tune.compare.Comparison` as metrics JSON, a Markdown report
with every method side by side, and the confusion-matrix and ROC figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cellfoundry.tune.compare import METHOD_TITLES, Comparison
from cellfoundry.tune.metrics import plot_confusion, plot_roc

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
CONFUSION_PNG = "confusion_matrix.png"
ROC_PNG = "roc.png"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(
    comparison: Comparison, *, title: str, main_method: str, notes: list[str] | None = None
) -> str:
    """The report: sizes, a table of every method (mean over splits), per-class F1."""
    summary = comparison.summary()
    lines = [f"# {title}", ""]
    for name, sizes in comparison.split_sizes.items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + " cells")
    lines += [f"- classes: {len(comparison.label_names)}", *(f"- {n}" for n in notes or []), ""]
    n_splits = len(comparison.results)
    lines += [
        f"## Test metrics{' (mean of ' + str(n_splits) + ' folds)' if n_splits > 1 else ''}",
        "",
        "| method | accuracy | macro F1 | ROC AUC (one-vs-rest, macro) |",
        "|---|---:|---:|---:|",
    ]
    for method, row in summary.items():
        if method == "majority_class":
            continue
        lines.append(f"| {METHOD_TITLES.get(method, method)} | {_fmt(row['accuracy'])} | "
                     f"{_fmt(row['macro_f1'])} | {_fmt(row['roc_auc_ovr'])} |")  # fmt: skip
    lines.append(
        f"| majority class (training) | {_fmt(summary['majority_class']['accuracy'])} | | |"
    )
    first = next(iter(comparison.results.values()))
    methods = list(first)
    lines += ["", f"## Per-class F1 ({next(iter(comparison.results))})", "",
              "| class | support | " + " | ".join(methods) + " |",
              "|---|---:|" + "---:|" * len(methods)]  # fmt: skip
    for name in comparison.label_names:
        support = first[methods[0]].metrics["per_class"][name]["support"]
        f1s = " | ".join(_fmt(first[m].metrics["per_class"][name]["f1"]) for m in methods)
        lines.append(f"| {name} | {support} | {f1s} |")
    lines += ["", f"Figures: `{CONFUSION_PNG}` ({METHOD_TITLES.get(main_method, main_method)}), "
              f"`{ROC_PNG}` (all methods, micro-averaged one-vs-rest).", ""]  # fmt: skip
    return "\n".join(lines)


def write_report(
    comparison: Comparison, directory: Path, *, title: str, main_method: str,
    notes: list[str] | None = None, extra: dict[str, Any] | None = None,
    metrics_file: str = METRICS_FILE, report_file: str = REPORT_FILE,
) -> dict[str, Any]:  # fmt: skip
    """Write ``metrics_file`` (JSON), ``report_file`` (Markdown), confusion_matrix.png (of
    ``main_method``) and roc.png (every method) into ``directory``; returns the JSON."""
    directory.mkdir(parents=True, exist_ok=True)
    data = {**comparison.to_json(), **(extra or {})}
    (directory / metrics_file).write_text(json.dumps(data, indent=2) + "\n")
    (directory / report_file).write_text(
        markdown(comparison, title=title, main_method=main_method, notes=notes)
    )
    first = next(iter(comparison.results.values()))
    main = first[main_method]
    plot_confusion(main.metrics["confusion_matrix"], comparison.label_names, directory / CONFUSION_PNG,
                   f"{METHOD_TITLES.get(main_method, main_method)}: test")  # fmt: skip
    plot_roc(main.y_true, {METHOD_TITLES.get(m, m): r.scores for m, r in first.items()},
             directory / ROC_PNG, "test ROC (one-vs-rest, micro)")  # fmt: skip
    return data
