"""Helpers of the vLLM plugin tests: engines with test defaults, greedy runs with logprobs on both
sides (vLLM and the Hugging Face oracle), and the comparison.

The oracle is the Hugging Face shim at the same budget (``apply_apet(model, vision_keep=...,
layer=None)``, stage 1 only) or the unpatched HF model, on the same checkpoint, batch size 1.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

#: engine settings every test engine shares (CPU backend: float32, block size a multiple of 32)
ENGINE = dict(
    dtype="float32",
    max_model_len=512,
    block_size=32,
    max_num_seqs=8,
    enforce_eager=True,
    seed=0,
)
#: logprobs of the same tokens agree this closely (float32, CPU kernels vs torch SDPA)
LOGPROB_TOL = 1e-5


@dataclass
class Greedy:
    """One greedy continuation: prompt length, generated tokens and each one's logprob."""

    prompt_tokens: int
    tokens: list[int]
    logprobs: list[float]


def image(width: int, height: int, seed: int):
    """A deterministic random RGB PIL image."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def prompt(text: str, images: list[tuple[int, int, int]]) -> dict:
    """A vLLM prompt dict; ``images`` are ``(width, height, seed)`` (see :func:`image`)."""
    out = {"prompt": text}
    if images:
        out["multi_modal_data"] = {"image": [image(*spec) for spec in images]}
    return out


@contextlib.contextmanager
def engine(model: str, **kwargs):
    """An ``LLM`` with :data:`ENGINE` defaults (``kwargs`` override them), shut down on exit."""
    from vllm import LLM

    llm = LLM(model=model, **{**ENGINE, **kwargs})
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def stock_greedy(model: str, specs: list[tuple[str, list]], max_tokens: int, **kwargs):
    """:func:`vllm_greedy` in stock vLLM: a fresh interpreter with ``VLLM_PLUGINS`` naming no
    installed plugin (vLLM loads plugins once per process, so the test process, which has loaded
    apet's, cannot start a stock engine). ``specs`` are :func:`prompt` arguments."""
    env = dict(os.environ, VLLM_PLUGINS="apet-disabled")
    args = json.dumps(dict(model=model, specs=specs, max_tokens=max_tokens, kwargs=kwargs))
    run = subprocess.run(
        [sys.executable, str(Path(__file__)), args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if run.returncode != 0:
        raise RuntimeError(f"stock vLLM run failed:\n{run.stderr[-4000:]}")
    line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return [Greedy(**g) for g in json.loads(line[len("RESULT ") :])]


def vllm_greedy(llm, prompts: list[dict], max_tokens: int) -> list[Greedy]:
    """Greedy continuations of ``prompts`` (vLLM prompt dicts), all in one ``generate`` call."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = []
    for out in outs:
        comp = out.outputs[0]
        lps = [step[tok].logprob for step, tok in zip(comp.logprobs, comp.token_ids, strict=True)]
        result.append(Greedy(len(out.prompt_token_ids), list(comp.token_ids), lps))
    return result


@torch.no_grad()
def hf_greedy(model, inputs: dict, max_tokens: int) -> Greedy:
    """Greedy continuation of one HF input batch (batch size 1) with raw-logit logprobs."""
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos
    out = model.generate(
        **inputs,
        max_new_tokens=max_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    lps = [
        torch.log_softmax(step[0].double(), -1)[tok].item()
        for step, tok in zip(out.logits, tokens, strict=True)
    ]
    return Greedy(int(inputs["input_ids"].shape[1]), tokens, lps)


def max_logprob_diff(a: Greedy, b: Greedy) -> float:
    """Largest |logprob difference| over the common prefix of equal tokens; inf when the first
    tokens differ or the token lists differ."""
    if a.tokens != b.tokens:
        return float("inf")
    return max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True))


def assert_same(got: Greedy, want: Greedy, tol: float = LOGPROB_TOL) -> None:
    """Tokens equal and logprobs within ``tol``."""
    assert got.tokens == want.tokens, (got, want)
    diff = max_logprob_diff(got, want)
    assert diff <= tol, f"logprobs differ by {diff:.3g} > {tol:g}: {got} vs {want}"


def _main(args: str) -> None:
    spec = json.loads(args)
    import vllm.plugins

    with engine(spec["model"], **spec["kwargs"]) as llm:
        prompts = [prompt(text, [tuple(i) for i in images]) for text, images in spec["specs"]]
        out = vllm_greedy(llm, prompts, spec["max_tokens"])
    assert not vllm.plugins.plugins_loaded or os.environ["VLLM_PLUGINS"] == "apet-disabled"
    print("RESULT " + json.dumps([asdict(g) for g in out]), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1])
