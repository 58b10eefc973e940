"""The main benchmark job: a sensible default on whatever hardware is present.

    python -m bench.run            # GPU: all shapes and providers + the 7B e2e study
                                   # CPU: torch + eager_released microbenchmarks (the shapes a CPU
                                   #      can hold) + the e2e study on scaled-down models, ~3 min
    python -m bench.run --quick    # tiny shapes and one tiny model: seconds (smoke test)

Writes ``results.json``, ``results.md`` and PNG plots under ``bench/results/<device>/``
(``bench/results/<device>/quick/`` for --quick), plus ``selection_llava15.png`` (what ApET kept,
drawn on a synthetic image), and prints the markdown table at the end.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import apet_kernels

from . import e2e, microbench, models, runtime, selection_demo
from . import providers as providers_mod
from . import shapes as shapes_mod
from .report import headline, write_report
from .results_io import RESULTS_ROOT, device_slug, environment


def _log(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    runtime.add_common_arguments(parser)
    parser.add_argument("--no-micro", action="store_true", help="skip the microbenchmarks")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end study")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    device = runtime.setup(args)
    out = Path(args.out) if args.out else RESULTS_ROOT / device_slug(device)
    if args.quick and not args.out:
        out = out / "quick"

    def log(message: str) -> None:
        _log(message, start)

    env = environment(device)
    log(
        f"device {env['device_name']} ({device.type}), torch {env['torch']}, "
        f"{env['cpu_threads']} CPU thread(s), load average {env['load_average']}"
    )
    for name, status in apet_kernels.backends(device).items():
        log(f"backend {name}: {status}")

    micro_cfg = microbench.config_for(device, args.quick)
    e2e_cfg = e2e.config_for(device, args.quick)
    payload = {
        "environment": env,
        "settings": {
            "microbench": {k: v for k, v in vars(micro_cfg).items() if k != "device"},
            "e2e": {k: v for k, v in vars(e2e_cfg).items() if k != "device"},
        },
        "microbench": [],
        "e2e": [],
    }
    if not args.no_micro:
        shapes = shapes_mod.by_name(None, args.quick)
        wanted = None if device.type == "cuda" else ["torch", "triton", "cuda", "eager_released"]
        payload["microbench"] = microbench.run_microbench(
            shapes, providers_mod.providers(device, wanted), micro_cfg, log
        )
    if not args.no_e2e:
        payload["e2e"] = e2e.run_e2e(list(models.ARCHS), e2e_cfg, log)
    path, reason = selection_demo.render(out, device)
    payload["selection_figure"] = path.name if path is not None else f"skipped: {reason}"
    log(f"selection figure: {payload['selection_figure']}")
    payload["headline"] = headline(payload["microbench"])
    payload["environment"]["wall_s"] = round(time.perf_counter() - start, 1)
    text = write_report(payload, out, stem="results")
    print(text)
    for h in payload["headline"]:
        print(
            f"torch backend vs eager_released, {h['size']}: {h['ratio']:.1f}x faster "
            f"({h['torch_ms']:.2f} ms vs {h['eager_ms']:.2f} ms, medians)"
        )
    log(f"wrote {out}/results.json, results.md and plots")
    return payload


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
