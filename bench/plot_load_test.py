"""Plot client-measured end-to-end latency per budget class from bench/load_test.py --json-out files.

    python bench/plot_load_test.py --after load_test.json [--out docs/load_test_e2e.png]
    python bench/plot_load_test.py --before old.json --after new.json \
        [--before-label "before" --after-label "after"] [--phase mix] [--out docs/load_test_e2e.png]

One panel per file (before on the left, after on the right, a shared log-scale latency axis). In each
panel, per budget class: a box of the e2e latencies of the mix with budgets, its requests as points
(green: met the budget, red: missed, grey: no budget), and the class's budget as a red bar; beside it
in grey, the same jobs from the mix sent without budgets (``--no-baseline`` hides them). ``--phase
engine_mix`` plots the engine-only run of the mix instead (latency measured in the engine), and
``--phase mix_no_budgets`` the HTTP mix sent without budgets.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

HIT, MISS, NONE, BASELINE, BUDGET = "#2e7d32", "#c62828", "#616161", "#b0b0b0", "#d32f2f"


def load(path: Path) -> dict:
    data = json.loads(path.read_text())
    if "mix" not in data or "budgets" not in data:
        raise SystemExit(f"{path}: not a bench/load_test.py --json-out file")
    return data


def class_order(runs: list[dict]) -> list[str]:
    """Classes in the order of the first file's budgets, then any the others add."""
    order: list[str] = []
    for data in runs:
        for name in data["budgets"]:
            if name not in order:
                order.append(name)
    return order


def e2e_of(records: list[dict] | None, name: str) -> list[dict]:
    return [r for r in records or [] if r["class"] == name and r["ok"] and r["e2e_ms"] is not None]


