"""The GPU plan's files: one JSON-lines log written as it goes, two summaries rebuilt from it.

Every measurement is one line of ``plan.jsonl``, appended with a single ``os.write`` on an
``O_APPEND`` descriptor and fsynced, so that several processes (the phase children and the
background CUDA build) can append to it at once and a kill at any moment loses at most the line
being written. ``results.json`` and ``results.md`` are rebuilt from the log after every phase.
Nothing else is written except the logs named in ``FILES``: the device tool returns at most 8
files.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

LOG = "plan.jsonl"
SUMMARY_JSON = "results.json"
SUMMARY_MD = "results.md"
CONSOLE = "console.log"  # every child's stdout and stderr, in order
PYTEST_LOG = "pytest.log"
BUILD_LOG = "cuda_build.log"
#: Every file the plan may write under its output folder.
FILES = (LOG, SUMMARY_JSON, SUMMARY_MD, CONSOLE, PYTEST_LOG, BUILD_LOG)
MAX_FILES = 8  # what the device tool returns from $OUT


class Recorder:
    """Appends records ``{"t", "phase", "kind", ...fields}`` to ``out/plan.jsonl``."""

    def __init__(self, out: Path, phase: str, echo: bool = True) -> None:
        self.path = Path(out) / LOG
        self.phase = phase
        self.echo = echo

    def write(self, kind: str, /, **fields) -> dict:
        # A row's own "kind" (bench rows carry "micro"/"e2e") yields to the record's.
        record = {**fields, "t": round(time.time(), 3), "phase": self.phase, "kind": kind}
        line = (json.dumps(record, default=str) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one call: lines from concurrent writers never interleave
            os.fsync(fd)
        finally:
            os.close(fd)
        if self.echo:
            print(progress_line(record), flush=True)
        return record


def progress_line(record: dict) -> str:
    """One short human line per record for the console (the log holds the full record)."""
    kind, phase = record["kind"], record["phase"]
    fields = {k: v for k, v in record.items() if k not in ("t", "phase", "kind")}
    if kind == "check":
        verdict = "ok" if fields.get("ok") else f"FAIL {fields.get('problems')}"
        return f"[{phase}] {fields.get('case')}: {verdict}"
    if kind == "micro":
        if fields.get("status") != "ok":
            return f"[{phase}] {fields['shape']} {fields['provider']}: {fields.get('reason')}"
        return f"[{phase}] {fields['shape']} {fields['provider']}: {fields['median_ms']:.3f} ms"
    if kind == "e2e":
        ms = fields.get("prefill_ms")
        tail = f"prefill {ms:.1f} ms" if ms is not None else fields.get("reason")
        return f"[{phase}] {fields['arch']} {fields['variant']} B={fields['batch']}: {tail}"
    text = json.dumps(fields, default=str)
    return f"[{phase}] {kind}: {text[:240]}"


def read_log(out: Path) -> list[dict]:
    """Every complete record of ``out/plan.jsonl`` (a line cut off by a kill is left out)."""
    path = Path(out) / LOG
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def summarize(records: list[dict]) -> dict:
    """``results.json``: the environment, the phase table and the records grouped by kind."""
    by_kind: dict[str, list[dict]] = {}
    for r in records:
        by_kind.setdefault(r["kind"], []).append(r)
    env = next(iter(by_kind.get("env", [])), {})
    return {
        "environment": env,
        "plan": by_kind.get("plan", [{}])[-1].get("phases", []),
        "phases": by_kind.get("phase", []),
        "checks": by_kind.get("check", []),
        "pytest": by_kind.get("pytest", []),
        "microbench": by_kind.get("micro", []),
        "graphs": by_kind.get("graph", []),
        "profiles": by_kind.get("profile", []),
        "builds": by_kind.get("build", []),
        "warmups": by_kind.get("warmup", []),
        "e2e": by_kind.get("e2e", []),
        "other": [r for k, rs in by_kind.items() if k not in _GROUPED for r in rs],
    }


_GROUPED = {
    "env",
    "plan",
    "phase",
    "check",
    "pytest",
    "micro",
    "graph",
    "profile",
    "build",
    "e2e",
    "warmup",
}


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def markdown(summary: dict) -> str:
    """``results.md``: what ran, what passed, what it measured."""
    env = summary["environment"]
    parts = [
        f"# GPU plan on {env.get('device_name', '?')} ({env.get('device', '?')})",
        "",
        f"commit {env.get('git_commit')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), "
        f"triton {env.get('triton')}, transformers {env.get('transformers')}, driver "
        f"{env.get('driver')}, nvcc {env.get('nvcc')}; `{env.get('command')}` at "
        f"{env.get('timestamp_utc')}. Copy bandwidth {_cell(env.get('copy_gbs'))} GB/s.",
        "",
        "## Phases",
        "",
    ]
    parts += _table(
        ["phase", "budget s", "status", "wall s", "note"],
        [
            [p["name"], p.get("budget_s"), p.get("status"), p.get("wall_s"), p.get("note")]
            for p in summary["phases"]
        ],
    )
    if summary["checks"]:
        parts += ["", "## Correctness (against the float64 oracle, bitwise where stated)", ""]
        parts += _table(
            ["case", "ok", "kept =", "assign diffs", "max cos gap", "rel err", "problems"],
            [
                [
                    c["case"],
                    c.get("ok"),
                    c.get("kept_equal"),
                    c.get("assign_diffs"),
                    c.get("max_cos_gap"),
                    c.get("rel_err"),
                    c.get("problems"),
                ]
                for c in summary["checks"]
            ],
        )
    for run in summary["pytest"]:
        parts += ["", f"## pytest `{run.get('args')}`", ""]
        parts.append(
            f"rc {run.get('rc')}, {run.get('wall_s')} s, timed out: {run.get('timed_out')}; "
            f"counts {run.get('counts')}; failed: {run.get('failed') or 'none'}"
        )
    if summary["warmups"]:
        parts += ["", "## Triton compile time (warmup per width and dtype)", ""]
        parts += _table(
            ["D", "dtype", "calls", "wall s"],
            [
                [w.get("D"), w.get("dtype"), w.get("calls"), w.get("wall_s")]
                for w in summary["warmups"]
            ],
        )
    if summary["builds"]:
        parts += ["", "## CUDA extension build", ""]
        parts += _table(
            ["archs", "status", "wall s", "reason"],
            [
                [b.get("archs"), b.get("status"), b.get("wall_s"), b.get("reason")]
                for b in summary["builds"]
            ],
        )
    if summary["graphs"] or summary["profiles"]:
        parts += ["", "## CUDA-graph replay and kernel counts", ""]
        prof = {(p["shape"], p["provider"]): p for p in summary["profiles"]}
        keys = list(dict.fromkeys([(g["shape"], g["provider"]) for g in summary["graphs"]]))
        keys += [k for k in prof if k not in keys]
        graphs = {(g["shape"], g["provider"]): g for g in summary["graphs"]}
        parts += _table(
            [
                "shape",
                "provider",
                "graph replay ms",
                "graph note",
                "kernels",
                "memcpy/set",
                "kernel time us",
                "top kernels (us)",
            ],
            [
                [
                    k[0],
                    k[1],
                    graphs.get(k, {}).get("median_ms"),
                    graphs.get(k, {}).get("reason"),
                    prof.get(k, {}).get("kernels"),
                    prof.get(k, {}).get("copies"),
                    prof.get(k, {}).get("kernel_us"),
                    prof.get(k, {}).get("top"),
                ]
                for k in keys
            ],
        )
    parts += ["", _bench_tables(summary, env)]
    errors = [r for r in summary["other"] if r["kind"] in ("error", "skip")]
    if errors:
        parts += ["", "## Errors and skips", ""]
        parts += [
            f"- {r['phase']} {r['kind']}: {r.get('case', '')}: {_cell(r.get('reason'))}"
            for r in errors
        ]
    return "\n".join(parts) + "\n"


def _bench_tables(summary: dict, env: dict) -> str:
    """The microbenchmark and end-to-end tables in the main job's format (bench/report.py)."""
    micro = [r for r in summary["microbench"] if "shape" in r]
    e2e = [r for r in summary["e2e"] if "arch" in r]
    if not micro and not e2e:
        return ""
    try:
        from . import report
    except Exception as exc:  # matplotlib missing: the JSON still has every row
        return f"(tables not rendered: {type(exc).__name__}: {exc})"
    needed = (
        "device",
        "device_name",
        "torch",
        "triton",
        "transformers",
        "flash_attn",
        "apet_kernels",
        "git_commit",
        "cpu_threads",
        "load_average",
        "command",
        "timestamp_utc",
    )
    payload_env = {k: env.get(k) for k in needed}
    try:
        text = report.markdown({"environment": payload_env, "microbench": micro, "e2e": e2e}, {})
    except Exception as exc:  # a malformed row must not stop the plan: the JSON has them all
        return f"(tables not rendered: {type(exc).__name__}: {exc})"
    return text.replace("# ApET benchmarks on", "## Benchmarks on", 1)


def write_summaries(out: Path) -> dict:
    """Rebuild ``results.json`` and ``results.md`` from the log; returns the summary."""
    out = Path(out)
    summary = summarize(read_log(out))
    summary["files"] = sorted(p.name for p in out.iterdir() if p.is_file())
    _atomic_write(out / SUMMARY_JSON, json.dumps(summary, indent=1, default=str) + "\n")
    _atomic_write(out / SUMMARY_MD, markdown(summary))
    return summary


def _atomic_write(path: Path, text: str) -> None:
    # Written beside and renamed, so a kill mid-write leaves the previous summary whole.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
