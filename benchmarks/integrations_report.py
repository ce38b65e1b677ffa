"""The report of ``benchmarks.integrations``: figures pooled over rounds, one table per suite, and the ratios.

Every ratio compares runs of the same invocation, interleaved on the same machine: async_ckpt's variant of a suite
against that suite's synchronous anchor (``torch.save`` + fsync in the loop, Lightning's default plugin) and its
asynchronous one (Lightning's ``AsyncCheckpointIO``).
"""

from __future__ import annotations

import math
from typing import Any

from benchmarks.common import MiB, median, percentile
from benchmarks.common import fmt_ms as _ms
from benchmarks.common import fmt_num as _num
from benchmarks.integrations_savers import LIGHTNING_LABELS, LIGHTNING_VARIANTS, LOOP_LABELS, LOOP_VARIANTS

MIN_PLAIN_STEPS = 5  # fewer plain steps than this in a run: its baseline is the median of all its steps
SUITE_TITLES = {"loop": "Plain PyTorch loop", "lightning": "Lightning Trainer (CPU), ModelCheckpoint"}
ORDER = {"loop": LOOP_VARIANTS, "lightning": LIGHTNING_VARIANTS}
LABELS = {"loop": LOOP_LABELS, "lightning": LIGHTNING_LABELS}
# (suite, ours, anchor): the comparisons the ratios section prints, when both variants ran.
COMPARISONS = (
    ("loop", "checkpointer", "torch-save-fsync"),
    ("loop", "checkpointer", "torch-save"),
    ("loop", "checkpointer-overlap", "torch-save-fsync"),
    ("lightning", "async-ckpt", "lightning-default"),
    ("lightning", "async-ckpt", "lightning-async"),
)


def _plain_steps(run: dict[str, Any]) -> list[float]:
    """Steps of a run that are neither a checkpoint step nor the step right after one."""
    ck = set(run["ckpt_steps"])
    return [s for i, s in enumerate(run["steps_s"], 1) if i not in ck and i - 1 not in ck]


def pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of one (size, suite, variant), pooled over its rounds.

    The stall of a save is the time inside the save call (loop) or the checkpoint callback (Lightning); the first
    save of each run (buffer allocation, first file) is reported apart from the later ones.
    """
    first: list[float] = []
    stalls: list[float] = []
    in_plugin: list[float] = []
    step_extra: list[float] = []
    next_extra: list[float] = []
    durable: list[float] = []
    flushes: list[float] = []
    plains: list[float] = []
    window = 0.0
    nsteps = ok = expected = saves = not_complete = 0
    errors: list[str] = []
    fsyncs = False
    for r in runs:
        if "error" in r:
            errors.append(r["error"])
            continue
        steps = r["steps_s"]
        plain = _plain_steps(r)
        base = median(plain if len(plain) >= MIN_PLAIN_STEPS else steps)
        plains.append(base)
        for n, step in enumerate(r["ckpt_steps"]):
            (first if n == 0 else stalls).append(r["stall_s"][str(step)])
            if n > 0 and str(step) in r["in_plugin_s"]:
                in_plugin.append(r["in_plugin_s"][str(step)])
            if n > 0:
                step_extra.append(steps[step - 1] - base)
            if step < len(steps):
                next_extra.append(steps[step] - base)
            if str(step) in r["durable_s"]:
                durable.append(r["durable_s"][str(step)])
            else:
                not_complete += 1
        saves += len(r["ckpt_steps"])
        window += r["window_s"]
        nsteps += r["n_steps"]
        flushes.append(r["flush_s"])
        ok += r["verified_ok"]
        expected += r["verified_expected"]
        errors.extend(r["verify_errors"])
        fsyncs = r["fsyncs"]
    only_first = not stalls
    return {
        "runs": len(runs),
        "saves": saves,
        "fsyncs": fsyncs,
        "plain_step_p50_s": median(plains),
        "mean_step_s": window / nsteps if nsteps else float("nan"),
        "first_stall_p50_s": percentile(first, 50),
        "stall_includes_first": only_first,
        "stall_p50_s": percentile(stalls or first, 50),
        "stall_p95_s": percentile(stalls or first, 95),
        "in_plugin_p50_s": percentile(in_plugin, 50),
        "ckpt_step_extra_p50_s": percentile(step_extra, 50),
        "next_step_extra_p50_s": percentile(next_extra, 50),
        "durable_p50_s": percentile(durable, 50),
        "durable_p95_s": percentile(durable, 95),
        "durable_missing": not_complete,
        "flush_p50_s": percentile(flushes, 50),
        "verified_ok": ok,
        "verified_expected": expected,
        "errors": errors,
    }


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per size: per suite and variant the pooled figures, with the overhead against the suite's ``none``."""
    sizes = []
    for res in results:
        entry: dict[str, Any] = {
            "size_mib": res["size_mib"],
            "state_bytes": res.get("state_bytes", 0),
            "workload": res.get("workload", "?"),
            "suites": {},
        }
        for suite, order in ORDER.items():
            mine = [r for r in res["runs"] if r["suite"] == suite]
            if not mine:
                continue
            none_runs = [r for r in mine if r["variant"] == "none" and "error" not in r]
            none_means = [r["window_s"] / r["n_steps"] for r in none_runs if r["n_steps"]]
            base = sum(r["window_s"] for r in none_runs) / max(1, sum(r["n_steps"] for r in none_runs))
            table: dict[str, Any] = {}
            for name in order:
                runs = [r for r in mine if r["variant"] == name]
                if not runs:
                    continue
                agg = pool(runs)
                mean = agg["mean_step_s"]
                agg["overhead_pct"] = (mean / base - 1) * 100 if none_runs and base > 0 else float("nan")
                table[name] = agg
            noise = (max(none_means) / min(none_means) - 1) * 100 if len(none_means) > 1 else float("nan")
            entry["suites"][suite] = {"variants": table, "none_spread_pct": noise}
        sizes.append(entry)
    return sizes


