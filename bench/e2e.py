"""End-to-end prefill study: the uncompressed model against ApET and an attention-score baseline.

For each architecture (bench/models.py; 7B on GPU, scaled-down on CPU) and each variant:
    vanilla           the unpatched model, SDPA (on GPU forced to its flash backend)
    vanilla/fa2       the same with attn_implementation="flash_attention_2" (GPU, with flash_attn)
    apet <budget>     ``apply_apet(model, config)`` at the shims' presets (the paper's budgets)
    fastv <keep>      FastV-style pruning after layer 2 (bench/fastv.py): eager attention in the LLM
it records, at batch 1 and a larger batch: prefill latency (median, 20-80% spread), a fixed-length
greedy generate and its tokens/s, peak GPU memory, and the op's share of the prefill (profiler
time of ``apet::compress*`` over the wall time of the same profiled prefill).

Run alone::

    python -m bench.e2e [--quick] [--device cpu|cuda] [--archs llava15 qwen25vl video_llava]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import fastv as fastv_mod
from . import models, runtime, timing
from .results_io import device_name

E2E_FIELDS = (
    "kind",
    "arch",
    "size",
    "variant",
    "budget",
    "attn",
    "batch",
    "prompt_len",
    "visual_tokens",
    "visual_tokens_llm",
    "visual_tokens_last_layer",
    "device",
    "device_name",
    "dtype",
    "status",
    "reason",
    "prefill_ms",
    "prefill_p20_ms",
    "prefill_p80_ms",
    "prefill_reps",
    "generate_ms",
    "new_tokens",
    "tokens_per_s",
    "peak_mem_mb",
    "op_ms",
    "op_share",
    "attn_note",
)
OP_NAMES = ("apet::compress", "apet::compress_varlen")
# Budgets for model types the shims have no presets for: the Qwen2.5-VL setting (30%).
FALLBACK_BUDGETS = {"qwen2_5_vl": {"qwen2.5-vl/30%": dict(vision_keep=0.3)}}
FULL_LAYERS = {"llava15": 32, "video_llava": 32, "qwen25vl": 28}


@dataclass
class E2EConfig:
    """How hard to measure.

    Attributes:
        device, dtype: where and in what precision the models run.
        full: 7B architectures (True) or the scaled-down ones.
        batches: batch sizes per architecture (batch 1 and a larger one).
        prefill_reps, generate_reps, warmup: timed calls (the first call is always untimed).
        new_tokens: fixed length of the greedy generate.
        max_budgets: ApET budgets per architecture (the tightest ones first).
        budget_s: seconds per measurement after which timing stops early.
    """

    device: torch.device
    dtype: torch.dtype
    full: bool
    batches: dict[str, tuple[int, ...]]
    prefill_reps: int = 3
    generate_reps: int = 2
    warmup: int = 1
    new_tokens: int = 8
    max_budgets: int = 3
    budget_s: float = 10.0


def config_for(device: torch.device, quick: bool) -> E2EConfig:
    """7B at fp16 with batch 1 and 8 on GPU; scaled-down float32 with batch 1 and 2-4 on CPU."""
    if device.type == "cuda":
        big = {name: (1, 8) for name in models.ARCHS}
        return E2EConfig(
            device,
            torch.float16,
            True,
            big,
            prefill_reps=10,
            generate_reps=3,
            warmup=2,
            new_tokens=32,
            budget_s=60.0,
        )
    if quick:
        return E2EConfig(
            device,
            torch.float32,
            False,
            {"llava15": (1,)},
            prefill_reps=1,
            generate_reps=1,
            warmup=0,
            new_tokens=2,
            max_budgets=1,
            budget_s=2.0,
        )
    batches = {"llava15": (1, 4), "qwen25vl": (1, 2), "video_llava": (1, 2)}
    return E2EConfig(device, torch.float32, False, batches, max_budgets=2, generate_reps=1)


@dataclass
class Variant:
    """One way of running a model: ``setup(model)`` before, ``teardown(model)`` after."""

    name: str
    budget: str
    attn: str
    visual_llm: int
    visual_last: int
    setup: Callable[[torch.nn.Module], None] | None = None
    teardown: Callable[[torch.nn.Module], None] | None = None
    before_call: Callable[[dict], None] | None = None
    skip_reason: str | None = None


def load_shims() -> tuple[object | None, str | None]:
    """The Hugging Face shims module, or why it cannot be used."""
    try:
        shims = importlib.import_module("apet_kernels.integrations.transformers")
    except Exception as exc:  # not written yet, or transformers missing: a skip, not a crash
        return None, f"apet_kernels.integrations.transformers not importable: {exc}"
    missing = [n for n in ("ApetConfig", "apply_apet", "remove_apet") if not hasattr(shims, n)]
    if missing:
        return None, f"apet_kernels.integrations.transformers lacks {', '.join(missing)}"
    return shims, None


def _budgets(shims, model, arch: models.Arch, cfg: E2EConfig) -> dict[str, object]:
    """ApET configs to run: the shims' presets for this model type (else FALLBACK_BUDGETS),
    the tightest ``cfg.max_budgets``, with stage 2's layer scaled to the model's depth."""
    model_type = model.config.model_type
    try:
        named = dict(shims.presets(model_type))
    except Exception:  # no presets for this type (or no presets API)
        named = {}
    if not named:
        named = {k: shims.ApetConfig(**v) for k, v in FALLBACK_BUDGETS.get(model_type, {}).items()}

    def final_tokens(c) -> int:
        return _visual_counts(c, arch)[1]

    chosen = sorted(named.items(), key=lambda kv: final_tokens(kv[1]))[: cfg.max_budgets]
    scaled = {}
    for name, c in chosen:
        if c.layer is not None and not cfg.full:
            layer = round(c.layer * arch.num_layers / FULL_LAYERS[arch.name])
            c = c.replace(layer=min(max(layer, 1), arch.num_layers - 1))
        scaled[name] = c
    return scaled


def _visual_counts(c, arch: models.Arch) -> tuple[int, int]:
    """Visual tokens reaching the LLM's first layer and its last layer under ApET config ``c``."""
    first = arch.units * c.stage1_keep(arch.unit_tokens)
    per_unit = c.stage1_keep(arch.unit_tokens)
    last = arch.units * c.stage2_keep(per_unit) if c.layer is not None else first
    return first, last


