"""The `winq bench` report on disk: the JSON (atomically) and a bar chart of prefill and decode tokens/s."""

from __future__ import annotations

import json
from pathlib import Path

from winq.fsutil import atomic_file


def write_report(report: dict, out_json, plot_fn=None) -> tuple[Path, Path]:
    """Write the JSON and its chart beside it (.png; `plot_fn(report, png)`, default the bar chart below), each
    atomically; returns both paths."""
    out_json = Path(out_json)
    with atomic_file(out_json) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    png = out_json.with_suffix(".png")
    with atomic_file(png) as tmp:
        (plot_fn or plot)(report, tmp)
    return out_json, png


def plot(report: dict, png) -> Path:
    """Two bar panels, prefill and decode tokens/s, one bar per backend and baseline (baselines hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    names = list(res)
    colors = ["#bbbbbb" if res[n].get("baseline_of") else "#3b75af" for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.6 * len(names) + 3), 3.8))
    for ax, key, title in zip(axes, ("prefill_tok_s", "decode_tok_s"), ("prefill", "decode")):
        vals = [res[n][key] for n in names]
        bars = ax.bar(names, vals, color=colors)
        for bar, v in zip(bars, vals):
            ax.annotate(f"{v:.0f}" if v >= 100 else f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, v),
                        ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{title} tokens/s")
        ax.tick_params(axis="x", labelrotation=30)
        ax.set_ylim(0, max(vals) * 1.15)
    s, m = report["settings"], report["machine"]
    fig.suptitle(f"winq bench: prompt {report['prompt']['tokens']}, decode {s['gen_tokens']} tokens, "
                 f"threads {s['threads'] or 'default'} ({m['cpu_count']} CPUs), grey = baseline", fontsize=9)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=110, format="png")
    plt.close(fig)
    return png
