"""Plot how a run's routers balanced their experts: `python -m launcher.plot_router RUN [-o PNG]`.

Reads RUN/metrics.jsonl (the training records' `experts` entries, one per log interval) and writes one PNG
(default RUN/router.png) with, per MoE layer against iteration: the dropped fraction, the load of the busiest
expert over the mean (max/mean tokens per expert of a micro batch), the router entropy (nats; log E is a
uniform router), and each expert's share of the tokens.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path

from launcher.errors import UsageError
from launcher.files import write_bytes_atomic


def read_expert_records(metrics: Path) -> list[tuple[int, dict]]:
    """(iteration, {layer: stats}) of every training record with expert statistics, in iteration order."""
    if not metrics.is_file():
        raise UsageError(f"{metrics}: not found; pass a run folder (it holds metrics.jsonl)")
    out = {}
    for number, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{metrics}:{number}: not a JSON line") from None
        if record.get("kind") == "train" and record.get("experts"):
            out[int(record["iteration"])] = {int(k): v for k, v in record["experts"].items()}
    if not out:
        raise UsageError(f"{metrics}: no training record with expert statistics (a dense run, or no log interval "
                         "reached yet)")
    return sorted(out.items())


def plot_router(records: list[tuple[int, dict]], output: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    iterations = [it for it, _ in records]
    layers = sorted({layer for _, stats in records for layer in stats})
    columns = math.ceil((3 + len(layers)) / 2)  # three summary panels, then one load panel per layer
    fig, axes = plt.subplots(2, columns, figsize=(4.5 * columns, 7.5), squeeze=False)
    panels = list(axes.flat)
    ax_drop, ax_imb, ax_ent = panels[:3]
    share_axes = panels[3:3 + len(layers)]
    for layer in layers:
        series = lambda key: [s[layer].get(key, math.nan) if layer in s else math.nan for _, s in records]  # noqa: E731
        ax_drop.plot(iterations, [100 * v for v in series("dropped")], label=f"layer {layer}")
        ax_imb.plot(iterations, series("imbalance"), label=f"layer {layer}")
        ax_ent.plot(iterations, series("entropy"), label=f"layer {layer}")
    experts = max(len(s[layer]["load"]) for _, s in records for layer in s)
    if not any(math.isfinite(s[layer].get("entropy", math.nan)) for _, s in records for layer in s):
        ax_ent.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=ax_ent.transAxes)
    ax_ent.axhline(math.log(experts), color="gray", linestyle=":", label=f"uniform (log {experts})")
    ax_drop.set(title="tokens dropped (%)", xlabel="iteration", ylim=(0, None))
    ax_imb.set(title="busiest expert / mean load", xlabel="iteration", yscale="log")
    ax_imb.yaxis.set_major_formatter(ScalarFormatter())
    ax_imb.yaxis.set_minor_formatter(ScalarFormatter())
    ax_imb.axhline(1.0, color="gray", linestyle=":")
    ax_ent.set(title="router entropy (nats)", xlabel="iteration", ylim=(0, None))
    for ax in (ax_drop, ax_imb, ax_ent):
        ax.set_xlim(iterations[0], iterations[-1])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax, layer in zip(share_axes, layers):
        loads = [s[layer]["load"] if layer in s else [math.nan] * experts for _, s in records]
        per_expert = list(zip(*loads))
        ax.stackplot(iterations, *per_expert, labels=[f"expert {e}" for e in range(len(per_expert))])
        ax.set(title=f"layer {layer}: share of tokens per expert", xlabel="iteration", ylim=(0, 1),
               xlim=(iterations[0], iterations[-1]))
        if len(per_expert) <= 16:
            ax.legend(fontsize=6, loc="upper right", ncol=2)
    for ax in axes.flat:
        if not ax.has_data():
            ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(png.getvalue(), output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.plot_router", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run folder (holding metrics.jsonl) or a metrics.jsonl file")
    parser.add_argument("-o", "--output", type=Path, help="PNG to write (default RUN/router.png)")
    args = parser.parse_args(argv)
    metrics = args.run if args.run.is_file() else args.run / "metrics.jsonl"
    try:
        records = read_expert_records(metrics)
        output = args.output or metrics.with_name("router.png")
        plot_router(records, output, title=metrics.parent.name)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
