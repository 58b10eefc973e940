"""vLLM serving benchmark: vanilla vs ApET stage 1 at 30% and 10% retention, one run.

    python -m bench.serve                  # CPU: scaled LLaVA-1.5 (576 visual tokens per image)
    python -m bench.serve --size 7B        # GPU: the LLaVA-1.5-7B architecture, random weights

For each configuration (vanilla = no ``apet`` key; ``{"apet": {"vision_keep": 0.3}}``;
``{"apet": {"vision_keep": 0.1}}``) an in-process ``AsyncLLM`` engine serves image requests (one
image and a short question each, greedy, a fixed number of output tokens) at concurrency 1, 4
and 16: requests/s, output tokens/s and time to first token (median and p90), each ratio against
vanilla at the same concurrency. The op's own cost is timed alone on the encoder batch's shape
(``compress_varlen`` over the images of one request) and reported as a share of the engine time
per request. Random weights time like trained ones; the text is meaningless.

Results go to ``bench/results/<device>/serve.{json,md}``. On CPU the figures rank the
configurations on this machine and predict nothing about a GPU. Needs vLLM (run it with
``.venv-vllm/bin/python``; ``tools/setup_vllm_env.sh`` sets that env up).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"vanilla": None, "apet-30%": 0.3, "apet-10%": 0.1}
CONCURRENCY = (1, 4, 16)


def _checkpoint(size: str) -> Path:
    """The LLaVA-1.5 architecture of ``bench/models.py`` at ``size``, saved for vLLM."""
    import transformers

    from bench import models
    from bench.vllm_checkpoint import clip_image_processor, llava_processor, save_for_vllm

    out = ROOT / ".vllm-cache" / "bench" / f"llava15-{size}"
    if (out / "done").exists():
        return out
    arch = models.llava15(full=size == "7B")
    dtype = torch.bfloat16 if size == "7B" else torch.float32
    model = arch.build(torch.device("cpu"), dtype, "sdpa")
    processor = llava_processor(model, transformers.LlavaProcessor, clip_image_processor(336))
    return save_for_vllm(model, processor, out)


def _image(seed: int):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (336, 336, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _prompt(i: int) -> dict:
    from bench.vllm_checkpoint import text

    question = f"{text(20, i, 500)} <image> {text(12, 100 + i, 500)}"
    return {"prompt": question, "multi_modal_data": {"image": _image(i)}}


async def _one(engine, prompt: dict, params, rid: str) -> tuple[float, float, int]:
    """(time to first token, end time, output tokens) of one request, in perf_counter seconds."""
    start = time.perf_counter()
    first, tokens = None, 0
    async for out in engine.generate(prompt, params, rid):
        tokens = len(out.outputs[0].token_ids)
        if first is None and tokens > 0:
            first = time.perf_counter() - start
    return first, time.perf_counter(), tokens


async def _level(engine, params, concurrency: int, requests: int, tag: str) -> dict:
    gate = asyncio.Semaphore(concurrency)

    async def run(i):
        async with gate:
            return await _one(engine, _prompt(i), params, f"{tag}-{concurrency}-{i}")

    start = time.perf_counter()
    results = await asyncio.gather(*(run(i) for i in range(requests)))
    wall = max(end for _, end, _ in results) - start
    ttft = sorted(first for first, _, _ in results)
    out_tokens = sum(n for _, _, n in results)
    return dict(
        concurrency=concurrency,
        requests=requests,
        wall_s=wall,
        requests_per_s=requests / wall,
        output_tokens_per_s=out_tokens / wall,
        ttft_median_s=statistics.median(ttft),
        ttft_p90_s=ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
    )


async def _serve(model: Path, keep, args) -> tuple[list[dict], int]:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    overrides = {} if keep is None else {"apet": {"vision_keep": keep}}
    engine_args = AsyncEngineArgs(
        model=str(model),
        hf_overrides=overrides,
        dtype="float32" if args.size == "scaled" else "bfloat16",
        max_model_len=1024,
        block_size=32,
        max_num_seqs=max(CONCURRENCY),
        enforce_eager=args.size == "scaled",
        limit_mm_per_prompt={"image": 1},
        seed=0,
        disable_log_stats=True,
    )
    engine = AsyncLLM.from_engine_args(engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    try:
        # warm-up (first-call costs), and the prompt length the engine reports
        warm = None
        async for out in engine.generate(_prompt(0), params, f"warm-{keep}"):
            warm = out
        levels = []
        for c in CONCURRENCY:
            n = max(args.requests, 2 * c)
            levels.append(await _level(engine, params, c, n, str(keep)))
        return levels, len(warm.prompt_token_ids)
    finally:
        engine.shutdown()
        del engine  # its __del__ shuts down again; run it now, not at interpreter exit
        gc.collect()


def _op_seconds(keep: float, size: str, reps: int = 20) -> tuple[float, float]:
    """(median, min) time of stage 1 alone on one request's image: 576 CLIP tokens of the
    tower's width (64 scaled, 1024 for 7B), on the engine's device. On a shared CPU the median
    carries other processes' load; the min is the closest to the op's own cost."""
    from apet_kernels import compress_varlen, keep_count

    device = torch.device(_device())
    dtype = torch.float32 if size == "scaled" else torch.bfloat16
    x = torch.randn(576, 64 if size == "scaled" else 1024, device=device, dtype=dtype)
    k = keep_count(576, keep)
    times = []
    for i in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        compress_varlen(x, [576], [k])
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call warms up
            times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _markdown(result: dict) -> str:
    lines = [
        f"# vLLM serving, {result['model']} ({result['device']})",
        "",
        f"{result['machine']}; vllm {result['vllm']}; torch {result['torch']}; "
        f"{result['max_tokens']} output tokens per request, greedy. Command: `{result['command']}`",
        "",
        "| config | prompt tokens | concurrency | req/s | out tok/s | TTFT median | TTFT p90 "
        "| req/s vs vanilla |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {lv["concurrency"]: lv for lv in result["configs"]["vanilla"]["levels"]}
    for name, cfg in result["configs"].items():
        for lv in cfg["levels"]:
            ratio = lv["requests_per_s"] / base[lv["concurrency"]]["requests_per_s"]
            lines.append(
                f"| {name} | {cfg['prompt_tokens']} | {lv['concurrency']} "
                f"| {lv['requests_per_s']:.2f} | {lv['output_tokens_per_s']:.1f} "
                f"| {lv['ttft_median_s'] * 1e3:.0f} ms | {lv['ttft_p90_s'] * 1e3:.0f} ms "
                f"| {ratio:.2f}x |"
            )
    loads = ", ".join(
        f"{name} {cfg['loadavg'][0]:.1f} -> {cfg['loadavg'][1]:.1f}"
        for name, cfg in result["configs"].items()
    )
    lines += [
        "",
        f"Machine load (1-minute average, before -> after each configuration): {loads}; on "
        f"{os.cpu_count()} CPUs a load above that count means other processes shared them.",
        "",
        "Stage 1 alone (compress_varlen on one 576-token image, timed outside the engine; the "
        "share uses the min of 20 calls) against the engine's time per request at concurrency 1:",
        "",
    ]
    for name, cfg in result["configs"].items():
        if "op_s" in cfg:
            first = cfg["levels"][0]
            per_request = first["wall_s"] / first["requests"]
            lines.append(
                f"- {name}: min {cfg['op_min_s'] * 1e3:.2f} ms (median {cfg['op_s'] * 1e3:.2f} ms)"
                f" = {100 * cfg['op_share_c1']:.2f}% of {per_request * 1e3:.0f} ms"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["scaled", "7B"], default="scaled")
    parser.add_argument("--requests", type=int, default=8, help="requests per level (min 2x c)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".vllm-cache" / "vllm"))
    import vllm

    model = _checkpoint(args.size)
    result = dict(
        model=f"LLaVA-1.5 {args.size} (bench/models.py, random weights)",
        device=_device(),
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        vllm=vllm.__version__,
        torch=torch.__version__,
        max_tokens=args.max_tokens,
        command=" ".join(["python -m bench.serve", *(sys.argv[1:] if argv is None else argv)]),
        configs={},
    )
    for name, keep in CONFIGS.items():
        t = time.perf_counter()
        load_before = os.getloadavg()[0]
        levels, prompt_tokens = asyncio.run(_serve(model, keep, args))
        # other processes' load (1-minute average) around this configuration's run: on a shared
        # machine it decides how far the figures can be trusted
        load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        cfg = dict(vision_keep=keep, prompt_tokens=prompt_tokens, levels=levels, loadavg=load)
        if keep is not None:
            cfg["op_s"], cfg["op_min_s"] = _op_seconds(keep, args.size)
            per_request = levels[0]["wall_s"] / levels[0]["requests"]
            cfg["op_share_c1"] = cfg["op_min_s"] / per_request
        result["configs"][name] = cfg
        print(f"bench.serve: {name} done in {time.perf_counter() - t:.0f} s", flush=True)
    out = args.out or ROOT / "bench" / "results" / result["device"] / "serve"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))
    return result


if __name__ == "__main__":
    main()