def report_tables(sizes: list[dict[str, Any]], every: int) -> str:
    """One Markdown table per size and suite (rows: variants), errors listed under it."""
    lines = []
    for s in sizes:
        state = s["state_bytes"] / MiB
        for suite, t in s["suites"].items():
            lines.append(
                f"### {SUITE_TITLES[suite]}: {state:.1f} MiB of parameters + Adam state ({s['workload']}), "
                f"a checkpoint every {every} steps\n"
            )
            lightning = suite == "lightning"
            header = (
                "| variant | saves | plain step ms | first save ms | stall p50 ms | stall p95 ms "
                + ("| in plugin p50 ms " if lightning else "")
                + "| ckpt step +ms | next step +ms | durable p50 ms | overhead | flush ms | verified |"
            )
            lines.append(header)
            lines.append("|" + "---|" * (header.count("|") - 1))
            for name, a in t["variants"].items():
                dash = name == "none"
                verified = "n/a" if dash else f"{a['verified_ok']}/{a['verified_expected']}"
                if a["errors"]:
                    verified += " FAIL"
                durable = _ms(a["durable_p50_s"]) + ("" if a["fsyncs"] else " (no fsync)")
                if a["durable_missing"]:
                    durable += f" ({a['durable_missing']} never completed)"
                mark = "‡" if a["stall_includes_first"] else ""
                cells = [
                    f"{name}: {LABELS[suite][name]}",
                    str(a["saves"]),
                    _ms(a["plain_step_p50_s"]),
                    "-" if dash else _ms(a["first_stall_p50_s"]),
                    "-" if dash else _ms(a["stall_p50_s"]) + mark,
                    "-" if dash else _ms(a["stall_p95_s"]) + mark,
                    *(["-" if dash else _ms(a["in_plugin_p50_s"])] if lightning else []),
                    "-" if dash else _ms(a["ckpt_step_extra_p50_s"]),
                    "-" if dash else _ms(a["next_step_extra_p50_s"]),
                    "-" if dash else durable,
                    _num(a["overhead_pct"], "{:+.1f}%"),
                    _ms(a["flush_p50_s"]),
                    verified,
                ]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
            errs = [f"- {name}: {e}" for name, a in t["variants"].items() for e in a["errors"]]
            if errs:
                lines.append("Errors:\n" + "\n".join(errs[:20]) + "\n")
    return "\n".join(lines)


