"""A run's figures: as a table for people, as JSON for scripts (docs/performance.md)."""

from __future__ import annotations

from typing import Any

from meshd.sim.metrics import REBUILT_SHARE, Results, percentile
from meshd.sim.population import WIRE_BYTES_PER_S

STREAM_KBPS = WIRE_BYTES_PER_S * 8 / 1000
"""One copy of the stream on the wire."""
EGRESS_WINDOW = 10
"""Seconds over which the origin's peak egress is averaged (a repair burst is not a rate)."""
EGRESS_SLACK = 1.15
"""The budget: the origin sends at most capacity x bitrate x this."""


def figures(results: Results) -> dict[str, Any]:
    """Every figure of the run, by name (seconds, counts, copies of the stream)."""
    r = results
    lost_any = sum(1 for lost in r.lost if lost)
    shock_lost_any = sum(1 for lost in r.shock_lost if lost)
    central = max((sample.listening for sample in r.egress), default=0)
    return {
        "scenario": r.scenario,
        "level": r.level,
        "seed": r.seed,
        "listeners": r.listeners,
        "peak_audience": r.peak_audience,
        "origin_capacity": r.origin_capacity,
        "origin_egress_peak": round(r.egress_max(EGRESS_WINDOW), 3),
        "origin_egress_budget": round(r.origin_capacity * EGRESS_SLACK, 3),
        "central_egress_peak": central,
        "depth_max": r.depth_max,
        "depth_mean": round(r.depth_mean, 2),
        "depth_max_seen": r.depth_max_seen,
        "tracker_depth_max": r.tracker_depth_max,
        "depth_bound": r.bound,
        "relay_capacity_mean": round(r.relay_capacity, 2),
        "depth_histogram": r.depth_histogram,
        "joins": len(r.join_times),
        "join_p50": round(percentile(r.join_times, 50), 3),
        "join_p99": round(percentile(r.join_times, 99), 3),
        "never_played": r.never_played,
        "stall_p50": round(percentile(r.stalls, 50), 3),
        "stall_p99": round(percentile(r.stalls, 99), 3),
        "stall_max": round(max(r.stalls, default=0.0), 3),
        "players": len(r.lost),
        "players_losing": lost_any,
        "chunks_lost": sum(r.lost),
        "gaps": len(r.outages),
        "gap_p50": round(percentile(r.outages, 50), 3),
        "gap_p99": round(percentile(r.outages, 99), 3),
        "gap_max": round(max(r.outages, default=0.0), 3),
        "survivors": r.shocked,
        "survivors_losing": shock_lost_any,
        "survivors_intact": round(1 - shock_lost_any / r.shocked, 5) if r.shocked else None,
        "recovered": len(r.recovery),
        "recovery_p50": round(percentile(r.recovery, 50), 3),
        "recovery_p99": round(percentile(r.recovery, 99), 3),
        "unrecovered": r.unrecovered,
        "restarted": r.restarted,
        "rebuilt_after": None if r.rebuilt_after is None else round(r.rebuilt_after, 2),
        "tracker_rate": r.tracker_rate,
        "tracker_messages_peak": r.tracker.messages_per_s,
        "tracker_decisions_peak": r.tracker.decisions_per_s,
        "tracker_peak_at": r.tracker.at,
        "tracker_peak_mix": r.tracker.mix,
        "tracker_totals": r.tracker_totals,
        "problems": r.problems,
        "wall_s": round(r.wall_s, 1),
        "rss_mb": round(r.rss_mb),
        "events": r.events,
    }


def _overload(f: dict[str, Any]) -> str:
    """A hint when the tracker's busiest second brought it over twice what it serves:
    refused requests come back as retries, and a launch can collapse under them."""
    rate = f["tracker_rate"]
    if rate is None or f["tracker_messages_peak"] <= 2 * rate:
        return ""
    return (
        f"the tracker was asked {f['tracker_messages_peak'] / rate:.0f} times what it serves "
        "in its busiest second; give it more capacity (--tracker-rate) or less to do "
        "(--refresh: each listener refreshes every S seconds)"
    )


