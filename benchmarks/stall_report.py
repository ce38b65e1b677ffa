"""The report of ``benchmarks.stall``: pooled figures per saver, the Markdown tables, the targets and their verdicts.

:func:`aggregate` turns the workers' raw results into one entry per state size with, per checkpoint interval and
saver, the figures pooled over the rounds; :func:`report_tables`, :func:`evaluate_targets` / :func:`format_targets`
and :func:`notes` render them. Every ratio compares runs of the same invocation, interleaved on the same machine.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from benchmarks.common import MiB, median, percentile
from benchmarks.common import fmt_ms as _ms
from benchmarks.common import fmt_num as _num
from benchmarks.stall_savers import SAVERS

TARGET_STALL_RATIO = 1 / 7
TARGET_STALL_MIN_MIB = 512.0
TARGET_OVERHEAD_PCT = 5.0  # and at most TARGET_OVERHEAD_OF_MONAI of MONAI's overhead in the same run
TARGET_OVERHEAD_OF_MONAI = 1 / 3
TARGET_FIRST_RATIO = 2.0  # the first checkpoint of a run (buffers prewarmed in the background) vs a later one
TARGET_FIRST_ABS_S = 0.005  # below this the ratio of two tiny stalls is noise
TARGET_EVERY = 20
MIN_PLAIN_STEPS = 5  # fewer plain steps than this in a run: its baseline is the same round's 'none' run


def _plain_steps(case: dict[str, Any]) -> list[float]:
    """Steps of a run that are neither a checkpoint step nor the step right after one."""
    ck = set(case["ckpt_iters"]) if case["saver"] != "none" else set()
    return [s for i, s in enumerate(case["steps_s"], 1) if i not in ck and i - 1 not in ck]


def _pooled(cases: list[dict[str, Any]], none_base: dict[int, float]) -> dict[str, Any]:
    """Aggregate the rounds of one (size, interval, saver).

    ``none_base`` maps a round to the median step of its 'none' run, the baseline of a run with too few plain
    steps of its own (the tight case).
    """
    first, steady, first2, steady2, nexts, handler, durable, write, blocking, backpressure = ([] for _ in range(10))
    handler_first: list[float] = []
    blocking_first: list[float] = []
    plains: list[float] = []
    window = 0.0
    nsteps = 0
    ok = expected = 0
    peaks, extras, flushes = [], [], []
    errors: list[str] = []
    per_case_peak = True
    borrowed = False
    for c in cases:
        if "error" in c:
            errors.append(c["error"])
            continue
        steps = c["steps_s"]
        ck = sorted(c["ckpt_iters"]) if c["saver"] != "none" else []
        plain = _plain_steps(c)
        if len(plain) >= MIN_PLAIN_STEPS or c["saver"] == "none" or c["round"] not in none_base:
            base = median(plain) if plain else median(steps)
        else:
            base = none_base[c["round"]]
            borrowed = True
        plains.append(base)
        for n, it in enumerate(ck):
            extra = steps[it - 1] - base
            (first if n == 0 else steady).append(extra)
            nxt = steps[it] - base if it < len(steps) else float("nan")
            nexts.append(nxt)
            (first2 if n == 0 else steady2).append(extra + (0.0 if math.isnan(nxt) else nxt))
            (handler_first if n == 0 else handler).append(c["handler_s"][str(it)])
        for n, (_, rec) in enumerate(sorted(c["saves"].items(), key=lambda kv: int(kv[0]))):
            durable.append(rec["durable_s"])
            write.append(rec["write_mib_s"])
            if "blocking_s" in rec:  # the first save of a run also allocates the buffers: reported apart
                (blocking_first if n == 0 else blocking).append(rec["blocking_s"])
            if "backpressure_s" in rec:
                backpressure.append(rec["backpressure_s"])
        window += c["window_s"]
        nsteps += c["n_steps"]
        ok += c["verified_ok"]
        expected += c["verified_expected"]
        errors.extend(c["verify_errors"])
        peaks.append(c["rss_peak"])
        extras.append(c["rss_peak"] - c["rss_start"])
        flushes.append(c["flush_s"])
        per_case_peak = per_case_peak and c["peak_per_case"]
    nan = float("nan")
    only_first = not steady
    stalls = steady or first
    stalls2 = steady2 or first2
    return {
        "runs": len(cases),
        "checkpoints": len(first) + len(steady),
        "steady_checkpoints": len(steady),
        "stall_includes_first": only_first,
        "baseline_from_none": borrowed,
        "plain_step_p50_s": median(plains),
        "mean_step_s": window / nsteps if nsteps else nan,
        "first_stall_p50_s": percentile(first, 50),
        "stall_p50_s": percentile(stalls, 50),
        "stall_p95_s": percentile(stalls, 95),
        "stall_with_next_p50_s": percentile(stalls2, 50),
        "next_step_extra_p50_s": percentile(nexts, 50),
        "handler_p50_s": percentile(handler or handler_first, 50),
        "blocking_p50_s": percentile(blocking or blocking_first, 50),
        "first_blocking_p50_s": percentile(blocking_first, 50),
        "backpressure_p50_s": percentile(backpressure, 50),
        "durable_p50_s": percentile(durable, 50),
        "durable_p95_s": percentile(durable, 95),
        "write_mib_s_p50": percentile(write, 50),
        "flush_p50_s": percentile(flushes, 50),
        "rss_peak_bytes": max(peaks) if peaks else 0,
        "rss_extra_bytes": max(extras) if extras else 0,
        "peak_per_case": per_case_peak,
        "verified_ok": ok,
        "verified_expected": expected,
        "errors": errors,
        "first_stalls_s": first,
        "steady_stalls_s": steady,
    }


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per size: probes and, per interval and saver, the pooled figures."""
    sizes = []
    for res in results:
        probes = [c for c in res["cases"] if c.get("saver") == "probe" and "error" not in c]
        runs = [c for c in res["cases"] if c.get("saver") != "probe"]
        entry: dict[str, Any] = {
            "size_mib": res["size_mib"],
            "state_bytes": res.get("state_bytes", 0),
            "workload": res.get("workload", "?"),
            "error": res.get("error"),
            "disk_mib_s": median([p["disk"]["mib_s"] for p in probes]),
            "disk_total_s": median([p["disk"]["total_s"] for p in probes]),
            "memcpy_s": median([p["memcpy"]["copy_s"] for p in probes]),
            "memcpy_gib_s": median([p["memcpy"]["gib_s"] for p in probes]),
            "intervals": {},
        }
        none_runs = [c for c in runs if c["saver"] == "none" and "error" not in c]
        none_base = {c["round"]: median(c["steps_s"]) for c in none_runs}
        entry["none_mean_steps_s"] = [c["window_s"] / c["n_steps"] for c in none_runs if c["n_steps"]]
        none = _pooled(none_runs, none_base) if none_runs else None
        for every in sorted({c["every"] for c in runs if c.get("every")}, reverse=True):
            table = {}
            for name in SAVERS:
                mine = [c for c in runs if c["saver"] == name and c.get("every") == every]
                if not mine:
                    continue
                agg = _pooled(mine, none_base)
                base = none["mean_step_s"] if none else float("nan")
                agg["overhead_pct"] = (agg["mean_step_s"] / base - 1) * 100 if base and base > 0 else float("nan")
                interval = every * agg["plain_step_p50_s"]
                agg["durable_over_interval"] = agg["durable_p50_s"] / interval if interval > 0 else float("nan")
                table[name] = agg
            entry["intervals"][str(every)] = table
        sizes.append(entry)
    return sizes