def _ratio(ours: float, anchor: float) -> str:
    """``ours`` as a fraction of ``anchor``: ``1/12.3`` when smaller, ``2.0x`` when larger."""
    if math.isnan(ours) or math.isnan(anchor) or anchor <= 0 or ours <= 0:
        return "n/a"
    return f"1/{anchor / ours:.1f}" if ours <= anchor else f"{ours / anchor:.1f}x"


def ratios(sizes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ours against each anchor of its suite, per size: stall, time to durable and throughput overhead."""
    out = []
    for s in sizes:
        for suite, ours_name, anchor_name in COMPARISONS:
            t = s["suites"].get(suite, {"variants": {}, "none_spread_pct": float("nan")})
            ours, anchor = t["variants"].get(ours_name), t["variants"].get(anchor_name)
            if not ours or not anchor:
                continue
            out.append(
                {
                    "size_mib": s["size_mib"],
                    "suite": suite,
                    "ours": ours_name,
                    "anchor": anchor_name,
                    "stall_p50_s": [ours["stall_p50_s"], anchor["stall_p50_s"]],
                    "stall_ratio": _ratio(ours["stall_p50_s"], anchor["stall_p50_s"]),
                    "durable_p50_s": [ours["durable_p50_s"], anchor["durable_p50_s"]],
                    "durable_ratio": _ratio(ours["durable_p50_s"], anchor["durable_p50_s"]),
                    "anchor_fsyncs": anchor["fsyncs"],
                    "overhead_pct": [ours["overhead_pct"], anchor["overhead_pct"]],
                    "none_spread_pct": t["none_spread_pct"],
                    "verified": [
                        f"{ours['verified_ok']}/{ours['verified_expected']}",
                        f"{anchor['verified_ok']}/{anchor['verified_expected']}",
                    ],
                }
            )
    return out


def format_ratios(items: list[dict[str, Any]]) -> str:
    """The ratios as Markdown bullets."""
    if not items:
        return "- (no pair of variants to compare in this run)"
    lines = []
    for r in items:
        (o_st, a_st), (o_du, a_du), (o_ov, a_ov) = r["stall_p50_s"], r["durable_p50_s"], r["overhead_pct"]
        lines.append(
            f"- {r['size_mib']:g} MiB, {r['suite']}: **{r['ours']}** vs {r['anchor']}: stall p50 {_ms(o_st)} vs "
            f"{_ms(a_st)} ms = **{r['stall_ratio']}**; durable p50 {_ms(o_du)} vs {_ms(a_du)} ms = "
            f"{r['durable_ratio']}"
            + ("" if r["anchor_fsyncs"] else f" ({r['anchor']} does not fsync)")
            + f"; overhead {_num(o_ov, '{:+.1f}%')} vs {_num(a_ov, '{:+.1f}%')} ('none' runs "
            f"{_num(r['none_spread_pct'], '{:.1f}%')} apart); verified {r['verified'][0]} and {r['verified'][1]}"
        )
    return "\n".join(lines)


NOTES = """Notes:
- stall = time the training thread spends inside the save: the `save` call in the loop (state_dict + torch.save
  [+ fsync], or Checkpointer.save), or Lightning's checkpoint callback on a checkpoint step (it builds the
  checkpoint dict and calls the plugin's save_checkpoint; 'in plugin' is save_checkpoint alone). 'first save' is
  the first save of each run (buffer allocation, first file); stall p50/p95 are over the later saves (‡: one save
  per run, so the first is included). 'ckpt step +ms' / 'next step +ms': the excess of the checkpoint step / the
  step after it over the run's median plain step (the writer's CPU use, and overlap mode's deferred copy, show
  there).
- durable = from the start of the save (call or callback) until the file is complete: for torch.save + fsync and
  the async_ckpt variants that includes the fsync of the file and the rename; the variants marked 'no fsync' only
  wrote into the page cache (torch.save returned; for Lightning's AsyncCheckpointIO, its thread's torch.save did).
- overhead = mean step time over the run (first step to last, the final flush excluded) against the suite's
  'none' runs of the same rounds; 'flush' is the time from the last step to the end (Checkpointer.close, or the
  end of fit with the plugin's teardown).
- verified = files that torch.load reads back and that hold, bit for bit (a strided sample of every tensor), the
  model and optimizer state at their save; anything else left in the directory fails the run.
"""
