"""The figures of ``benchmarks.stall`` (matplotlib, written as PNGs next to the report)."""

from __future__ import annotations

import math
import os
from typing import Any

from benchmarks.common import MiB
from benchmarks.stall_savers import SAVER_LABELS, SAVERS


def make_plots(sizes: list[dict[str, Any]], raw: list[dict[str, Any]], out: str) -> list[str]:
    """Stall against state size, and one step-time timeline per size (round 0); returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    intervals = sorted({int(k) for s in sizes for k in s["intervals"]}, reverse=True)
    if intervals:
        fig, axes = plt.subplots(1, len(intervals), figsize=(6.5 * len(intervals), 4.5), squeeze=False)
        for ax, every in zip(axes[0], intervals, strict=True):
            for name in SAVERS:
                if name == "none":
                    continue
                xs, p50, p95 = [], [], []
                for s in sizes:
                    a = s["intervals"].get(str(every), {}).get(name)
                    if a and not math.isnan(a["stall_p50_s"]):
                        xs.append(s["state_bytes"] / MiB)
                        p50.append(max(a["stall_p50_s"] * 1e3, 1e-2))
                        p95.append(max(a["stall_p95_s"] * 1e3, 1e-2))
                if xs:
                    color = f"C{SAVERS.index(name)}"
                    ax.plot(xs, p50, marker="o", color=color, label=SAVER_LABELS[name])
                    ax.plot(xs, p95, marker="v", linestyle=":", color=color, alpha=0.7)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("state size (MiB, parameters + Adam state)")
            ax.set_ylabel("stall per checkpoint (ms): p50 solid, p95 dotted")
            ax.set_title(f"checkpoint every {every} steps")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, "stall_vs_size.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    for res in raw:
        runs = [c for c in res["cases"] if c.get("saver") != "probe" and "error" not in c and c.get("round") == 0]
        if not runs:
            continue
        columns = sorted({c["every"] for c in runs}, reverse=True)
        names = [n for n in SAVERS if any(c["saver"] == n for c in runs)]
        fig, axes = plt.subplots(
            len(names), len(columns), figsize=(7 * len(columns), 1.7 * len(names) + 1), squeeze=False, sharey="col"
        )
        for j, every in enumerate(columns):
            for i, name in enumerate(names):
                ax = axes[i][j]
                case = next((c for c in runs if c["saver"] == name and c["every"] == every), None)
                if case is None:
                    ax.set_visible(False)
                    continue
                ys = [t * 1e3 for t in case["steps_s"]]
                ax.plot(range(1, len(ys) + 1), ys, lw=0.9, color=f"C{SAVERS.index(name)}")
                if name != "none":
                    for it in case["ckpt_iters"]:
                        ax.axvline(it, color="red", alpha=0.35, lw=0.8)
                ax.set_yscale("log")
                ax.set_ylabel(name, fontsize=8)
                ax.grid(True, alpha=0.3)
                if i == 0:
                    ax.set_title(f"step time (ms) per iteration, checkpoint every {every} (red)", fontsize=9)
                if i == len(names) - 1:
                    ax.set_xlabel("iteration")
        fig.suptitle(f"{res['size_mib']:g} MiB state, round 0", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out, f"timeline_{res['size_mib']:g}MiB.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
