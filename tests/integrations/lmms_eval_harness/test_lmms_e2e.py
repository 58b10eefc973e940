"""End to end through ``python -m lmms_eval eval`` with a tiny LLaVA-1.5 checkpoint and a local
task (needs lmms-eval: runs in .venv-lmms, ``make test-lmms-eval``; skipped elsewhere).

Each run is a fresh process, offline, with HF_HOME and the datasets cache in a temporary
directory; the five runs start together (each is mostly import and load time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

import torch  # noqa: E402
import transformers  # noqa: E402
from lmms_tiny_checkpoint import IMAGE_TOKEN, NUM_LAYERS, VISUAL_TOKENS, save_llava15, write_task  # noqa: E402

from apet_kernels.integrations import apply_apet  # noqa: E402
from apet_kernels.integrations.lmms_eval.retention import compare, load  # noqa: E402

TASK = "apet_tiny_vqa"


# name -> (model_args, task, --verbosity DEBUG): every run the tests look at. The strictness
# runs use lmms-eval's default verbosity, where an Exception during evaluation exits 0.
RUNS = {
    "preset": ("preset=llava-1.5/64", TASK, True),
    "baseline": ("apet=false", TASK, True),
    "badpreset": ("preset=llava-1.5/65", TASK, False),
    "fail": ("preset=llava-1.5/64,apet_backend=cuda", TASK, False),
    "ll": ("preset=llava-1.5/64", "apet_tiny_ll", False),
}


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    results: dict | None  # the *_results.json, None when none was written
    samples: list  # the logged samples, by doc_id

    def log(self) -> str:
        return self.stdout[-3000:] + self.stderr[-3000:]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lmms")
    save_llava15(root / "ckpt")
    write_task(root / "task")
    return root


def _command(work: Path, name: str, model_args: str, task: str, debug: bool) -> list[str]:
    return [
        sys.executable, "-m", "lmms_eval", "eval",
        "--model", "apet_llava",
        "--model_args", f"pretrained={work / 'ckpt'},dtype=float32,{model_args}",
        "--tasks", task,
        "--include_path", str(work / "task"),
        "--batch_size", "1",
        "--device", "cpu",
        "--output_path", str(work / f"out_{name}"),
        "--log_samples",
    ] + (["--verbosity", "DEBUG"] if debug else [])  # fmt: skip


@pytest.fixture(scope="module")
def runs(work) -> dict[str, Run]:
    """Every ``lmms_eval eval`` run, started together (each is mostly single-threaded import
    and load time, so together they take about as long as the slowest), offline, each with its
    own HF_HOME and datasets cache in the temporary directory."""
    procs = {}
    for name, (model_args, task, debug) in RUNS.items():
        env = dict(os.environ)
        env.update(
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            HF_HOME=str(work / f"hf_{name}"),
            LMMS_EVAL_DATASETS_CACHE=str(work / f"hf_{name}" / "datasets"),
            TOKENIZERS_PARALLELISM="false",
            OMP_NUM_THREADS="1",
        )
        procs[name] = subprocess.Popen(
            _command(work, name, model_args, task, debug),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        task = RUNS[name][1]
        results = sorted((work / f"out_{name}").glob("*/*_results.json"))
        samples = sorted((work / f"out_{name}").glob(f"*/*_samples_{task}.jsonl"))
        rows = [json.loads(x) for x in samples[0].read_text().splitlines()] if samples else []
        out[name] = Run(
            proc.returncode,
            stdout,
            stderr,
            json.loads(results[0].read_text()) if results else None,
            sorted(rows, key=lambda r: r["doc_id"]),
        )
    return out


def prompt_inputs(work: Path):
    """The model inputs of each sample as the stock llava_hf wrapper builds them, rebuilt here:
    ``<image>`` before the question, the checkpoint's chat template, the processor."""
    import datasets

    processor = transformers.AutoProcessor.from_pretrained(work / "ckpt")
    data = datasets.load_dataset(
        "parquet", data_files={"test": str(work / "task" / "data.parquet")}, split="test"
    )
    inputs = []
    for doc in data:
        question = f"{doc['question']}\nanswer using a single word ."
        messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}]
        text = processor.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        inputs.append(
            processor(images=[doc["image"].convert("RGB")], text=text, return_tensors="pt")
        )
    return processor, inputs


