"""The GPU plan (bench/gpu_plan.py) dry-run on CPU, so its first GPU run cannot fail on a bug in
the plan itself.

Subprocess runs: the dry run (no GPU: plan printed, environment recorded, GPU phases skipped
with the reason, at most 8 files), the selftest (every phase's code on CPU at tiny sizes; the
pytest phase is left out here: its log parser is tested on its own) and a phase killed at its
deadline (in process: the summaries are still written and the next phase runs). In process
too: the checks that decide pass/fail, each with a negative control that shows it can fail.
Adds about 2 minutes on two shared cores under load (1 minute of CPU time), most of it the
selftest's child processes importing torch and transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import apet_kernels
from bench import gpu_plan, plan_checks, plan_record

ROOT = Path(__file__).resolve().parents[1]


def _plan(out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as on a fresh shell
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu_plan", "--out", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _files_ok(out: Path) -> list[str]:
    names = sorted(p.name for p in out.iterdir())
    assert all((out / n).is_file() for n in names), names  # no folders: nothing nested
    assert set(names) <= set(plan_record.FILES), set(names) - set(plan_record.FILES)
    assert len(names) <= plan_record.MAX_FILES
    return names


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("dry")
    return _plan(out, "--commit", "abc1234", timeout=120), out


def test_dry_run_prints_the_plan_and_exits_0(dry_run) -> None:
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    plan_lines = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert plan_lines[: len(gpu_plan.PHASES)] == list(gpu_plan.PHASE_NAMES)
    assert f"files: {len(plan_record.FILES)} at most" in proc.stdout
    assert len(plan_record.FILES) <= plan_record.MAX_FILES
    names = _files_ok(out)
    assert {"plan.jsonl", "results.json", "results.md"} <= set(names)
    assert f"files: {len(names)} of 8 allowed (ok)" in proc.stdout


def test_dry_run_records_environment_and_skips_with_reasons(dry_run) -> None:
    _, out = dry_run
    summary = json.loads((out / "results.json").read_text())
    env = summary["environment"]
    assert env["device"] == "cpu" and env["git_commit"] == "abc1234"
    assert "bench.gpu_plan" in env["command"] and env["copy_gbs"] > 0
    assert set(env["backends"]) == {"torch", "triton", "cuda"}
    status = {p["name"]: p for p in summary["phases"]}
    assert list(status) == list(gpu_plan.PHASE_NAMES)
    assert status["env"]["status"] == "ok"
    for name in gpu_plan.PHASE_NAMES[1:]:
        assert status[name]["status"] == "skipped" and "no CUDA device" in status[name]["note"]
    budgets = [p["budget_s"] for p in summary["plan"]]
    assert abs(sum(budgets) - 540) < 1  # the default budget, shared out
    assert "| env | " in (out / "results.md").read_text()


SELFTEST_PHASES = "env,merge_dot,correct,micro,cuda,e2e"


@pytest.fixture(scope="module")
def selftest(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, dict]:
    out = tmp_path_factory.mktemp("selftest")
    proc = _plan(out, "--selftest", "--phases", SELFTEST_PHASES, "--budget-s", "400")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out, json.loads((out / "results.json").read_text())


def test_selftest_runs_every_phase(selftest) -> None:
    _, out, summary = selftest
    status = {p["name"]: p["status"] for p in summary["phases"]}
    assert status == dict.fromkeys(SELFTEST_PHASES.split(","), "ok"), status
    errors = [r for r in summary["other"] if r["kind"] == "error"]
    assert not errors, errors
    _files_ok(out)


def test_selftest_checks_pass_and_cover_each_kind(selftest) -> None:
    _, _, summary = selftest
    checks = summary["checks"]
    assert all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]
    cases = " | ".join(c["case"] for c in checks)
    for part in ("triton dense", "float16", "float32", "ragged varlen", "batch == single"):
        assert part in cases, (part, cases)
    dense = [c for c in checks if "varlen_equals_dense" in c]
    assert dense and all(c["varlen_equals_dense"] and c["deterministic"] for c in dense)
    skipped = [r["case"] for r in summary["other"] if r["kind"] == "skip"]
    assert any("CUDA graph" in case for case in skipped)  # said, not silently left out


def test_selftest_measures_micro_and_e2e(selftest) -> None:
    _, out, summary = selftest
    micro = {r["provider"]: r for r in summary["microbench"]}
    assert micro["torch"]["status"] == "ok" and micro["eager_released"]["status"] == "ok"
    assert micro["torch"]["median_ms"] > 0 and micro["torch"]["floor_fraction"] > 0
    assert micro["triton"]["status"] == "skipped" and micro["triton"]["reason"]
    assert summary["profiles"] and summary["profiles"][0]["kernels"] == 0  # CPU: no kernels
    e2e = summary["e2e"]
    assert {r["variant"] for r in e2e if r["status"] == "ok"} >= {"vanilla", "apet", "fastv"}
    text = (out / "results.md").read_text()
    assert "## Correctness" in text and "## Microbenchmarks" in text and "End-to-end" in text


def test_phase_past_its_deadline_is_killed_and_results_kept(tmp_path, monkeypatch) -> None:
    # A child that ignores its deadline (a hang, a kernel that never returns) stands in for the
    # phase: the plan must kill it and its children at the phase's deadline and go on.
    args = gpu_plan._parse(["--out", str(tmp_path), "--phases", "micro,e2e", "--selftest"])
    plan = gpu_plan.Plan(args, has_cuda=False)
    hang = "import subprocess, sys, time; print('started', flush=True); "
    hang += (
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"
    )
    monkeypatch.setattr(plan, "_child_cmd", lambda phase, deadline: [sys.executable, "-c", hang])
    t0 = time.time()
    plan.run_phase(gpu_plan.PHASES[4], budget=6.0, end_offset=6.0)
    assert time.time() - t0 < 15
    summary = json.loads((tmp_path / "results.json").read_text())
    (phase,) = summary["phases"]
    assert phase["name"] == "micro" and phase["status"] == "timeout", phase
    assert "started" in (tmp_path / plan_record.CONSOLE).read_text()  # its output was kept
    # The next phase still runs (here: a child that exits at once).
    monkeypatch.setattr(plan, "_child_cmd", lambda phase, deadline: [sys.executable, "-c", "0"])
    plan.run_phase(gpu_plan.PHASES[6], budget=20.0, end_offset=25.0)
    summary = json.loads((tmp_path / "results.json").read_text())
    assert [p["status"] for p in summary["phases"]] == ["timeout", "ok"]
    _files_ok(tmp_path)


def test_schedule_shares_the_budget_in_order() -> None:
    plan = gpu_plan.schedule(list(gpu_plan.PHASES), 540)
    assert [p.name for p, _, _ in plan] == list(gpu_plan.PHASE_NAMES)
    ends = [e for _, _, e in plan]
    assert ends == sorted(ends) and abs(ends[-1] - 540) < 0.5
    subset = gpu_plan.schedule([gpu_plan.PHASES[1], gpu_plan.PHASES[4]], 100)
    assert abs(sum(b for _, b, _ in subset) - 100) < 0.5  # renormalized over the chosen ones


def test_bad_arguments_name_the_value(tmp_path) -> None:
    with pytest.raises(SystemExit):
        gpu_plan.main(["--out", str(tmp_path), "--phases", "env,bogus"])
    with pytest.raises(SystemExit):
        gpu_plan.main(["--out", str(tmp_path), "--budget-s", "0"])


def test_parse_pytest_reads_plain_and_xdist_lines(tmp_path) -> None:
    log = tmp_path / "pytest.log"
    log.write_text(
        "tests/ops/test_gpu.py::test_a[x-triton] PASSED                    [ 10%]\n"
        "tests/ops/test_gpu.py::test_b[torch] SKIPPED (no CUDA device)     [ 20%]\n"
        "[gw1] [ 30%] FAILED tests/ops/test_gpu.py::test_c[triton-dense]\n"
        "[gw0] [ 40%] PASSED tests/ops/test_gpu.py::test_d\n"
        "FAILED tests/ops/test_gpu.py::test_c[triton-dense] - TypeError: backend\n"
        "============ 1 failed, 2 passed, 1 skipped in 3.21s ============\n"
    )
    counts, failed, last = gpu_plan._parse_pytest(log)
    assert (counts["PASSED"], counts["FAILED"], counts["SKIPPED"]) == (2, 1, 1)
    assert failed == ["tests/ops/test_gpu.py::test_c[triton-dense]"]
    assert last == "1 failed, 2 passed, 1 skipped in 3.21s"
    offset = log.stat().st_size
    with open(log, "a") as f:
        f.write("tests/ops/test_gpu.py::test_e PASSED [100%]\n")
    assert gpu_plan._parse_pytest(log, offset)[0]["PASSED"] == 1  # only what a rerun appended


def test_log_keeps_complete_records_after_a_cut(tmp_path) -> None:
    rec = plan_record.Recorder(tmp_path, "unit", echo=False)
    rec.write("check", case="a", ok=True)
    rec.write("micro", kind="micro", shape="s", provider="p", status="ok")  # a row's own kind
    with open(tmp_path / plan_record.LOG, "a") as f:
        f.write('{"t": 1, "phase": "unit", "kind": "che')  # killed mid-line
    records = plan_record.read_log(tmp_path)
    assert [r["kind"] for r in records] == ["check", "micro"]
    summary = plan_record.write_summaries(tmp_path)  # an incomplete row does not stop it
    assert summary["checks"][0]["case"] == "a" and summary["microbench"][0]["shape"] == "s"
    assert "tables not rendered: KeyError" in (tmp_path / plan_record.SUMMARY_MD).read_text()


# --- the pass/fail checks, each with a negative control ------------------------------------


@pytest.fixture
def tokens() -> torch.Tensor:
    return plan_checks.spread_input(2, 64, 32, torch.float32, "cpu", seed=0)


def test_compare_passes_the_oracle_and_fails_tampered_results(tokens) -> None:
    record, got = plan_checks.dense_vs_oracle(tokens, 12, "torch")
    assert record["ok"] and record["deterministic"] and record["rel_err"] < 1e-6, record
    want = plan_checks.flatten_dense(*apet_kernels.compress(tokens.double(), 12, backend="torch"))
    flat_x = tokens.reshape(-1, tokens.shape[-1])
    out, kept, assign = (t.clone() for t in got)
    assert plan_checks.compare(flat_x, (out, kept, assign), want)["ok"]

    bad_tokens = out.clone()
    bad_tokens[3] += 1e-3
    assert "implied means" in str(plan_checks.compare(flat_x, (bad_tokens, kept, assign), want))
    nan_tokens = out.clone()
    nan_tokens[0, 0] = float("nan")
    assert not plan_checks.compare(flat_x, (nan_tokens, kept, assign), want)["ok"]
    bad_kept = kept.clone()
    bad_kept[1] = bad_kept[1] + 1 if bad_kept[1] + 1 != bad_kept[2] else bad_kept[1] - 1
    assert "kept differs" in str(plan_checks.compare(flat_x, (out, bad_kept, assign), want))
    dropped = next(t for t in range(64) if t not in kept[:12].tolist())  # of segment 0
    bad_assign = assign.clone()
    bad_assign[dropped] = (assign[dropped] + 5) % 12  # another slot of segment 0's 12
    record = plan_checks.compare(flat_x, (out, kept, bad_assign), want)
    assert not record["ok"] and record["assign_diffs"] == 1 and record["max_cos_gap"] > 1e-5
    out_of_range = assign.clone()
    out_of_range[0] = out.shape[0]
    assert "out of range" in str(plan_checks.compare(flat_x, (out, kept, out_of_range), want))


def test_batch_vs_single_passes_and_catches_a_difference(monkeypatch) -> None:
    x = plan_checks.tie_input(3, 40, 16, torch.float32, "cpu", seed=1)
    assert plan_checks.batch_vs_single(x, 8, "torch")["ok"]
    real = apet_kernels.compress

    def off_by_one_ulp_alone(t, keep, **kwargs):  # a backend whose single calls round differently
        out = real(t, keep, **kwargs)
        if t.shape[0] == 1:
            out = out._replace(tokens=torch.nextafter(out.tokens, out.tokens + 1))
        return out

    monkeypatch.setattr(apet_kernels, "compress", off_by_one_ulp_alone)
    record = plan_checks.batch_vs_single(x, 8, "torch")
    assert not record["ok"] and "dense batch differs" in record["problems"][0]


def test_tie_input_has_exact_ties() -> None:
    x = plan_checks.tie_input(1, 200, 8, torch.float16, "cpu", seed=2)[0]
    assert torch.unique(x, dim=0).shape[0] < 60  # 24 rows and their doubles: many duplicates


def test_value_tolerance_is_two_ulps() -> None:
    assert plan_checks.value_tol(torch.float16) == pytest.approx(2 * 2**-10)
    assert plan_checks.value_tol(torch.bfloat16) == pytest.approx(2 * 2**-7)
    assert plan_checks.value_tol(torch.float32) == 1e-5
