"""Plots the cost-SLO frontiers that soma-autoscale-sim --frontier-csv writes.

One panel per real trace and replica cap: every swept setting of HPA, KEDA and Soma as a
point (replica-hours, violation minutes), each scaler's frontier as a line, and each
scaler's default setting as a large marker.

Usage: python plot_frontier.py FRONTIER.csv OUT.png
"""

import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    "hpa": ("tab:blue", "s", "HPA (target 0.3-1.0)"),
    "keda": ("tab:orange", "^", "KEDA (target 0.3-1.0)"),
    "soma": ("tab:green", "o", "Soma (rhoMax 0.5-0.9 x waitTargetS 1-4 s)"),
}


def frontier(points):
    """The lower-left staircase: sorted by cost, each corner with fewer violations."""
    corners = []
    for x, v in sorted(points):
        if not corners or v < corners[-1][1]:
            corners.append((x, v))
    return corners


def main(src, out):
    rows = defaultdict(list)
    with open(src, newline="") as f:
        for r in csv.DictReader(f):
            if "+" in r["trace"] or r["trace"].startswith("synthetic"):
                continue  # robustness checks: in the text output, not the plot
            rows[(r["trace"], r["cap"])].append(r)
    panels = sorted(rows, key=lambda k: (k[1] == "uncapped", k[0]))
    traces = sorted({t for t, _ in panels})
    caps = sorted({c for _, c in panels}, key=lambda c: c == "uncapped")
    fig, axes = plt.subplots(
        len(caps), len(traces), figsize=(6.2 * len(traces), 4.6 * len(caps)), squeeze=False
    )
    for i, cap in enumerate(caps):
        for j, trace in enumerate(traces):
            ax = axes[i][j]
            pts = rows.get((trace, cap), [])
            for scaler, (color, marker, label) in STYLE.items():
                mine = [p for p in pts if p["scaler"] == scaler]
                xy = [(float(p["replica_hours"]), int(p["violation_minutes"])) for p in mine]
                if not xy:
                    continue
                ax.scatter(*zip(*xy), color=color, marker=marker, s=22, alpha=0.55, label=label)
                fx = frontier(xy)
                # Flat to the right of the dearest corner, as the benchmark reads it.
                xs = [x for x, _ in fx] + [max(x for x, _ in xy)]
                vs = [v for _, v in fx] + [fx[-1][1]]
                ax.plot(xs, vs, color=color, lw=1.4)
                for p in mine:
                    if p["default"] == "true":
                        ax.scatter(
                            float(p["replica_hours"]),
                            int(p["violation_minutes"]),
                            color=color,
                            marker=marker,
                            s=170,
                            edgecolors="black",
                            linewidths=1.2,
                            zorder=5,
                        )
            title_cap = "no replica cap" if cap == "uncapped" else f"max {cap} replicas"
            ax.set_title(f"{trace}\n{title_cap}", fontsize=10)
            ax.set_xlabel("replica-hours")
            ax.set_ylabel("SLO-violation minutes (P95 wait > 2 s)")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(
        "Cost-SLO frontiers (large markers: default settings). Azure LLM inference trace 2023,"
        " Azure Public Dataset, CC-BY 4.0; Patel et al., Splitwise, ISCA 2024",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
