"""A run's plots as one PNG: the origin's egress against a central server's, the depth
distribution, the gaps listeners heard and join times. Needs matplotlib (the `plot`
extra: `pip install -e '.[plot]'`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from meshd.sim.metrics import Results
from meshd.sim.report import EGRESS_SLACK, STREAM_KBPS

if TYPE_CHECKING:
    from matplotlib.axes import Axes


class PlotUnavailable(Exception):
    """matplotlib is not installed."""


def write_png(results: Results, directory: Path) -> Path:
    """Write `<scenario>-<level>-<listeners>-seed<seed>.png` in `directory`."""
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        raise PlotUnavailable("plots need matplotlib: pip install 'meshd[plot]'") from None
    r = results
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{r.scenario}-{r.level}-{r.listeners}-seed{r.seed}.png"
    figure, ((egress, depth), (gaps, joins)) = pyplot.subplots(2, 2, figsize=(11, 7.5))
    figure.suptitle(
        f"meshd sim {r.scenario}: {r.listeners:,} listeners, seed {r.seed}, {r.level} level"
    )

    times = [s.at for s in r.egress]
    egress.plot(times, [s.listening * STREAM_KBPS for s in r.egress], label="a central server")
    egress.plot(times, [s.origin_streams * STREAM_KBPS for s in r.egress], label="meshd origin")
    budget = r.origin_capacity * EGRESS_SLACK * STREAM_KBPS
    egress.axhline(budget, linestyle=":", color="grey", label="budget (capacity x 1.15)")
    egress.set_yscale("log")
    egress.set_ylim(bottom=10)
    egress.set_xlabel("time (s)")
    egress.set_ylabel("egress (kbps)")
    egress.set_title("origin egress")
    egress.legend(loc="upper left", fontsize="small")

    levels = list(range(1, len(r.depth_histogram)))
    depth.bar(levels, r.depth_histogram[1:])
    depth.axvline(r.bound + 0.5, linestyle=":", color="grey", label=f"bound {r.bound}")
    depth.set_xlabel("depth (hops from the origin)")
    depth.set_ylabel("listeners")
    depth.set_title("depth at the end")
    depth.legend(fontsize="small")

    _cdf(gaps, r.outages, "gap heard (s)", f"gaps ({len(r.outages):,})")
    _cdf(joins, r.join_times, "join -> first audio (s)", f"join times ({len(r.join_times):,})")

    figure.tight_layout()
    figure.savefig(path, dpi=80)
    pyplot.close(figure)
    return path


def _cdf(axes: Axes, values: list[float], xlabel: str, title: str) -> None:
    ordered = sorted(values)
    if ordered:
        shares = [(i + 1) / len(ordered) for i in range(len(ordered))]
        axes.step(ordered, shares, where="post")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("share at or below")
    axes.set_ylim(0, 1.02)
    axes.set_title(title)