def reference_answers(work: Path, preset: str | None) -> list[str]:
    """Greedy answers of the checkpoint run directly through transformers (patched with
    ``apply_apet(model, preset)``, or unmodified for None): the oracle for the harness."""
    processor, inputs = prompt_inputs(work)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(work / "ckpt").eval()
    if preset is not None:
        apply_apet(model, preset)
    eos = processor.tokenizer.eos_token_id
    answers = []
    for x in inputs:
        with torch.inference_mode():
            out = model.generate(
                **x, do_sample=False, max_new_tokens=4, pad_token_id=eos, eos_token_id=eos
            )
        new = out[:, x["input_ids"].shape[-1] :]
        answers.append(processor.tokenizer.batch_decode(new, skip_special_tokens=True)[0])
    return answers


def text_tokens(work: Path) -> list[int]:
    """Non-visual tokens of each sample's prompt (the visual placeholders are 576 per image)."""
    processor, inputs = prompt_inputs(work)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    counts = []
    for x in inputs:
        ids = x["input_ids"][0]
        assert int((ids == image_id).sum()) == VISUAL_TOKENS
        counts.append(int((ids != image_id).sum()))
    return counts


def check_ok(run: Run) -> None:
    assert run.returncode == 0, run.log()
    assert run.results is not None and len(run.samples) == 4, run.log()


def test_preset_records_budget_and_matches_transformers(work, runs):
    """preset=llava-1.5/64: text + 96 tokens at prefill, text + 32 from layer 16 on, per sample
    and summed in lmms-eval's efficiency section; answers equal the patched HF model's."""
    run = runs["preset"]
    check_ok(run)
    texts = text_tokens(work)
    for row, text in zip(run.samples, texts, strict=True):
        (counts,) = row["token_counts"]
        assert counts["uncompressed_tokens"] == text + 576
        assert counts["input_tokens"] == text + 96
        assert counts["layer_tokens"] == text + 32
        assert counts["apet_layer"] == 16 < NUM_LAYERS
        assert counts["output_tokens"] == 4
    eff = run.results["efficiency"]["by_task"][TASK]
    assert eff["docs_with_token_counts"] == 4
    assert eff["total_input_tokens"] == sum(t + 96 for t in texts)
    assert run.results["throughput"]["avg_apet_layer_tokens"] == sum(t + 32 for t in texts) / 4
    answers = [row["filtered_resps"] for row in run.samples]
    assert answers == reference_answers(work, "llava-1.5/64")
    assert all(len(a.split()) == 4 for a in answers), answers  # 4 words: no special token
    # Negative control: the unmodified model answers differently on these inputs, so the
    # comparison above can tell a compressed run from an uncompressed one.
    assert answers != reference_answers(work, None)


def test_apet_false_is_the_unmodified_baseline(work, runs):
    """apet=false through the same wrapper: text + 576 tokens everywhere, no compression layer,
    answers equal the unmodified HF model's."""
    run = runs["baseline"]
    check_ok(run)
    for row, text in zip(run.samples, text_tokens(work), strict=True):
        (counts,) = row["token_counts"]
        assert counts["input_tokens"] == counts["layer_tokens"] == text + 576
        assert counts["uncompressed_tokens"] == text + 576
        assert "apet_layer" not in counts
    assert [row["filtered_resps"] for row in run.samples] == reference_answers(work, None)


def test_bad_preset_fails_the_run_naming_it(runs):
    run = runs["badpreset"]
    assert run.returncode != 0
    assert "unknown preset 'llava-1.5/65' for llava" in run.stderr
    assert "llava-1.5/64" in run.stderr  # the presets it could have been
    assert run.results is None


def test_generate_failure_is_not_an_empty_answer(runs):
    """A generate that raises (here: an explicitly requested backend this machine lacks) fails
    the run; the stock llava_hf would log it and record an empty answer."""
    run = runs["fail"]
    assert run.returncode != 0
    assert "generate failed" in run.stderr and "cuda" in run.stderr, run.log()
    assert run.results is None and run.samples == []


def test_loglikelihood_is_refused(runs):
    run = runs["ll"]
    assert run.returncode != 0
    assert "loglikelihood requests are refused" in run.stderr, run.log()
    assert run.results is None and run.samples == []


def test_retention_reads_the_runs_results(work, runs):
    """The retention tool on the two runs' real results files: the task's headline metric and
    the mean prefill tokens per sample each run recorded (text + 576 vs text + 96)."""
    check_ok(runs["baseline"])
    check_ok(runs["preset"])
    (row,) = compare(load(work / "out_baseline"), load(work / "out_preset"))
    assert (row.task, row.metric) == (TASK, "exact_match")
    assert row.baseline == runs["baseline"].results["results"][TASK]["exact_match,none"]
    assert row.apet == runs["preset"].results["results"][TASK]["exact_match,none"]
    text = sum(text_tokens(work)) / 4
    assert (row.baseline_tokens, row.apet_tokens) == (text + 576, text + 96)
