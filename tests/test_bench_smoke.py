"""The benchmark main job in --quick mode: it runs end to end and writes complete results.

Runs ``python -m bench.run --quick --out <tmp>`` in a subprocess (the job sets process-wide
state: thread count, grad mode) and checks the JSON's structure. Timings are never asserted:
only that they are finite numbers where a row ran.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENVIRONMENT_FIELDS = (
    "device", "device_name", "cpu_threads", "load_average", "torch", "cuda", "triton",
    "transformers", "flash_attn", "apet_kernels", "git_commit", "python", "command",
    "timestamp_utc", "wall_s",
)  # fmt: skip
# What every row must report (the list); rows may carry more.
MICRO_FIELDS = (
    "shape", "model", "S", "N", "D", "K", "dtype", "device", "device_name", "provider", "status",
    "reason", "median_ms", "p20_ms", "p80_ms", "min_ms", "max_ms", "reps", "method",
    "graph_median_ms", "graph_reason", "bytes_moved", "achieved_gbs", "copy_gbs", "floor_ms",
    "floor_fraction", "peak_mem_mb", "stages_ms", "stages_reason", "kept_matches_torch",
)  # fmt: skip
E2E_FIELDS = (
    "arch", "size", "variant", "budget", "attn", "batch", "prompt_len", "visual_tokens",
    "visual_tokens_llm", "visual_tokens_last_layer", "device", "device_name", "dtype", "status",
    "reason", "prefill_ms", "prefill_p20_ms", "prefill_p80_ms", "generate_ms", "new_tokens",
    "tokens_per_s", "peak_mem_mb", "op_ms", "op_share",
)  # fmt: skip


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a real run's env
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--device", "cpu", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), out, proc.stdout


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_environment_is_recorded(results) -> None:
    payload, _, _ = results
    env = payload["environment"]
    assert set(ENVIRONMENT_FIELDS) <= set(env), set(ENVIRONMENT_FIELDS) - set(env)
    assert env["device"] == "cpu" and "bench.run" in env["command"] and "--quick" in env["command"]
    assert {"microbench", "e2e"} <= set(payload["settings"])
    assert isinstance(payload["headline"], list)


def test_microbench_rows_are_complete(results) -> None:
    payload, _, _ = results
    rows = payload["microbench"]
    providers = {r["provider"] for r in rows}
    assert {"torch", "triton", "cuda", "eager_released"} == providers
    for row in rows:
        assert set(MICRO_FIELDS) <= set(row), set(MICRO_FIELDS) - set(row)
        assert row["status"] in ("ok", "skipped", "error")
        if row["status"] != "ok":
            assert row["reason"], row  # every skip or failure says why
            continue
        for key in ("median_ms", "p20_ms", "p80_ms", "min_ms", "max_ms", "achieved_gbs",
                    "copy_gbs", "floor_ms"):  # fmt: skip
            assert _finite(row[key]), (key, row)
        assert row["reps"] >= 3 and row["bytes_moved"] > 0
        assert set(row["stages_ms"]) == {"fps", "residual", "select", "merge"}
    ran = {(r["provider"], r["status"]) for r in rows}
    assert ("torch", "ok") in ran and ("eager_released", "ok") in ran
    eager = [r for r in rows if r["provider"] == "eager_released"]
    assert all(r["kept_matches_torch"] for r in eager)  # the baseline selects the same tokens


def test_e2e_rows_are_complete(results) -> None:
    payload, _, _ = results
    rows = payload["e2e"]
    assert rows
    for row in rows:
        assert set(E2E_FIELDS) <= set(row), set(E2E_FIELDS) - set(row)
        assert row["status"] in ("ok", "skipped", "error")
        if row["status"] != "ok":
            assert row["reason"], row
            continue
        for key in ("prefill_ms", "generate_ms", "tokens_per_s"):
            assert _finite(row[key]), (key, row)
        assert row["prompt_len"] > 0
    by_variant = {r["variant"]: r for r in rows}
    assert by_variant["vanilla"]["status"] == "ok"
    assert by_variant["fastv"]["status"] == "ok"
    apet = by_variant["apet"]
    if apet["status"] == "ok":  # skipped (with the reason) while the shims are unavailable
        assert _finite(apet["op_share"]) and apet["visual_tokens_llm"] < apet["visual_tokens"]


def test_report_files_are_written(results) -> None:
    payload, out, stdout = results
    text = (out / "results.md").read_text()
    assert "## Microbenchmarks" in text and "## End-to-end prefill" in text
    assert "speedup vs eager_released" in text and "prefill speedup" in text
    assert "## Microbenchmarks" in stdout  # the table is printed at the end
    for png in ("results_op_vs_tokens.png", "results_latency_vs_budget.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = payload["selection_figure"]
    assert figure == "selection_llava15.png" or figure.startswith("skipped: ")