# -- report --------------------------------------------------------------------------------------------------------
def report_tables(sizes: list[dict[str, Any]]) -> str:
    """One Markdown table per state size (rows: interval x saver), with the raw probes and errors above/below it."""
    lines = []
    for s in sizes:
        state = s["state_bytes"] / MiB
        lines.append(
            f"### {s['size_mib']:g} MiB requested ({state:.1f} MiB of parameters + Adam state; {s['workload']})\n"
        )
        lines.append(
            f"Raw disk: {_num(s['disk_mib_s'])} MiB/s (write + fsync of {state:.0f} MiB in "
            f"{_num(s['disk_total_s'], '{:.2f}')} s). memcpy floor: {_ms(s['memcpy_s'])} ms "
            f"({_num(s['memcpy_gib_s'], '{:.1f}')} GiB/s).\n"
        )
        eager = s["intervals"].get(max(s["intervals"], key=int, default=""), {}).get("async-eager")
        if eager and s["memcpy_s"] > 0 and not math.isnan(eager["blocking_p50_s"]):
            lines.append(
                f"async_ckpt eager: training thread blocked {_ms(eager['blocking_p50_s'])} ms per save (its telemetry, "
                "p50 of the saves after each run's first) = "
                f"{eager['blocking_p50_s'] / s['memcpy_s']:.1f}x the memcpy floor; the first save of a run, which "
                f"also allocates the buffers: {_ms(eager['first_blocking_p50_s'])} ms.\n"
            )
        if s.get("error"):
            lines.append(f"**worker error: {s['error']}**\n")
        header = (
            "| K | saver | ckpts | plain step ms | first ckpt +ms | stall p50 ms | stall p95 ms | next step +ms "
            "| handler p50 ms "
            "| durable p50 ms | durable/interval | write MiB/s | of disk | overhead | peak RSS MiB | +RSS MiB "
            "| verified |"
        )
        lines.append(header)
        lines.append("|" + "---|" * (header.count("|") - 1))
        for every, table in s["intervals"].items():
            for name, a in table.items():
                of_disk = a["write_mib_s_p50"] / s["disk_mib_s"] * 100 if s["disk_mib_s"] > 0 else float("nan")
                verified = "n/a" if name == "none" else f"{a['verified_ok']}/{a['verified_expected']}"
                if a["errors"]:
                    verified += " FAIL"
                peak_note = "" if a["peak_per_case"] else "*"
                mark = ("†" if a["baseline_from_none"] else "") + ("‡" if a["stall_includes_first"] else "")
                cells = [
                    every,
                    name,
                    str(a["checkpoints"]),
                    _ms(a["plain_step_p50_s"]) + ("†" if a["baseline_from_none"] else ""),
                    "-" if name == "none" else _ms(a["first_stall_p50_s"]),
                    "-" if name == "none" else _ms(a["stall_p50_s"]) + mark,
                    "-" if name == "none" else _ms(a["stall_p95_s"]) + mark,
                    "-" if name == "none" else _ms(a["next_step_extra_p50_s"]),
                    "-" if name == "none" else _ms(a["handler_p50_s"]),
                    "-" if name == "none" else _ms(a["durable_p50_s"]),
                    "-" if name == "none" else _num(a["durable_over_interval"], "{:.2f}"),
                    "-" if name == "none" else _num(a["write_mib_s_p50"]),
                    "-" if name == "none" else _num(of_disk, "{:.0f}%"),
                    _num(a["overhead_pct"], "{:+.1f}%"),
                    f"{a['rss_peak_bytes'] / MiB:.0f}{peak_note}",
                    f"{a['rss_extra_bytes'] / MiB:.0f}{peak_note}",
                    verified,
                ]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        errs = [
            f"- {every}/{name}: {e}"
            for every, t in s["intervals"].items()
            for name, a in t.items()
            for e in a["errors"]
        ]
        if errs:
            lines.append("Errors:\n" + "\n".join(errs[:20]) + "\n")
    return "\n".join(lines)


