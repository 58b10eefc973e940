"""Accuracy retention of an ApET run against its ``apet=false`` baseline, from two lmms-eval
results files (standard library only: no torch, transformers or lmms-eval)::

    python -m apet_kernels.integrations.lmms_eval.retention results/base results/apet64

Each argument is a ``*_results.json`` written by ``lmms_eval eval --output_path ...`` or a
directory holding exactly one. Per task, the score is the task's headline metric (the first
numeric metric of its ``metric_list``, e.g. ``pope_accuracy`` or ``mme_perception_score``;
``--metric TASK=METRIC`` picks another), retention = ApET score / baseline score, and the
summary line is the mean over tasks (the paper's "average retention"). The tokens each run fed
the LLM per sample (``efficiency.total_input_tokens / docs_with_token_counts``) are printed
beside it, so a table shows the budget it was measured at.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    """One task of the comparison.

    Attributes:
        task: lmms-eval task name.
        metric: the metric compared (without the ``,filter`` suffix).
        baseline: the ``apet=false`` score.
        apet: the ApET score.
        retention: ``apet / baseline``, None when the baseline is 0.
        baseline_tokens: mean prefill tokens per sample of the baseline run (None if unrecorded).
        apet_tokens: the same for the ApET run.
    """

    task: str
    metric: str
    baseline: float
    apet: float
    retention: float | None
    baseline_tokens: float | None
    apet_tokens: float | None


def load(path: str | Path) -> dict:
    """The results dict of a ``*_results.json`` file, or of the one such file under a folder."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob("*_results.json"))
        if len(found) != 1:
            raise ValueError(
                f"{path} must hold exactly one *_results.json, found {len(found)}: "
                f"{', '.join(str(f) for f in found) or 'none'}"
            )
        path = found[0]
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"{path} is not an lmms-eval results file (no 'results' section)")
    return data


def _score(results: dict, task: str, metric: str, which: str) -> float:
    """The value of ``metric`` (any filter; ``none`` first) for ``task``."""
    entry = results["results"][task]
    keys = sorted(
        (k for k in entry if k.split(",")[0] == metric), key=lambda k: k != f"{metric},none"
    )
    for key in keys:
        value = entry[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    raise ValueError(f"{which} run: task {task!r} has no numeric metric {metric!r}")


def headline_metric(results: dict, task: str) -> str:
    """The first metric of the task's ``metric_list`` with a numeric value in the results."""
    names = [
        m.get("metric") for m in results.get("configs", {}).get(task, {}).get("metric_list", [])
    ]
    names += [k.split(",")[0] for k in results["results"][task]]  # files without configs
    for name in names:
        if not isinstance(name, str) or "_stderr" in name or name == "alias":
            continue
        try:
            _score(results, task, name, "")
        except ValueError:
            continue
        return name
    raise ValueError(f"task {task!r} has no numeric metric")


def _tokens(results: dict, task: str) -> float | None:
    eff = results.get("efficiency", {}).get("by_task", {}).get(task, {})
    docs = eff.get("docs_with_token_counts")
    total = eff.get("total_input_tokens")
    return total / docs if docs and total is not None else None


def compare(baseline: dict, apet: dict, metrics: dict[str, str] | None = None) -> list[Row]:
    """Per-task retention of ``apet`` against ``baseline`` (two results dicts, same tasks).

    Args:
        baseline: results of the ``apet=false`` run.
        apet: results of the ApET run.
        metrics: task -> metric name, replacing the headline metric for those tasks.

    Raises:
        ValueError: the runs cover different tasks, a ``metrics`` task is in neither, a metric is
            missing or not a number, or a score is not finite.
    """
    metrics = dict(metrics or {})
    tasks = sorted(baseline["results"])
    if tasks != sorted(apet["results"]):
        raise ValueError(
            f"the runs cover different tasks: baseline {tasks}, apet {sorted(apet['results'])}"
        )
    unknown = sorted(set(metrics) - set(tasks))
    if unknown:
        raise ValueError(f"--metric names tasks the runs do not have: {', '.join(unknown)}")
    rows = []
    for task in tasks:
        metric = metrics.get(task) or headline_metric(baseline, task)
        base = _score(baseline, task, metric, "baseline")
        comp = _score(apet, task, metric, "apet")
        if not (math.isfinite(base) and math.isfinite(comp)):
            raise ValueError(f"task {task!r}: {metric} is not finite ({base}, {comp})")
        rows.append(
            Row(
                task=task,
                metric=metric,
                baseline=base,
                apet=comp,
                retention=comp / base if base != 0 else None,
                baseline_tokens=_tokens(baseline, task),
                apet_tokens=_tokens(apet, task),
            )
        )
    return rows


def mean_retention(rows: list[Row]) -> float | None:
    """Mean of the per-task retentions (tasks with a zero baseline left out)."""
    values = [r.retention for r in rows if r.retention is not None]
    return sum(values) / len(values) if values else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[Row]) -> str:
    """A plain-text table, one line per task, then the mean."""
    lines = ["task\tmetric\tbaseline\tapet\tretention\ttokens/sample (baseline -> apet)"]
    for r in rows:
        lines.append(
            f"{r.task}\t{r.metric}\t{r.baseline:.4g}\t{r.apet:.4g}\t{_fmt(r.retention, '.1%')}\t"
            f"{_fmt(r.baseline_tokens, '.1f')} -> {_fmt(r.apet_tokens, '.1f')}"
        )
    lines.append(f"mean retention over {len(rows)} tasks: {_fmt(mean_retention(rows), '.1%')}")
    return "\n".join(lines)


def _metric_arg(text: str) -> tuple[str, str]:
    task, sep, metric = text.partition("=")
    if not sep or not task or not metric:
        raise argparse.ArgumentTypeError(f"--metric must be TASK=METRIC, got {text!r}")
    return task, metric


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", help="results of the apet=false run (file or folder)")
    parser.add_argument("apet", help="results of the ApET run (file or folder)")
    parser.add_argument("--metric", type=_metric_arg, action="append", default=[])
    args = parser.parse_args(argv)
    try:
        rows = compare(load(args.baseline), load(args.apet), dict(args.metric))
    except (OSError, ValueError) as exc:
        print(f"retention: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
