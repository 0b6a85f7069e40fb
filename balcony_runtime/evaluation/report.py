"""The evaluation table (text and Markdown), its JSON, and the quality-against-cost plot."""

from __future__ import annotations

import json
from pathlib import Path

LABELS = {"balcony": "balcony", "naive_k": "naive exit @k", "naive_k+1": "naive exit @k+1",
          "layer_drop": "layer drop"}


def table_rows(result: dict) -> list[list[str]]:
    full = result["full"]
    rows = [["full", "full", str(full["layers"]), "1.00", f"{full['perplexity']:.3f}", "1.00", "0", "1.000"]]
    for k, methods in result["exits"].items():
        for m, r in methods.items():
            rows.append([k, LABELS.get(m, m), str(r["layers"]), f"{r['relative_cost']:.2f}",
                         f"{r['perplexity']:.3f}" if r["perplexity"] < 1e6 else f"{r['perplexity']:.3g}",
                         f"{r['perplexity_ratio']:.2f}" if r["perplexity_ratio"] < 1e4 else f"{r['perplexity_ratio']:.3g}",
                         f"{r['kl_per_token']:.3f}", f"{r['top1_agreement']:.3f}"])
    return rows


HEADER = ["exit", "method", "layers", "cost", "ppl", "ppl / full", "KL(full‖exit)", "top-1 agree"]


def format_table(result: dict) -> str:
    rows = [HEADER] + table_rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def markdown_table(result: dict) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


def write_plot(result: dict, path: Path, title: str = "") -> None:
    """Perplexity ratio to the full model (log scale) and top-1 agreement against relative decode cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_top1) = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = {"balcony": "o", "naive_k": "v", "naive_k+1": "^", "layer_drop": "s"}
    methods = next(iter(result["exits"].values())).keys()
    for m in methods:
        pts = sorted((r[m]["relative_cost"], r[m]["perplexity_ratio"], r[m]["top1_agreement"])
                     for r in result["exits"].values())
        xs = [p[0] for p in pts]
        ax_ppl.plot(xs, [p[1] for p in pts], marker=markers.get(m, "x"), label=LABELS.get(m, m))
        ax_top1.plot(xs, [p[2] for p in pts], marker=markers.get(m, "x"), label=LABELS.get(m, m))
    ax_ppl.plot([1.0], [1.0], "k*", markersize=12, label="full model")
    ax_top1.plot([1.0], [1.0], "k*", markersize=12, label="full model")
    ax_ppl.set_yscale("log")
    ax_ppl.set_ylabel("held-out perplexity / full model's")
    ax_top1.set_ylabel("top-1 agreement with the full model")
    for ax in (ax_ppl, ax_top1):
        ax.set_xlabel("relative decode cost (decoder layers run / L)")
        ax.grid(True, alpha=0.3)
    ax_top1.legend(loc="lower right", fontsize=8)
    fig.suptitle(title or f"{result['tokens']:,} held-out tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