def variants(arch: models.Arch, model, cfg: E2EConfig) -> list[Variant]:
    """Every variant this device can run, and the others with the reason they cannot."""
    full = arch.visual_tokens
    found = [Variant("vanilla", "all", "sdpa", full, full)]
    if cfg.device.type == "cuda":
        has_flash = importlib.util.find_spec("flash_attn") is not None
        found.append(
            Variant(
                "vanilla",
                "all",
                "flash_attention_2",
                full,
                full,
                setup=lambda m: m.set_attn_implementation("flash_attention_2"),
                teardown=lambda m: m.set_attn_implementation("sdpa"),
                skip_reason=None if has_flash else "flash_attn is not installed",
            )
        )
    shims, reason = load_shims()
    tightest = None
    if shims is None:
        found.append(Variant("apet", "-", "sdpa", 0, 0, skip_reason=reason))
    else:
        for name, c in _budgets(shims, model, arch, cfg).items():
            first, last = _visual_counts(c, arch)
            tightest = last if tightest is None else min(tightest, last)
            found.append(
                Variant(
                    "apet",
                    name,
                    "sdpa",
                    first,
                    last,
                    setup=lambda m, c=c: shims.apply_apet(m, c),
                    teardown=shims.remove_apet,
                )
            )
    keep = tightest if tightest is not None else max(1, full // 9)  # 9x: the 576 -> 64 ratio
    hooks: list[fastv_mod.FastV] = []

    def fastv_setup(m) -> None:
        m.set_attn_implementation({"text_config": "eager"})
        hooks.append(fastv_mod.FastV(m, arch.visual_token_id, keep))

    def fastv_teardown(m) -> None:
        hooks.pop().remove()
        m.set_attn_implementation({"text_config": "sdpa"})

    found.append(
        Variant(
            "fastv",
            f"{keep} @ layer {fastv_mod.FASTV_LAYER}",
            "eager",
            full,
            keep,
            setup=fastv_setup,
            teardown=fastv_teardown,
            before_call=lambda inputs: hooks[-1].set_inputs(inputs["input_ids"]),
        )
    )
    return found


@contextlib.contextmanager
def attention_backend(force_flash: bool) -> Iterator[None]:
    """Restrict SDPA to its flash kernel (the fast path ApET keeps) when ``force_flash``."""
    if force_flash:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            yield
    else:
        yield


def op_share(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Time inside ``apet::compress*`` during one profiled call of ``fn`` (device time on GPU,
    CPU time on CPU) and that call's wall time, both in ms. Their ratio is the op's share of the
    call; both come from the same call, so load from other processes cancels out."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        wall_ms = timing.measure_once(fn, device, None)
    total_us = 0.0
    for event in prof.key_averages():
        if event.key in OP_NAMES:
            if device.type == "cuda":
                total_us += getattr(event, "device_time_total", None) or event.cuda_time_total
            else:
                total_us += event.cpu_time_total
    return total_us / 1e3, wall_ms


def _empty_row(arch: models.Arch, variant: Variant, batch: int, cfg: E2EConfig) -> dict:
    row = dict.fromkeys(E2E_FIELDS)
    row.update(
        kind="e2e",
        arch=arch.name,
        size=arch.size,
        variant=variant.name,
        budget=variant.budget,
        attn=variant.attn,
        batch=batch,
        visual_tokens=arch.visual_tokens,
        visual_tokens_llm=variant.visual_llm,
        visual_tokens_last_layer=variant.visual_last,
        device=cfg.device.type,
        device_name=device_name(cfg.device),
        dtype=str(cfg.dtype).removeprefix("torch."),
        new_tokens=cfg.new_tokens,
    )
    return row


class _Runner:
    """One variant at one batch size: its row, inputs and the calls the study times."""

    def __init__(self, model, arch: models.Arch, variant: Variant, batch: int, cfg: E2EConfig):
        self.model, self.variant, self.cfg = model, variant, cfg
        self.row = _empty_row(arch, variant, batch, cfg)
        self.inputs = arch.make_inputs(batch, cfg.device, cfg.dtype)
        self.row["prompt_len"] = self.inputs["input_ids"].shape[1]
        self.peak = 0
        self.force_flash = cfg.device.type == "cuda" and variant.attn == "sdpa"

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The variant in force (patch applied, attention switched) for the duration."""
        if self.variant.setup is not None:
            self.variant.setup(self.model)
        try:
            if self.variant.before_call is not None:
                self.variant.before_call(self.inputs)
            with torch.inference_mode(), attention_backend(self.force_flash):
                yield
        finally:
            if self.variant.teardown is not None:
                self.variant.teardown(self.model)

    def prefill(self) -> object:
        return self.model(**self.inputs, use_cache=True, logits_to_keep=1)

    def generate(self) -> object:
        n = self.cfg.new_tokens
        return self.model.generate(
            **self.inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False
        )

    def timed(self, fn: Callable[[], object], track_peak: bool = False) -> float:
        """Milliseconds of one call with the variant in force (set-up excluded)."""
        dev = self.cfg.device
        with self.active():
            if track_peak and dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ms = timing.measure_once(fn, dev, None)  # weights dwarf the L2: no flush
            if track_peak and dev.type == "cuda":
                self.peak = max(self.peak, torch.cuda.max_memory_allocated())
        return ms

    def warm_up(self) -> None:
        """Untimed calls (lazy init, allocator growth), and the op's share for ApET. If SDPA's
        flash kernel rejects the model (e.g. an explicit mask), the variant is timed with SDPA's
        own kernel choice and the row says so."""
        try:
            with self.active():
                self.prefill()
                timing.synchronize(self.cfg.device)
        except RuntimeError as exc:
            if not self.force_flash:
                raise
            self.force_flash = False
            self.row["attn"] = "sdpa (default kernels)"
            self.row["attn_note"] = f"flash-only SDPA rejected this variant: {exc}"[:300]
        with self.active():
            for _ in range(self.cfg.warmup):
                self.prefill()
            if self.cfg.device.type == "cuda":  # on CPU the first generate is not slower
                self.generate()
            timing.synchronize(self.cfg.device)
            if self.variant.name == "apet":
                op_ms, wall_ms = op_share(self.prefill, self.cfg.device)
                self.row.update(op_ms=op_ms, op_share=op_ms / wall_ms)


def _guard(runner: _Runner, step: Callable[[], None]) -> bool:
    """Run ``step``; on failure mark the runner's row (OOM: skipped, else error)."""
    try:
        step()
    except Exception as exc:  # one failing variant must not stop the study
        status = "skipped" if isinstance(exc, torch.OutOfMemoryError) else "error"
        runner.row.update(status=status, reason=f"{type(exc).__name__}: {exc}"[:300])
        timing.synchronize(runner.cfg.device)
        return False
    return True


def measure_batch(
    model, arch: models.Arch, found: list[Variant], batch: int, cfg: E2EConfig
) -> list[dict]:
    """Every variant at one batch size. Prefills, then generates, are timed in interleaved
    rounds (vanilla, apet..., fastv, vanilla, ...) so machine load affects them alike."""
    runners, rows = [], []
    for variant in found:
        if variant.skip_reason is not None:
            row = _empty_row(arch, variant, batch, cfg)
            row.update(status="skipped", reason=variant.skip_reason)
            rows.append(row)
            continue
        runner = _Runner(model, arch, variant, batch, cfg)
        rows.append(runner.row)
        if _guard(runner, runner.warm_up):
            runners.append(runner)
    for what, reps in (("prefill", cfg.prefill_reps), ("generate", cfg.generate_reps)):
        live = [r for r in runners if r.row["status"] is None]
        for r, t in zip(live, _time_phase(live, what, reps, cfg), strict=True):
            if t is not None:
                _record(r, what, t, batch, cfg)
    for r in runners:
        if r.row["status"] is None:
            r.row["status"] = "ok"
    return rows


def _time_phase(
    live: list[_Runner], what: str, reps: int, cfg: E2EConfig
) -> list[timing.Timing | None]:
    """Interleaved timing of ``what`` ("prefill" or "generate") for every runner. If a call
    fails, the runners are timed one at a time, so the failing one is marked (None) and the
    others still get figures."""
    method = timing.method_name(cfg.device)

    def call_of(r: _Runner) -> Callable[[], float]:
        return lambda: r.timed(getattr(r, what), track_peak=what == "generate")

    calls = {i: call_of(r) for i, r in enumerate(live)}
    try:
        timed = timing.interleave(calls, reps, cfg.budget_s * max(1, len(calls)), method)
        return [timed[i] for i in range(len(live))]
    except Exception:  # find the culprit below; its row gets the error
        pass
    found: list[timing.Timing | None] = []
    for i, r in enumerate(live):
        alone: list[timing.Timing] = []
        ok = _guard(
            r,
            lambda i=i, alone=alone: alone.append(
                timing.interleave({i: calls[i]}, reps, cfg.budget_s, method)[i]
            ),
        )
        found.append(alone[0] if ok else None)
    return found


def _record(r: _Runner, what: str, t: timing.Timing, batch: int, cfg: E2EConfig) -> None:
    if what == "prefill":
        r.row.update(
            prefill_ms=t.median_ms,
            prefill_p20_ms=t.p20_ms,
            prefill_p80_ms=t.p80_ms,
            prefill_reps=t.reps,
        )
        return
    r.row["generate_ms"] = t.median_ms
    r.row["tokens_per_s"] = batch * cfg.new_tokens / (t.median_ms * 1e-3)
    if cfg.device.type == "cuda":
        r.row["peak_mem_mb"] = r.peak / 2**20


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_arch(
    arch: models.Arch,
    cfg: E2EConfig,
    log: Callable[[str], None] = print,
    on_rows: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Build one architecture and measure every variant at every batch size. ``on_rows`` gets
    each batch size's rows as soon as they are measured (the GPU plan logs them as it goes)."""
    log(f"[e2e] building {arch.name} ({arch.size}: {arch.note})")
    model = arch.build(cfg.device, cfg.dtype, "sdpa")
    found = variants(arch, model, cfg)
    rows = []
    for batch in cfg.batches.get(arch.name, (1,)):
        batch_rows = measure_batch(model, arch, found, batch, cfg)
        for row in batch_rows:
            log(_progress_line(row))
        if on_rows is not None:
            on_rows(batch_rows)
        rows += batch_rows
        _free(cfg.device)
    del model
    _free(cfg.device)
    return rows


def _progress_line(row: dict) -> str:
    head = f"[e2e] {row['arch']:<11} {row['variant']:<7} {row['budget']:<18} B={row['batch']:<2}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row['reason']}"
    share = f" op {100 * row['op_share']:.1f}%" if row["op_share"] is not None else ""
    return (
        f"{head} prefill {row['prefill_ms']:8.1f} ms  generate {row['generate_ms']:8.1f} ms "
        f"({row['tokens_per_s']:.1f} tok/s){share}"
    )


def run_e2e(
    arch_names: list[str], cfg: E2EConfig, log: Callable[[str], None] = print
) -> list[dict]:
    """Every architecture in ``arch_names``; returns the rows."""
    rows = []
    for name in arch_names:
        if name not in cfg.batches:
            continue
        rows += run_arch(models.get(name, cfg.full), cfg, log)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the study and write JSON + markdown under bench/results/<device>/."""
    from .report import write_report
    from .results_io import RESULTS_ROOT, device_slug, environment

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    runtime.add_common_arguments(parser)
    parser.add_argument(
        "--archs", nargs="+", default=list(models.ARCHS), choices=list(models.ARCHS)
    )
    args = parser.parse_args(argv)
    device = runtime.setup(args)
    rows = run_e2e(args.archs, config_for(device, args.quick))
    out = args.out or RESULTS_ROOT / device_slug(device)
    payload = {"environment": environment(device), "microbench": [], "e2e": rows}
    print(write_report(payload, out, stem="e2e"))
    return rows


if __name__ == "__main__":
    main()