def _noise_pct(entry: dict[str, Any]) -> float:
    """How far apart the 'none' runs of one size are (max/min of their mean step time, in %): the run's own noise."""
    means = entry.get("none_mean_steps_s") or []
    if len(means) < 2 or min(means) <= 0:
        return float("nan")
    return (max(means) / min(means) - 1) * 100


def evaluate_targets(sizes: list[dict[str, Any]], every: int) -> list[dict[str, Any]]:
    """The project's targets, computed from the same run, each with PASS/FAIL (or SKIP when not measured).

    A throughput target that the run's own noise could hide (the 'none' runs of the size differ by more than the
    target's bound) is marked ``noisy`` with the reason, instead of a bare PASS or FAIL.
    """
    out: list[dict[str, Any]] = []
    big = [s for s in sizes if s["size_mib"] >= TARGET_STALL_MIN_MIB]
    note = "" if every == TARGET_EVERY else f" (measured with K={every}, the target is defined for K={TARGET_EVERY})"
    for s in big:
        t = s["intervals"].get(str(every), {})
        monai, eager, overlap = t.get("monai"), t.get("async-eager"), t.get("async-overlap")
        size = f"{s['size_mib']:g} MiB"
        if monai and eager:
            ratio = eager["stall_p50_s"] / monai["stall_p50_s"] if monai["stall_p50_s"] > 0 else float("nan")
            out.append(
                {
                    "target": f"{size}: async eager stall p50 <= 1/7 of MONAI's",
                    "measured": f"{_ms(eager['stall_p50_s'])} ms vs {_ms(monai['stall_p50_s'])} ms = "
                    + ("n/a" if math.isnan(ratio) or ratio <= 0 else f"1/{1 / ratio:.1f}"),
                    "ok": (not math.isnan(ratio)) and ratio <= TARGET_STALL_RATIO,
                }
            )
        else:
            out.append({"target": f"{size}: eager stall vs MONAI", "measured": "needs monai and async-eager"})
        if eager and overlap:
            a, b = overlap["stall_p50_s"], eager["stall_p50_s"]
            a2, b2 = overlap["stall_with_next_p50_s"], eager["stall_with_next_p50_s"]
            out.append(
                {
                    "target": f"{size}: overlap stall p50 < eager (also counting the step after the checkpoint)",
                    "measured": f"{_ms(a)} vs {_ms(b)} ms; with next step {_ms(a2)} vs {_ms(b2)} ms",
                    "ok": a < b and (math.isnan(a2) or math.isnan(b2) or a2 < b2),
                }
            )
        if eager:
            first, later = eager["first_stall_p50_s"], eager["stall_p50_s"]
            if eager["stall_includes_first"]:
                out.append({"target": f"{size}: first eager checkpoint <= 2x a later one", "measured": "one per run"})
            else:
                out.append(
                    {
                        "target": f"{size}: first eager checkpoint of a run <= {TARGET_FIRST_RATIO:g}x the stall of a "
                        "later one",
                        "measured": f"{_ms(first)} ms vs {_ms(later)} ms",
                        "ok": first <= TARGET_FIRST_RATIO * max(later, 0.0) or first <= TARGET_FIRST_ABS_S,
                    }
                )
        noise = _noise_pct(s)
        for name in ("async-eager", "async-overlap"):
            if name not in t:
                continue
            o = t[name]["overhead_pct"]
            mo = monai["overhead_pct"] if monai else float("nan")
            bound = TARGET_OVERHEAD_PCT if math.isnan(mo) else min(TARGET_OVERHEAD_PCT, mo * TARGET_OVERHEAD_OF_MONAI)
            target = {
                "target": f"{size}, {name}: throughput overhead <= {TARGET_OVERHEAD_PCT:g}% and <= 1/3 of MONAI's"
                + note,
                "measured": f"{_num(o, '{:+.1f}%')} (MONAI {_num(mo, '{:+.1f}%')}, bound {bound:.1f}%; "
                f"'none' runs {_num(noise, '{:.1f}%')} apart)",
                "ok": (not math.isnan(o)) and o <= bound,
            }
            if not target["ok"] and not math.isnan(noise) and noise > bound:
                target["noisy"] = (
                    f"the plain runs of this size differ by {noise:.1f}% from round to round, more than the "
                    f"{bound:.1f}% bound: this machine was too busy to tell; rerun it idle (more --rounds help)"
                )
            out.append(target)
    if not big:
        out.append(
            {
                "target": f"stall and throughput targets at >= {TARGET_STALL_MIN_MIB:g} MiB",
                "measured": "no size >= 512 MiB in this run",
            }
        )
    return out


