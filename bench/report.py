"""Results JSON -> markdown tables with speedup columns, and PNG plots.

Every speedup is a ratio against a baseline measured in the same run: microbenchmarks against
``eager_released`` on the same shape, end-to-end rows against the vanilla (SDPA) model on the
same architecture and batch size.

    python -m bench.report bench/results/cpu/results.json     # rewrite .md and plots next to it
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from .results_io import read_json, write_json
from .shapes import HEADLINE

BASELINE_PROVIDER = "eager_released"
STAGES = ("fps", "residual", "select", "merge")


def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], lines: Iterable[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "ok"]


def headline(rows: list[dict]) -> list[dict]:
    """torch backend vs eager_released on the shapes the project lead asked about (same run):
    ``{"shape", "torch_ms", "eager_ms", "ratio"}`` with ratio = eager / torch (how many times
    faster the torch backend is); shapes missing either provider are left out."""
    found = []
    for shape in HEADLINE:
        by_provider = {r["provider"]: r for r in _ok(rows) if r["shape"] == shape}
        torch_row, eager_row = by_provider.get("torch"), by_provider.get(BASELINE_PROVIDER)
        if torch_row is None or eager_row is None:
            continue
        found.append(
            dict(
                shape=shape,
                size=f"{torch_row['S']}x{torch_row['N']}x{torch_row['D']} keep {torch_row['K']}",
                torch_ms=torch_row["median_ms"],
                eager_ms=eager_row["median_ms"],
                ratio=eager_row["median_ms"] / torch_row["median_ms"],
                reps=(torch_row["reps"], eager_row["reps"]),
            )
        )
    return found


def _micro_table(rows: list[dict]) -> str:
    baseline = {r["shape"]: r["median_ms"] for r in _ok(rows) if r["provider"] == BASELINE_PROVIDER}
    lines = []
    for r in _ok(rows):
        base = baseline.get(r["shape"])
        stages = r["stages_ms"]
        stage_text = "/".join(_num(stages.get(s)) for s in STAGES) if stages else "—"
        lines.append(
            [
                r["shape"],
                f"{r['S']}×{r['N']}×{r['D']} → {r['K']}",
                r["dtype"],
                r["provider"],
                f"{r['median_ms']:.2f} [{r['p20_ms']:.2f}, {r['p80_ms']:.2f}] ×{r['reps']}",
                _num(base / r["median_ms"]) if base else "—",
                _num(r["achieved_gbs"]),
                _num(100 * r["floor_fraction"], 1) if r["floor_fraction"] else "—",
                _num(r["graph_median_ms"], 3),
                _num(r["peak_mem_mb"], 1),
                stage_text,
                "reference"
                if r["provider"] == "torch"
                else {True: "yes", False: "NO", None: "—"}[r["kept_matches_torch"]],
            ]
        )
    header = [
        "shape",
        "S×N×D → K",
        "dtype",
        "provider",
        "median ms [p20, p80] ×reps",
        f"speedup vs {BASELINE_PROVIDER}",
        "GB/s",
        "% of copy BW",
        "graph ms",
        "peak MiB",
        "fps/residual/select/merge ms",
        "kept = torch",
    ]
    return _table(header, lines)


def _e2e_table(rows: list[dict]) -> str:
    vanilla = {
        (r["arch"], r["batch"]): r
        for r in _ok(rows)
        if r["variant"] == "vanilla" and r["attn"] == "sdpa"
    }
    lines = []
    for r in _ok(rows):
        base = vanilla.get((r["arch"], r["batch"]))
        lines.append(
            [
                r["arch"],
                r["size"],
                r["variant"],
                r["budget"],
                r["attn"],
                str(r["batch"]),
                f"{r['visual_tokens_llm']} → {r['visual_tokens_last_layer']}",
                f"{r['prefill_ms']:.1f} [{r['prefill_p20_ms']:.1f}, {r['prefill_p80_ms']:.1f}]",
                _num(base["prefill_ms"] / r["prefill_ms"]) if base else "—",
                _num(r["generate_ms"], 1),
                _num(r["tokens_per_s"], 1),
                _num(r["tokens_per_s"] / base["tokens_per_s"]) if base else "—",
                _num(r["peak_mem_mb"], 0),
                f"{100 * r['op_share']:.1f}%" if r["op_share"] is not None else "—",
            ]
        )
    header = [
        "arch",
        "size",
        "variant",
        "budget",
        "attention",
        "batch",
        "visual tokens (LLM → last layer)",
        "prefill ms [p20, p80]",
        "prefill speedup",
        f"generate ms ({rows[0]['new_tokens']} tok)",
        "tok/s",
        "tok/s ratio",
        "peak MiB",
        "op share of prefill",
    ]
    return _table(header, lines)


def _skips(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r.get("attn_note"):
            lines.append(
                f"- {r['arch']} / {r['variant']} {r['budget']} / B={r['batch']}: "
                f"note: {r['attn_note']}"
            )
        if r["status"] == "ok":
            continue
        where = (
            f"{r['shape']} / {r['provider']}"
            if r["kind"] == "micro"
            else f"{r['arch']} / {r['variant']} {r['budget']} / {r['attn']} / B={r['batch']}"
        )
        lines.append(f"- {where}: **{r['status']}**: {r['reason']}")
    return "\n".join(lines) if lines else "none"


def markdown(payload: dict, plots: dict[str, str]) -> str:
    """The report: environment, headline ratios, tables, plots, skips."""
    env = payload["environment"]
    micro, e2e = payload.get("microbench", []), payload.get("e2e", [])
    parts = [
        f"# ApET benchmarks on {env['device_name']} ({env['device']})",
        "",
        f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
        f"flash_attn {env['flash_attn']}, apet_kernels {env['apet_kernels']} "
        f"(commit {env['git_commit']}), {env['cpu_threads']} CPU thread(s), load average "
        f"{env.get('load_average')}; `{env['command']}` at {env['timestamp_utc']}.",
    ]
    if env["device"] == "cpu":
        parts += [
            "",
            "**CPU figures** (wall clock, medians of several runs in one process, contenders "
            "interleaved). They rank implementations on this machine; GPU speed is measured "
            "only on a GPU. End-to-end models are scaled-down versions of the 7B architectures.",
        ]
    heads = payload.get("headline") or headline(micro)
    if heads:
        parts += ["", "## torch backend vs eager_released (same run)", ""]
        parts.append(
            _table(
                ["shape", "size", "torch ms", "eager_released ms", "eager / torch", "reps"],
                (
                    [
                        h["shape"],
                        h["size"],
                        _num(h["torch_ms"]),
                        _num(h["eager_ms"]),
                        f"**{h['ratio']:.1f}×**",
                        f"{h['reps'][0]} / {h['reps'][1]}",
                    ]
                    for h in heads
                ),
            )
        )
    if _ok(micro):
        parts += ["", "## Microbenchmarks", "", _micro_table(micro)]
    if _ok(e2e):
        parts += ["", "## End-to-end prefill", "", _e2e_table(e2e)]
    if plots:
        parts += ["", "## Plots", ""] + [f"![{name}]({file})" for name, file in plots.items()]
    parts += ["", "## Skipped and failed", "", _skips(micro + e2e), ""]
    return "\n".join(parts)


def plot_latency_vs_budget(rows: list[dict], path: Path) -> bool:
    """Prefill latency against the visual tokens reaching the LLM's last layer, one panel per
    architecture: ApET budgets as a line, vanilla and FastV as markers. False if no data."""
    rows = _ok(rows)
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    if not archs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(archs), figsize=(4.5 * len(archs), 3.6), squeeze=False)
    colours = {"apet": "C0", "vanilla": "C1", "fastv": "C2"}
    for ax, arch in zip(axes[0], archs, strict=True):
        batches = sorted({r["batch"] for r in rows if r["arch"] == arch})
        for batch in batches:
            sel = [r for r in rows if r["arch"] == arch and r["batch"] == batch]
            # Filled markers: batch 1; hollow: the larger batch. Colour: the variant.
            face = None if batch == batches[0] else "none"
            apet = sorted(
                (r for r in sel if r["variant"] == "apet"),
                key=lambda r: r["visual_tokens_last_layer"],
            )
            if apet:
                ax.plot(
                    [r["visual_tokens_last_layer"] for r in apet],
                    [r["prefill_ms"] for r in apet],
                    "o-",
                    color=colours["apet"],
                    mfc=face,
                    label=f"ApET B={batch}",
                )
            for r in sel:
                if r["variant"] == "apet":
                    continue
                marker = "s" if r["variant"] == "vanilla" else "^"
                colour = (
                    colours.get(r["variant"], "C3") if r["attn"] != "flash_attention_2" else "C4"
                )
                ax.plot(
                    [r["visual_tokens_last_layer"]],
                    [r["prefill_ms"]],
                    marker,
                    color=colour,
                    mfc=face,
                    label=f"{r['variant']} ({r['attn']}) B={batch}",
                )
        ax.set_title(f"{arch} ({sel[0]['size']})")
        ax.set_xlabel("visual tokens at the last layer")
        ax.set_ylabel("prefill ms")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_op_vs_tokens(rows: list[dict], path: Path) -> bool:
    """Op time against total input tokens S·N per provider, log-log, with the memory floor
    (bytes the op must move / measured copy bandwidth). False if no data."""
    rows = _ok(rows)
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for provider in dict.fromkeys(r["provider"] for r in rows):
        sel = sorted((r for r in rows if r["provider"] == provider), key=lambda r: r["S"] * r["N"])
        # Markers, not lines: neighbouring shapes differ in D and K as well as in S·N.
        ax.plot([r["S"] * r["N"] for r in sel], [r["median_ms"] for r in sel], "o", label=provider)
    floor = {r["shape"]: r for r in rows if r["floor_ms"]}
    if floor:
        sel = sorted(floor.values(), key=lambda r: r["S"] * r["N"])
        ax.plot(
            [r["S"] * r["N"] for r in sel],
            [r["floor_ms"] for r in sel],
            "kx",
            label="memory floor (bytes / copy BW)",
        )
    for r in floor.values():
        ax.annotate(r["shape"], (r["S"] * r["N"], r["floor_ms"]), fontsize=6, alpha=0.7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens per call (S·N)")
    ax.set_ylabel("ms per call")
    ax.set_title(f"ApET op on {rows[0]['device_name']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(payload: dict, out_dir: str | Path, stem: str = "results") -> str:
    """Write ``<stem>.json``, ``<stem>.md`` and the plots into ``out_dir``; return the markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload.setdefault("headline", headline(payload.get("microbench", [])))
    write_json(out / f"{stem}.json", payload)
    plots = {}
    budget_png = f"{stem}_latency_vs_budget.png"
    if plot_latency_vs_budget(payload.get("e2e", []), out / budget_png):
        plots["prefill latency vs visual-token budget"] = budget_png
    op_png = f"{stem}_op_vs_tokens.png"
    if plot_op_vs_tokens(payload.get("microbench", []), out / op_png):
        plots["op time vs tokens against the memory floor"] = op_png
    text = markdown(payload, plots)
    (out / f"{stem}.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Turn a results JSON into markdown and plots.")
    parser.add_argument("json", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="folder (default: the JSON's)")
    args = parser.parse_args(argv)
    payload = read_json(args.json)
    print(write_report(payload, args.out or args.json.parent, stem=args.json.stem))


if __name__ == "__main__":
    main()