def table(results: Results) -> str:
    """The run as a two-column table."""
    f = figures(results)
    kbps = STREAM_KBPS
    rate = "unlimited" if f["tracker_rate"] is None else f"{f['tracker_rate']:,.0f} req/s"
    histogram = " ".join(f"{d}:{n}" for d, n in enumerate(f["depth_histogram"]) if d and n)
    mix = ", ".join(f"{kind} {n}" for kind, n in f["tracker_peak_mix"].items())
    rows = [
        ("listeners (arrived / peak playing)", f"{f['listeners']:,} / {f['peak_audience']:,}"),
        (
            f"origin egress, peak {EGRESS_WINDOW} s mean",
            f"{f['origin_egress_peak']:.2f} streams = {f['origin_egress_peak'] * kbps:,.0f} "
            f"kbps (budget {f['origin_egress_budget']:.2f} streams: capacity "
            f"{f['origin_capacity']} x 1.15)",
        ),
        (
            "a central server's egress, peak",
            f"{f['central_egress_peak']:,} streams = {f['central_egress_peak'] * kbps:,.0f} kbps",
        ),
        (
            "depth at the end: max / mean",
            f"{f['depth_max']} / {f['depth_mean']:.2f} (bound {f['depth_bound']} = "
            f"ceil(log_k N) + 2, k = {f['relay_capacity_mean']:.2f} mean relay capacity)",
        ),
        (
            "depth: max seen / tracker's view",
            f"{f['depth_max_seen']} / {f['tracker_depth_max']}",
        ),
        ("depth distribution (depth:listeners)", histogram or "-"),
        (
            "join -> first audio p50 / p99",
            f"{f['join_p50']:.2f} s / {f['join_p99']:.2f} s ({f['joins']:,} newcomers, "
            f"{f['never_played']} never played)",
        ),
        (
            "stall per listener p50 / p99 / max",
            f"{f['stall_p50']:.2f} s / {f['stall_p99']:.2f} s / {f['stall_max']:.2f} s",
        ),
        (
            "chunks lost",
            f"{f['chunks_lost']:,} ({f['players_losing']:,} of {f['players']:,} listeners "
            "lost any)",
        ),
        (
            "gaps heard p50 / p99 / max",
            f"{f['gap_p50']:.2f} s / {f['gap_p99']:.2f} s / {f['gap_max']:.2f} s "
            f"({f['gaps']:,} gaps)",
        ),
    ]
    if f["survivors"]:
        rows.append(
            (
                "survivors of the shock losing nothing",
                f"{f['survivors'] - f['survivors_losing']:,} of {f['survivors']:,} "
                f"({100 * f['survivors_intact']:.2f} %)",
            )
        )
    if f["survivors"] and not f["restarted"]:  # a restart takes no parent from anyone
        rows.append(
            (
                "recovery after the shock p50 / p99",
                f"{f['recovery_p50']:.2f} s / {f['recovery_p99']:.2f} s ({f['recovered']:,} "
                f"lost the stream, {f['unrecovered']} never got it back)",
            )
        )
    if f["restarted"]:
        rebuilt = f["rebuilt_after"]
        rows.append(
            (
                "tracker's view rebuilt",
                f"{REBUILT_SHARE:.0%} of those playing known {rebuilt:.2f} s after the restart"
                if rebuilt is not None
                else f"never held {REBUILT_SHARE:.0%} of those playing",
            )
        )
    rows += [
        (
            "tracker at peak: messages/s, decisions/s",
            f"{f['tracker_messages_peak']:,}, {f['tracker_decisions_peak']:,} at "
            f"{f['tracker_peak_at']} s ({mix or '-'}); serving {rate}",
        ),
        (
            "broken at the end",
            ", ".join(f"{kind} {n}" for kind, n in f["problems"].items()) or "nothing",
        ),
        (
            "the sim itself",
            f"{f['wall_s']:.1f} s wall, {f['rss_mb']} MB peak RSS, {f['events']:,} events",
        ),
    ]
    overload = _overload(f)
    if overload:
        rows.insert(-1, ("hint", overload))  # just above the sim's own cost
    width = max(len(label) for label, _ in rows)
    title = f"{f['scenario']} (seed {f['seed']}, {f['level']} level, {f['listeners']:,} listeners)"
    lines = [title, "-" * len(title)]
    lines += [f"{label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines)
