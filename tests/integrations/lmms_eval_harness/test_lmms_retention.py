"""Retention from two lmms-eval results files (no lmms-eval needed: runs in the core suite too).

The results dicts are laid out as lmms-eval 0.7.3 writes them (``results[task]["metric,filter"]``,
``configs[task].metric_list``, ``efficiency.by_task``), as in the files the end-to-end test's runs
write."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from apet_kernels.integrations.lmms_eval.retention import compare, load, main, mean_retention


def results(scores: dict, tokens: dict | None = None) -> dict:
    """task -> {metric: value} as an lmms-eval results dict (metric order = metric_list)."""
    out = {"results": {}, "configs": {}, "efficiency": {"by_task": {}}}
    for task, metrics in scores.items():
        entry = {"alias": task}
        for name, value in metrics.items():
            entry[f"{name},none"] = value
            entry[f"{name}_stderr,none"] = 0.01
        out["results"][task] = entry
        out["configs"][task] = {"metric_list": [{"metric": m} for m in metrics]}
        if tokens:
            out["efficiency"]["by_task"][task] = {
                "docs_with_token_counts": 4,
                "total_input_tokens": 4 * tokens[task],
            }
    return out


BASE = results(
    {"pope": {"pope_accuracy": 0.86, "pope_f1_score": 0.85}, "gqa": {"exact_match": 0.62}},
    tokens={"pope": 640, "gqa": 620},
)
APET = results(
    {"pope": {"pope_accuracy": 0.817, "pope_f1_score": 0.80}, "gqa": {"exact_match": 0.589}},
    tokens={"pope": 96 + 64, "gqa": 96 + 44},
)


def test_headline_metric_ratio_and_mean():
    rows = {r.task: r for r in compare(BASE, APET)}
    assert rows["pope"].metric == "pope_accuracy"  # first of metric_list, not the stderr
    assert rows["pope"].retention == pytest.approx(0.817 / 0.86)
    assert rows["gqa"].retention == pytest.approx(0.589 / 0.62)
    assert rows["pope"].baseline_tokens == 640 and rows["pope"].apet_tokens == 160
    want = (0.817 / 0.86 + 0.589 / 0.62) / 2
    assert mean_retention(list(rows.values())) == pytest.approx(want)
    # Negative control: the run compared with itself retains exactly 100%.
    assert mean_retention(compare(BASE, BASE)) == 1.0


def test_metric_override_and_zero_baseline():
    (pope, _) = sorted(
        compare(BASE, APET, {"pope": "pope_f1_score"}), key=lambda r: r.task != "pope"
    )
    assert pope.metric == "pope_f1_score" and pope.retention == pytest.approx(0.80 / 0.85)
    zero = results({"t": {"exact_match": 0.0}})
    (row,) = compare(zero, results({"t": {"exact_match": 0.5}}))
    assert row.retention is None and mean_retention([row]) is None


@pytest.mark.parametrize(
    "apet, metrics, needle",
    [
        (results({"pope": {"pope_accuracy": 0.8}}), None, "the runs cover different tasks"),
        (APET, {"mme": "x"}, "--metric names tasks the runs do not have: mme"),
        (APET, {"gqa": "anls"}, "baseline run: task 'gqa' has no numeric metric 'anls'"),
    ],
)
def test_mismatches_raise_naming_them(apet, metrics, needle):
    with pytest.raises(ValueError, match=needle):
        compare(BASE, apet, metrics)


def test_cli_reads_folders_and_fails_on_ambiguity(tmp_path, capsys):
    for name, data in (("base", BASE), ("apet", APET)):
        (tmp_path / name / "model").mkdir(parents=True)
        (tmp_path / name / "model" / "20260101_results.json").write_text(json.dumps(data))
    assert main([str(tmp_path / "base"), str(tmp_path / "apet")]) == 0
    out = capsys.readouterr().out
    assert "pope\tpope_accuracy\t0.86\t0.817\t95.0%\t640.0 -> 160.0" in out
    assert f"mean retention over 2 tasks: {(0.817 / 0.86 + 0.589 / 0.62) / 2:.1%}" in out
    assert load(tmp_path / "base")["results"] == BASE["results"]
    (tmp_path / "base" / "model" / "20260102_results.json").write_text(json.dumps(BASE))
    assert main([str(tmp_path / "base"), str(tmp_path / "apet")]) == 2
    assert "must hold exactly one *_results.json, found 2" in capsys.readouterr().err


def test_module_runs_as_a_script(tmp_path):
    for name, data in (("b.json", BASE), ("a.json", APET)):
        (tmp_path / name).write_text(json.dumps(data))
    cmd = [sys.executable, "-m", "apet_kernels.integrations.lmms_eval.retention"]
    ok = subprocess.run(cmd + [str(tmp_path / "b.json"), str(tmp_path / "a.json")],
                        capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0 and "mean retention over 2 tasks" in ok.stdout, ok.stderr
    bad = subprocess.run(cmd + [str(tmp_path / "b.json"), str(tmp_path / "a.json"), "--metric",
                                "pope"], capture_output=True, text=True)  # fmt: skip
    assert bad.returncode != 0 and "--metric must be TASK=METRIC, got 'pope'" in bad.stderr