def draw(ax, data: dict, label: str, classes: list[str], phase: str, baseline: bool, top: float,
         seed: int = 0) -> None:
    """One panel; a budget above ``top`` (far above every latency) is an arrow at ``top``, labelled."""
    rng = random.Random(seed)
    records = data.get(phase)
    if records is None:
        raise SystemExit(f"{label}: the file has no {phase!r} records")
    free = data.get("mix_no_budgets") if baseline and phase == "mix" else None  # the HTTP run beside the HTTP run
    offset = 0.2 if free else 0.0
    ticks = []
    for x, name in enumerate(classes):
        rows = e2e_of(records, name)
        budget = data["budgets"].get(name)
        values = [r["e2e_ms"] for r in rows]
        if values:
            ax.boxplot([values], positions=[x - offset], widths=0.32, showfliers=False, manage_ticks=False,
                       medianprops={"color": "black"}, boxprops={"color": "#37474f"},
                       whiskerprops={"color": "#37474f"}, capprops={"color": "#37474f"})
            for r in rows:
                color = NONE if r["hit"] is None else HIT if r["hit"] else MISS
                ax.scatter(x - offset + rng.uniform(-0.11, 0.11), r["e2e_ms"], s=14, color=color, alpha=0.75,
                           zorder=3, linewidths=0)
        if free:
            base = [r["e2e_ms"] for r in e2e_of(free, name)]
            if base:
                ax.boxplot([base], positions=[x + offset], widths=0.22, showfliers=False, manage_ticks=False,
                           medianprops={"color": "#424242"}, boxprops={"color": BASELINE},
                           whiskerprops={"color": BASELINE}, capprops={"color": BASELINE})
                ax.scatter([x + offset + rng.uniform(-0.07, 0.07) for _ in base], base, s=9, color=BASELINE,
                           alpha=0.8, zorder=3, linewidths=0)
        if budget is not None and budget > top:
            ax.scatter([x], [top], marker="^", s=40, color=BUDGET, zorder=4)
            ax.annotate(f"budget {budget:,.0f} ms (off scale)", (x, top), xytext=(0, -4), textcoords="offset points",
                        ha="center", va="top", fontsize=7, color=BUDGET)
        elif budget is not None:
            ax.hlines(budget, x - 0.45, x + 0.45, colors=BUDGET, linestyles="--", linewidth=1.6, zorder=4)
            ax.annotate(f"{budget:,.0f} ms", (x - 0.45, budget), xytext=(1, 2), textcoords="offset points",
                        ha="left", va="bottom", fontsize=7, color=BUDGET)
        hits = [r["hit"] for r in rows if r["hit"] is not None]
        sub = "no budget" if budget is None else (f"hit {sum(hits)}/{len(hits)}" if hits else "no requests")
        ticks.append(f"{name}\n{sub}")
    ax.set_xticks(range(len(classes)))
    ax.set_xticklabels(ticks, fontsize=8)
    ax.set_xlim(-0.6, len(classes) - 0.4)
    iso = data.get("isolated")
    details = [f"{len(records)} requests, Poisson {data.get('rate', 0):g}/s, <= {data.get('concurrency')} in flight, "
               f"{data.get('max_tokens')} tokens each"]
    if iso:
        details.append(f"isolated exit {iso['exit']}: {iso['median_ms']:.0f} ms (median of {len(iso['e2e_ms'])})")
    ax.set_title(f"{label}\n" + "\n".join(details), fontsize=9)
    ax.grid(axis="y", which="both", alpha=0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, default=None, help="a load_test.py --json-out file (left panel)")
    parser.add_argument("--after", type=Path, default=None, help="a load_test.py --json-out file (right panel)")
    parser.add_argument("json", type=Path, nargs="?", default=None, help="a single file (same as --after)")
    parser.add_argument("--before-label", default="before")
    parser.add_argument("--after-label", default=None, help="default: 'after' beside a --before, else the file name")
    parser.add_argument("--phase", default="mix", choices=["mix", "mix_no_budgets", "engine_mix"],
                        help="which run of the mix to plot (default %(default)s: HTTP, with budgets)")
    parser.add_argument("--no-baseline", action="store_true", help="leave out the mix sent without budgets")
    parser.add_argument("--out", type=Path, default=Path("docs/load_test_e2e.png"))
    args = parser.parse_args()

    after = args.after or args.json
    if after is None and args.before is None:
        parser.error("give --after (and optionally --before), or one file")
    panels = []
    if args.before is not None:
        panels.append((load(args.before), args.before_label))
    if after is not None:
        panels.append((load(after), args.after_label or ("after" if args.before else after.name)))
    classes = class_order([data for data, _ in panels])
    latencies = [r["e2e_ms"] for data, _ in panels for key in ("mix", "mix_no_budgets", "engine_mix")
                 for r in data.get(key) or [] if r["ok"] and r["e2e_ms"]]
    top = 3 * max(latencies, default=1000.0)  # budgets beyond this are drawn at it, off scale

    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 + 1.55 * len(classes) * len(panels), 5.2), sharey=True,
                             squeeze=False)
    for ax, (data, label) in zip(axes[0], panels):
        draw(ax, data, label, classes, args.phase, baseline=not args.no_baseline, top=top)
    ax0 = axes[0][0]
    ax0.set_yscale("log")
    ax0.set_ylim(top=top * 1.15)
    plain = FuncFormatter(lambda value, _: f"{value:,.0f}")
    ax0.yaxis.set_major_formatter(plain)
    ax0.yaxis.set_minor_formatter(plain)
    ax0.tick_params(axis="y", which="both", labelsize=7)
    ax0.set_ylabel(("in-engine" if args.phase == "engine_mix" else "client-measured") + " e2e latency (ms, log scale)")
    handles = [Line2D([], [], color=BUDGET, linestyle="--", label="class budget"),
               Line2D([], [], marker="o", linestyle="", color=HIT, label="met budget"),
               Line2D([], [], marker="o", linestyle="", color=MISS, label="missed budget"),
               Line2D([], [], marker="o", linestyle="", color=NONE, label="no budget")]
    if not args.no_baseline and args.phase == "mix" and any(d.get("mix_no_budgets") for d, _ in panels):
        handles.append(Patch(facecolor="white", edgecolor=BASELINE, label="same jobs, no budgets sent"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    phase = {"mix": "HTTP mix", "mix_no_budgets": "HTTP mix without budgets", "engine_mix": "engine-only mix"}
    fig.suptitle(f"End-to-end latency per budget class ({phase[args.phase]})", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