def format_targets(targets: list[dict[str, Any]]) -> str:
    """The targets as Markdown bullets with their verdict: PASS, FAIL, NOISY (with the reason) or SKIP."""
    lines = []
    for t in targets:
        verdict = "SKIP" if "ok" not in t else ("PASS" if t["ok"] else "NOISY" if t.get("noisy") else "FAIL")
        why = f" ({t['noisy']})" if verdict == "NOISY" else ""
        lines.append(f"- **{verdict}** {t['target']}: {t['measured']}{why}")
    return "\n".join(lines)


def notes(sizes: Iterable[dict[str, Any]]) -> str:
    """What each column means and how it was measured (printed under the targets)."""
    per_case = all(a["peak_per_case"] for s in sizes for t in s["intervals"].values() for a in t.values())
    lines = [
        "Notes:",
        "- stall = wall time of a checkpointing step (its ITERATION_COMPLETED handlers included) minus the median "
        "plain step of the same run (steps that are neither a checkpoint step nor the one after it). 'first ckpt' "
        "is that excess for the first checkpoint of each run (buffer allocation, first file); stall p50/p95 are "
        "over the later checkpoints. 'next step +ms' is the excess of the step after a checkpoint (where overlap "
        "mode's deferred copy and the writer's CPU use show up). 'handler' is the time inside the saver's own "
        "handler. Overhead = mean step time over the whole run vs 'none' (interleaved runs of the same rounds), "
        "excluding the final flush after the last step.",
        "- † the run has too few plain steps (small K): its baseline is the median step of the same round's "
        "'none' run. ‡ every run had a single checkpoint, so p50/p95 include the first one.",
        "- durable: async_ckpt's own telemetry (event to fsynced rename); DCP: event to its future's completion; "
        "MONAI/ignite: their handler time, but they do not fsync, so their files may still be in the page cache.",
        "- DCP writes its own directory format; it is a stall reference, not a drop-in alternative.",
        "- The tight case checkpoints more often than the writer can keep up: the stall then is backpressure "
        "(waiting for a free buffer), by design.",
    ]
    if not per_case:
        lines.append(
            "- * peak RSS is the worker process's peak, not per run: this kernel refused to reset it "
            "(/proc/self/clear_refs); use --isolate for per-run peaks."
        )
    return "\n".join(lines) + "\n"
