"""CPU timing of the torch backend at the benchmark shapes, at 1 and 2 threads, against a
baseline copy of the backend in the same run (issue 10).

The baseline is another checkout's ``apet_kernels/ops`` directory (e.g. from
``git archive <rev> apet_kernels | tar -x -C /tmp/base``), loaded under another package name, so
both run in one process and calls alternate: load on a shared machine hits both alike. Both are
called through ``reference.compress_dense`` (the torch backend's dense entry point, no
dispatcher). Reported: median and minimum of ``--reps`` calls after one warm-up (wall clock, or
with ``--clock cpu`` the process's CPU time, robust to other load at one thread), and
the FPS stage alone as each version runs it (in segment groups when the module has
``group_size``, else the whole batch at once). A report, not a test: nothing is asserted.

    .venv/bin/python -m bench.cpu_promises --baseline /tmp/base/apet_kernels/ops
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from types import ModuleType

import torch

from apet_kernels.ops import reference
from bench import shapes as shapes_mod


def _load_baseline(ops_dir: Path) -> ModuleType:
    """``ops_dir/reference.py`` (and the ``upload.py`` beside it) as ``apet_baseline_ops``."""
    package = importlib.util.spec_from_file_location(
        "apet_baseline_ops", ops_dir / "__init__.py", submodule_search_locations=[str(ops_dir)]
    )
    sys.modules["apet_baseline_ops"] = importlib.util.module_from_spec(package)
    spec = importlib.util.spec_from_file_location(
        "apet_baseline_ops.reference", ops_dir / "reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _fps_stage(module: ModuleType, x: torch.Tensor, m: int) -> None:
    """The FPS stage as ``module`` runs it on a dense batch ``x (S, N, D)`` float32."""
    S, N, D = x.shape
    step = module.group_size(N, D, x.element_size()) if hasattr(module, "group_size") else S
    for s0 in range(0, S, step):
        v = x[s0 : s0 + step]
        module.fps(v, torch.ones(v.shape[0], N, dtype=torch.bool), m)


def _alternate(calls: dict, reps: int, clock) -> dict[str, tuple[float, float]]:
    """(median, min) ms of each callable, timed in alternating rounds after one warm-up each."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()
    for _ in range(reps):
        for name, fn in calls.items():
            start = clock()
            fn()
            samples[name].append((clock() - start) * 1e3)
    return {name: (statistics.median(s), min(s)) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="an apet_kernels/ops dir")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--shapes", nargs="+", default=None, help="names from bench/shapes.py")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU time (all its threads), which a loaded machine's other "
        "processes barely touch; at 1 thread it stands for latency",
    )
    args = parser.parse_args()
    base = _load_baseline(args.baseline)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"torch {torch.__version__}; baseline {args.baseline}; new {reference.__file__}")
    print(f"ms ({args.clock} clock), median (min) of {args.reps} alternating calls")
    print("load average at start: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    print("| threads | shape | S×N×D keep | op before | op after | fps before | fps after |")
    print("|---|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for shape in shapes_mod.by_name(args.shapes, quick=False):
            if shape.cpu_skip_reason("torch") is not None:
                continue
            S, N, D, K = shape.segments, shape.tokens, shape.dim, shape.keep
            x = torch.randn(S, N, D, generator=torch.Generator().manual_seed(0))
            m = min(10, K)
            t = _alternate(
                {
                    "op_before": partial(base.compress_dense, x, K, 10, 1e-4, True),
                    "op_after": partial(reference.compress_dense, x, K, 10, 1e-4, True),
                    "fps_before": partial(_fps_stage, base, x, m),
                    "fps_after": partial(_fps_stage, reference, x, m),
                },
                args.reps,
                clock,
            )
            cells = " | ".join(f"{t[k][0]:.1f} ({t[k][1]:.1f})" for k in t)
            print(f"| {threads} | {shape.name} | {S}×{N}×{D} k{K} | {cells} |", flush=True)
    print("load average at end: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
