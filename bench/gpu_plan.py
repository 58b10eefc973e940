"""The first-GPU-run plan: every check and measurement that needs a GPU, in order of value, in one
command that fits the device tool's limits (15 minutes of device time with the machine's start,
10 minutes per command, at most 8 files back from $OUT).

    python -m bench.gpu_plan --out $OUT --budget-s 540 --commit <sha>   # on the GPU machine
    python -m bench.gpu_plan --out /tmp/plan                            # no GPU: dry run
    python -m bench.gpu_plan --out /tmp/plan --selftest                 # every phase, CPU, tiny

Each phase runs in a child process with its own deadline (its share of ``--budget-s``; time a
phase leaves unused passes to the next), killed at that deadline, so a hang, a crash or an
illegal memory access ends that phase only. The CUDA extension (sm_90 only) compiles in the
background from the start, on the machine's spare cores. Results are appended to
``plan.jsonl`` as they are measured, and ``results.json``/``results.md`` are rebuilt after
every phase: a kill at any moment still returns everything that finished. Without a GPU the
plan prints its phases, runs the environment record and skips the rest with the reason
(``--selftest`` runs every phase on CPU at tiny sizes instead). Always exits 0 once the
arguments parse: the results say what failed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import plan_record
from .plan_record import Recorder

ROOT = Path(__file__).resolve().parents[1]
BUILD_ARCHS = "9.0"  # Hopper (H100/H200) machine code only: one arch, no PTX
EXTENSIONS_DIR = "/tmp/apet_torch_extensions"
PYTEST_TEST_TIMEOUT_S = 90  # per test, where pytest-timeout is installed (the GPU image has it)
PYTEST_WORKERS = 4
MIN_PHASE_S = 5.0


@dataclass(frozen=True)
class Phase:
    name: str
    share: float  # of the total budget
    needs_cuda: bool
    what: str


# Shares of the budget, in order of value; time a phase leaves unused passes to the next.
PHASES = (
    Phase("env", 0.04, False, "environment: GPU, driver, versions, commit, command; copy GB/s"),
    Phase("merge_dot", 0.06, True, "Triton fp16/bf16 tensor-core merge (tl.dot) vs the oracle"),
    Phase(
        "correct",
        0.16,
        True,
        "Triton vs float64 oracle at the real shapes, fp16/bf16 first, "
        "dense+varlen; batch == single bitwise on near-ties; CUDA-graph capture",
    ),
    Phase("pytest", 0.18, True, "tests/ops/test_gpu.py (torch, triton; cuda not yet built)"),
    Phase(
        "micro",
        0.19,
        True,
        "eager + graph-replay ms, profiler kernels, bytes vs copy GB/s; "
        "torch and eager_released alongside",
    ),
    Phase(
        "cuda",
        0.20,
        True,
        f"CUDA extension for sm_{BUILD_ARCHS.replace('.', '')} (built in "
        "the background since the start): build time, correctness, timings",
    ),
    Phase("e2e", 0.17, True, "7B prefill: vanilla vs ApET vs FastV-style, built on the GPU"),
)
PHASE_NAMES = tuple(p.name for p in PHASES)


def schedule(phases: list[Phase], budget_s: float) -> list[tuple[Phase, float, float]]:
    """``(phase, budget_s, end offset)``: shares renormalized over the chosen phases; phase i
    must end by the sum of the budgets up to it, so time a phase leaves passes on."""
    total = sum(p.share for p in phases)
    plan, end = [], 0.0
    for p in phases:
        share = budget_s * p.share / total
        end += share
        plan.append((p, round(share, 1), round(end, 1)))
    return plan


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="results folder ($OUT on the device)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=540.0,
        help="wall-clock seconds for the whole plan (default 540)",
    )
    parser.add_argument(
        "--phases",
        default=",".join(PHASE_NAMES),
        help=f"comma-separated subset of {','.join(PHASE_NAMES)}",
    )
    parser.add_argument(
        "--commit", default=None, help="git commit of the tree (the device copy may have no .git)"
    )
    parser.add_argument(
        "--selftest", action="store_true", help="run every phase on CPU at tiny sizes (CI)"
    )
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    chosen = [n for n in args.phases.split(",") if n]
    unknown = sorted(set(chosen) - set(PHASE_NAMES))
    if unknown:
        parser.error(f"--phases: unknown {unknown}; choose from {list(PHASE_NAMES)}")
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    args.chosen = [p for p in PHASES if p.name in chosen]
    return args


def _run_child_phase(args: argparse.Namespace) -> int:
    """Inside a child: run one phase function against its deadline."""
    import torch

    from . import plan_phases

    torch.set_grad_enabled(False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = plan_phases.Context(
        out=Path(args.out),
        rec=Recorder(Path(args.out), args.phase),
        deadline=args.deadline,
        selftest=args.selftest,
        device=device,
        commit=args.commit,
    )
    plan_phases.PHASE_FUNCTIONS[args.phase](ctx)
    return 0


class Plan:
    """The parent process: schedules phases, runs each in a child, keeps the summaries fresh."""

    def __init__(self, args: argparse.Namespace, has_cuda: bool) -> None:
        self.args = args
        self.out = Path(args.out)
        self.has_cuda = has_cuda
        self.start = time.time()
        self.rec = Recorder(self.out, "plan")
        self.build: subprocess.Popen | None = None
        self.build_started = 0.0
        self.command = os.environ.get("APET_PLAN_COMMAND") or shlex.join(
            ["python", "-m", "bench.gpu_plan", *sys.argv[1:]]
        )

    # -- children ---------------------------------------------------------------------------

    def _env(self, jit: bool = False) -> dict:
        """A child's environment. ``jit``: the CUDA extension is JIT-built/loaded (only the build
        and the cuda phase: elsewhere a JIT load would wait for the background build's lock)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", APET_PLAN_COMMAND=self.command)
        env.pop("APET_CUDA_JIT", None)
        if jit:
            env.update(
                APET_CUDA_JIT="1",
                APET_CUDA_ARCHS=BUILD_ARCHS,
                APET_CUDA_JIT_VERBOSE="1",
                TORCH_CUDA_ARCH_LIST=BUILD_ARCHS,
                TORCH_EXTENSIONS_DIR=EXTENSIONS_DIR,
                MAX_JOBS=env.get("MAX_JOBS", "4"),
            )
        if self.has_cuda:
            env.pop("TRITON_INTERPRET", None)  # compiled kernels, never the interpreter
        else:
            env["TRITON_INTERPRET"] = "1"  # selftest: Triton on CPU tensors
        return env

    def _child_cmd(self, phase: str, deadline: float) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "bench.gpu_plan",
            "--out",
            str(self.out),
            "--phase",
            phase,
            "--deadline",
            f"{deadline:.3f}",
        ]
        if self.args.selftest:
            cmd.append("--selftest")
        if self.args.commit:
            cmd += ["--commit", self.args.commit]
        return cmd

    def _run(
        self, cmd: list[str], log_name: str, kill_at: float, jit: bool = False
    ) -> tuple[int | None, float]:
        """Run ``cmd`` with output appended to ``log_name`` and echoed; kill its process group
        at ``kill_at``. Returns (exit code or None when killed, seconds)."""
        t0 = time.time()
        with open(self.out / log_name, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=self._env(jit),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            pump = threading.Thread(target=_pump, args=(proc.stdout, log), daemon=True)
            pump.start()
            try:
                rc = proc.wait(timeout=max(0.1, kill_at - time.time()))
            except subprocess.TimeoutExpired:
                _kill(proc)
                rc = None
            pump.join(timeout=10)
        return rc, round(time.time() - t0, 1)

    def start_build(self) -> None:
        """The CUDA extension's JIT compile, in the background on the CPU cores."""
        cmd = self._child_cmd("cuda_build", self.start + self.args.budget_s)
        log = open(self.out / plan_record.BUILD_LOG, "ab")  # noqa: SIM115 (closed in finish_build)
        self.build = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=self._env(jit=True),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.build_log = log
        self.build_started = time.time()
        self.rec.write("build_started", archs=BUILD_ARCHS, pid=self.build.pid)

    def finish_build(self, wait_until: float) -> str:
        """Wait for the background build until ``wait_until``; kill it if still running."""
        if self.build is None:
            return "not started"
        try:
            rc = self.build.wait(timeout=max(0.1, wait_until - time.time()))
            note = f"build exited {rc} after {time.time() - self.build_started:.0f} s"
        except subprocess.TimeoutExpired:
            _kill(self.build)
            note = f"build killed after {time.time() - self.build_started:.0f} s (no time left)"
            wall = round(time.time() - self.build_started, 1)
            self.rec.write("build", archs=BUILD_ARCHS, status="timeout", wall_s=wall, reason=note)
        self.build_log.close()
        self.build = None
        return note

    # -- phases -----------------------------------------------------------------------------

    def run_phase(self, phase: Phase, budget: float, end_offset: float) -> None:
        deadline = min(self.start + end_offset, self.start + self.args.budget_s)
        if not self.has_cuda and not self.args.selftest:
            deadline = self.start + self.args.budget_s  # dry run: the GPU phases take no time
        t0 = time.time()
        left = deadline - t0
        status, note = None, None
        if phase.needs_cuda and not self.has_cuda and not self.args.selftest:
            status, note = "skipped", "no CUDA device (dry run; --selftest runs it on CPU)"
        elif left < MIN_PHASE_S:
            status, note = "skipped", f"{left:.0f} s left"
        else:
            elapsed = t0 - self.start
            print(
                f"== [{elapsed:5.0f} s] phase {phase.name} ({left:.0f} s): {phase.what}", flush=True
            )
            status, note = self._phase_body(phase, deadline, left)
        self.rec.write(
            "phase",
            name=phase.name,
            budget_s=budget,
            status=status,
            wall_s=round(time.time() - t0, 1),
            note=note,
        )
        plan_record.write_summaries(self.out)

    def _phase_body(self, phase: Phase, deadline: float, left: float) -> tuple[str, str | None]:
        note = None
        if phase.name == "pytest":
            rc, _ = self._pytest(deadline)
        else:
            jit = phase.name == "cuda"
            if jit:  # leave the measurements at least 40% of the phase (30 s at most)
                note = self.finish_build(deadline - min(30.0, 0.4 * left))
            cmd = self._child_cmd(phase.name, deadline - 3.0)
            rc, _ = self._run(cmd, plan_record.CONSOLE, deadline, jit=jit)
            if jit and rc == 0 and self.has_cuda and deadline - time.time() > 30:
                self._pytest(deadline, ["-k", "cuda"], jit=True)  # the GPU suite's cuda rows
        return ("timeout" if rc is None else "ok" if rc == 0 else f"exit {rc}"), note

    def _pytest(
        self, deadline: float, select: list[str] | None = None, jit: bool = False
    ) -> tuple[int | None, float]:
        """tests/ops/test_gpu.py (``select``: extra pytest arguments), output in pytest.log.
        With pytest-xdist (the GPU image has it) 4 workers share the GPU, so Triton's and
        inductor's compiles run in parallel and a crashed worker ends only its test."""
        import importlib.util

        args = [
            "tests/ops/test_gpu.py",
            "-v",
            "-rs",
            "--tb=short",
            "-p",
            "no:cacheprovider",
            "--durations=15",
            *(select or []),
        ]
        if importlib.util.find_spec("pytest_timeout") is not None:
            args += ["--timeout", str(PYTEST_TEST_TIMEOUT_S)]
        if self.has_cuda and importlib.util.find_spec("xdist") is not None:
            args += ["-n", str(PYTEST_WORKERS)]
        log = self.out / plan_record.PYTEST_LOG
        offset = log.stat().st_size if log.exists() else 0
        rc, wall = self._run(
            [sys.executable, "-m", "pytest", *args], plan_record.PYTEST_LOG, deadline, jit=jit
        )
        counts, failed, last = _parse_pytest(log, offset)
        self.rec.write(
            "pytest",
            args=" ".join(args),
            rc=rc,
            timed_out=rc is None,
            wall_s=wall,
            counts=counts,
            failed=failed,
            summary=last,
        )
        # pytest's exit code 1 means failed tests (reported above), not a broken phase.
        return (0 if rc in (0, 1, 5) else rc), wall

    def run(self) -> int:
        plan = schedule(self.args.chosen, self.args.budget_s)
        self._print_plan(plan)
        self.rec.write(
            "plan",
            command=self.command,
            budget_s=self.args.budget_s,
            has_cuda=self.has_cuda,
            selftest=self.args.selftest,
            phases=[dict(name=p.name, budget_s=b, ends_at_s=e, what=p.what) for p, b, e in plan],
        )
        if self.has_cuda and any(p.name == "cuda" for p in self.args.chosen):
            self.start_build()
        for phase, budget, end in plan:
            self.run_phase(phase, budget, end)
        if self.build is not None:
            self.finish_build(time.time())
        summary = plan_record.write_summaries(self.out)
        self._print_end(summary)
        return 0

    def _print_plan(self, plan) -> None:
        where = "GPU" if self.has_cuda else "CPU (selftest)" if self.args.selftest else "dry run"
        print(f"GPU plan ({where}), budget {self.args.budget_s:.0f} s, out {self.out}:", flush=True)
        for p, budget, end in plan:
            print(f"  {p.name:<10} {budget:6.1f} s  (by {end:6.1f} s)  {p.what}")
        print(
            f"  files: {len(plan_record.FILES)} at most ({', '.join(plan_record.FILES)}); "
            f"the device tool returns {plan_record.MAX_FILES}",
            flush=True,
        )

    def _print_end(self, summary: dict) -> None:
        print(f"== plan done in {time.time() - self.start:.0f} s", flush=True)
        for p in summary["phases"]:
            print(f"  {p['name']:<10} {p['status']:<8} {p['wall_s']:6.1f} s  {p.get('note') or ''}")
        checks = summary["checks"]
        bad = [c["case"] for c in checks if not c.get("ok")]
        print(f"  checks: {len(checks) - len(bad)} ok, {len(bad)} failed {bad or ''}")
        for run in summary["pytest"]:
            print(f"  pytest: {run['counts']} failed {run['failed'] or 'none'}")
        errors = [r for r in summary["other"] if r["kind"] == "error"]
        print(f"  errors: {len(errors)} {[r.get('case') for r in errors][:8] or ''}")
        for line in _headlines(summary):
            print(f"  {line}")
        files = summary["files"]
        verdict = "ok" if len(files) <= plan_record.MAX_FILES else "TOO MANY"
        print(
            f"  files: {len(files)} of {plan_record.MAX_FILES} allowed ({verdict}): "
            f"{', '.join(files)}",
            flush=True,
        )


def _headlines(summary: dict) -> list[str]:
    """One line per microbenchmark shape (median ms per provider, Triton's graph replay) and per
    e2e architecture and batch (prefill ms per variant): the end of the output the device tool
    shows first."""
    lines = []
    graphs = {(g["shape"], g["provider"]): g.get("median_ms") for g in summary["graphs"]}
    by_shape: dict[str, list[str]] = {}
    for r in summary["microbench"]:
        if r.get("status") == "ok":
            graph = graphs.get((r["shape"], r["provider"]))
            text = f"{r['provider']} {r['median_ms']:.3f}"
            by_shape.setdefault(r["shape"], []).append(
                text + (f" (graph {graph:.3f})" if graph is not None else "")
            )
    lines += [f"micro {shape} ms: {', '.join(parts)}" for shape, parts in by_shape.items()]
    by_run: dict[tuple, list[str]] = {}
    for r in summary["e2e"]:
        if r.get("status") == "ok":
            key = (r["arch"], r["batch"])
            by_run.setdefault(key, []).append(f"{r['variant']} {r['prefill_ms']:.1f}")
    lines += [f"e2e {a} B={b} prefill ms: {', '.join(v)}" for (a, b), v in by_run.items()]
    return lines


def _pump(stream, log) -> None:
    """Copy a child's output to its log file and to our stdout, line by line."""
    for line in iter(stream.readline, b""):
        log.write(line)
        log.flush()
        sys.stdout.write(line.decode(errors="replace"))
        sys.stdout.flush()


def _kill(proc: subprocess.Popen) -> None:
    """End a child we started and everything it started (its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _parse_pytest(path: Path, offset: int = 0) -> tuple[dict, list[str], str | None]:
    """Outcome counts, failed test ids and the final summary line of a ``pytest -v`` log from
    byte ``offset`` on. Reads both ``path::test STATUS [ n%]`` lines and pytest-xdist's
    ``[gw0] [ n%] STATUS path::test``; the short summary's ``FAILED path::test - ...`` lines
    are not counted twice (they carry no percentage)."""
    counts = dict.fromkeys(("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS"), 0)
    failed, last = [], None
    if not path.exists():
        return counts, failed, last
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    for line in text.splitlines():
        words = line.split()
        test = next((w for w in words if "::" in w), None)
        status = next((w for w in words if w in counts), None)
        if test and status and "%]" in line:
            counts[status] += 1
            if status in ("FAILED", "ERROR"):
                failed.append(test)
        if (
            line.startswith("=")
            and (" in " in line)
            and ("passed" in line or "failed" in line or "skipped" in line)
        ):
            last = line.strip("= ")
    return counts, failed, last


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.phase is not None:
        return _run_child_phase(args)
    import torch

    return Plan(args, torch.cuda.is_available()).run()


if __name__ == "__main__":
    sys.exit(main())
