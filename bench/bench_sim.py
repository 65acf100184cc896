"""A scenario (`launch` unless told) at growing sizes, flow level: origin egress, depth
and the sim's own cost against N, as a table and, with --plot, one PNG (needs the plot
extra). The cost is given in CPU seconds too (the run's own, whatever else the machine
runs), and per listener-minute (CPU-ms per listener per virtual minute).

    .venv/bin/python bench/bench_sim.py --sizes 1000,10000,100000 --plot docs/img/sim-scaling.png
    .venv/bin/python bench/bench_sim.py --scenario churn --sizes 10000,30000,100000
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from meshd.sim.report import STREAM_KBPS, figures
from meshd.sim.run import RunSpec, run
from meshd.sim.scenarios import SCENARIOS


def main() -> None:
    parser = argparse.ArgumentParser(description="meshd sim at growing sizes")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="launch")
    parser.add_argument("--sizes", default="1000,3000,10000,30000")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--plot", type=Path, metavar="FILE")
    args = parser.parse_args()
    logging.getLogger("meshd").setLevel(logging.ERROR)
    rows = []
    print(
        f"{'N':>8} {'origin':>8} {'central':>9} {'depth max/mean':>14} {'bound':>5} "
        f"{'join p99':>8} {'lost':>5} {'wall s':>7} {'CPU s':>7} {'ms/l-min':>8} "
        f"{'events':>10} {'RSS MB':>6}"
    )
    for size in (int(text) for text in args.sizes.split(",")):
        cpu = time.process_time()
        spec = RunSpec(args.scenario, level="flow", listeners=size, seed=args.seed)
        f = figures(run(spec))
        f["cpu_s"] = time.process_time() - cpu
        listener_minutes = size * SCENARIOS[args.scenario].duration / 60
        rows.append(f)
        print(
            f"{size:>8,} {f['origin_egress_peak']:>8.2f} {f['central_egress_peak']:>9,} "
            f"{f['depth_max_seen']:>7}/{f['depth_mean']:<6.2f} {f['depth_bound']:>5} "
            f"{f['join_p99']:>8.2f} {f['chunks_lost']:>5} {f['wall_s']:>7.1f} "
            f"{f['cpu_s']:>7.1f} {1000 * f['cpu_s'] / listener_minutes:>8.2f} "
            f"{f['events']:>10,} {f['rss_mb']:>6}",
            flush=True,
        )
    print("origin and central: peak egress in copies of the stream (10 s mean)")
    print("ms/l-min: the run's CPU-ms per listener per virtual minute")
    if args.plot is not None:
        plot(args.scenario, rows, args.plot)
        print(f"plot: {args.plot}")


def plot(scenario: str, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    sizes = [f["listeners"] for f in rows]
    figure, (egress, depth, cost) = pyplot.subplots(1, 3, figsize=(14, 4.2))
    figure.suptitle(f"meshd sim {scenario}, flow level: against the audience")
    egress.loglog(sizes, [f["central_egress_peak"] * STREAM_KBPS for f in rows], "o-",
                  label="a central server")  # fmt: skip
    egress.loglog(sizes, [f["origin_egress_peak"] * STREAM_KBPS for f in rows], "o-",
                  label="meshd origin")  # fmt: skip
    egress.set_xlabel("listeners")
    egress.set_ylabel("peak egress (kbps)")
    egress.legend()
    depth.semilogx(sizes, [f["depth_max_seen"] for f in rows], "o-", label="max")
    depth.semilogx(sizes, [f["depth_mean"] for f in rows], "o-", label="mean (end)")
    depth.semilogx(sizes, [f["depth_bound"] for f in rows], ":", label="bound")
    depth.set_xlabel("listeners")
    depth.set_ylabel("hops from the origin")
    depth.legend()
    cost.loglog(sizes, [f["cpu_s"] for f in rows], "o-")
    cost.set_xlabel("listeners")
    cost.set_ylabel("CPU time of the run (s)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    pyplot.close(figure)


if __name__ == "__main__":
    main()
