"""The `meshd` command: keygen, tracker, origin, listen, status, token, demo, sim,
conformance."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import random
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.addresses import format_address, parse_address
from meshd.conformance.command import register as register_conformance
from meshd.keys import KeyFileError, load_key, write_new_key
from meshd.node.config import NodeConfig
from meshd.node.origin import Origin, OriginSettings
from meshd.node.output import AudioSink
from meshd.node.relay import NodeError, Relay, RelaySettings
from meshd.node.stats import ChunkTrace
from meshd.quic import open_quic_endpoint
from meshd.tracker.server import serve_tracker
from meshd.tracker.service import Tracker, TrackerConfig
from meshd.tracker_client import TrackerRefused, ask_tracker
from protocol import StatusReport, StatusRequest, issue_token, key_from_text, key_id, key_to_text
from protocol.identity import public_key_from_id

logger = logging.getLogger("meshd")
MAX_WORKERS = 256

EPILOG = """\
A whole room on one machine:
  meshd keygen --out origin.key            # prints the stream id
  meshd tracker --listen 127.0.0.1:4433
  meshd origin --tracker 127.0.0.1:4433 --key origin.key --input talk.opus
  meshd listen --tracker 127.0.0.1:4433 --stream STREAM_ID --output - | ffplay -nodisp -
Or just: meshd demo
"""


class UsageError(Exception):
    """A bad option value; reported like argparse's own errors (exit status 2)."""


def main(argv: Sequence[str] | None = None) -> NoReturn:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    try:
        code = args.run(args)
    except UsageError as exc:
        parser.exit(2, f"meshd: error: {exc}\n")
    except FATAL as exc:
        parser.exit(_exit_status(exc), f"meshd: error: {exc or type(exc).__name__}\n")
    except BaseExceptionGroup as group:  # raised from inside a trio nursery
        fatal = group.subgroup(lambda exc: isinstance(exc, FATAL))
        if fatal is None:
            raise
        leaf = _first_leaf(fatal)
        parser.exit(_exit_status(leaf), f"meshd: error: {leaf}\n")
    sys.exit(code)


def _exit_status(exc: BaseException) -> int:
    return exc.exit_status if isinstance(exc, NodeError) else 1


FATAL = (KeyFileError, NodeError, TrackerRefused, OSError, trio.TooSlowError)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshd",
        description="Live audio to huge audiences: every listener relays the stream to a "
        "few others over QUIC, so the origin only feeds its few direct children.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_keygen(sub)
    _add_tracker(sub)
    _add_origin(sub)
    _add_listen(sub)
    _add_status(sub)
    _add_token(sub)
    _add_demo(sub)
    _add_sim(sub)
    register_conformance(sub, _address, _key_id)
    return parser


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    run: Callable[[argparse.Namespace], int],
    summary: str,
    description: str,
) -> argparse.ArgumentParser:
    command = sub.add_parser(name, help=summary, description=description)
    command.set_defaults(run=run)
    return command


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _key_id(text: str) -> bytes:
    try:
        return key_from_text(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    if not text.isdigit() or int(text) > 1024:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 0 to 1024")
    return int(text)


def _workers(text: str) -> int:
    if not text.isdigit() or int(text) > MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of workers from 0 to {MAX_WORKERS}"
            f" (hint: one per core, {os.cpu_count()} here; 0 serves in one process)"
        )
    return int(text)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


# -- keygen ---------------------------------------------------------------------------------


def _add_keygen(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    command = _command(
        sub,
        "keygen",
        run_keygen,
        "create an Ed25519 key file",
        "Write a new Ed25519 key (mode 0600) and print its id. For an origin key, the id "
        "is the stream id that listeners pass to `meshd listen --stream`.",
    )
    command.add_argument("--out", type=Path, required=True, metavar="FILE")
    command.add_argument("--force", action="store_true", help="replace an existing file")


def run_keygen(args: argparse.Namespace) -> int:
    key = write_new_key(args.out, overwrite=args.force)
    print(key_to_text(key_id(key)))
    return 0


# -- tracker --------------------------------------------------------------------------------


def _add_tracker(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    command = _command(
        sub,
        "tracker",
        run_tracker,
        "run a tracker",
        "Assign each joining listener a parent and backups, and repair the tree when "
        "listeners leave or die. Prints `listening on HOST:PORT` once ready; stops "
        "cleanly on SIGINT/SIGTERM.",
    )
    command.add_argument(
        "--listen",
        type=_address,
        default=("127.0.0.1", 4433),
        metavar="HOST:PORT",
        help="UDP address to serve on (default 127.0.0.1:4433; port 0 picks one)",
    )
    command.add_argument(
        "--key",
        type=Path,
        metavar="FILE",
        help="the tracker's key file (default: a new key each run; nodes may pin its id)",
    )
    command.add_argument(
        "--host-key",
        type=_key_id,
        action="append",
        default=[],
        metavar="ID",
        help="accept admission tokens signed by this host key (repeatable); without "
        "any, the tracker is open to everyone",
    )
    command.add_argument(
        "--refresh",
        type=int,
        default=180,
        metavar="S",
        help="seconds between a node's soft-state refreshes (default 180)",
    )
    command.add_argument(
        "--peer-ttl",
        type=_positive,
        default=600.0,
        metavar="S",
        help="forget a node not heard from for this long (default 600)",
    )
    command.add_argument(
        "--max-pending",
        type=int,
        default=256,
        metavar="N",
        help="requests and handshakes in progress (per worker) before new connections "
        "are refused and clients back off (default 256)",
    )
    command.add_argument(
        "--joins-per-network",
        type=float,
        default=20.0,
        metavar="RATE",
        help="JOINs per second from one source network (IPv4 /24, IPv6 /48) per worker, "
        "after a burst of --join-burst; beyond, clients are told to retry later, so one "
        "machine cannot flood the tree with fresh identities (default 20; 0: no limit)",
    )
    command.add_argument(
        "--join-burst",
        type=int,
        default=100,
        metavar="N",
        help="JOINs one source network may send at once before --joins-per-network "
        "applies, e.g. a household or an office starting together (default 100)",
    )
    command.add_argument(
        "--workers",
        type=_workers,
        default=os.cpu_count() or 1,
        metavar="N",
        help="processes that share the port and do the QUIC handshakes and checks, while "
        "this one makes the decisions; 0: all in this process (default: one per core, "
        f"{os.cpu_count() or 1} here)",
    )


def run_tracker(args: argparse.Namespace) -> int:
    key = load_key(args.key) if args.key else Ed25519PrivateKey.generate()
    config = TrackerConfig(
        refresh_s=args.refresh,
        peer_ttl=args.peer_ttl,
        host_keys=tuple(public_key_from_id(k) for k in args.host_key),
        max_pending=args.max_pending,
        joins_per_network_s=args.joins_per_network,
        join_burst_per_network=args.join_burst,
    )

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, nursery.cancel_scope)
            address = await nursery.start(
                serve_tracker, Tracker(config), key, *args.listen, args.workers
            )
            mode = "tokens required" if args.host_key else "open mode"
            print(f"listening on {format_address(address)}", flush=True)
            logger.info("tracker %s ready (%s)", key_to_text(key_id(key)), mode)

    trio.run(serve)
    return 0


async def _cancel_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            logger.info("%s: shutting down", signal.Signals(signum).name)
            scope.cancel()
            return


# -- origin ---------------------------------------------------------------------------------


def _add_node_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--tracker", type=_address, required=True, metavar="HOST:PORT", help="the tracker"
    )
    command.add_argument(
        "--tracker-key",
        type=_key_id,
        metavar="ID",
        help="refuse a tracker whose key is not this id",
    )
    command.add_argument(
        "--listen",
        type=_address,
        default=("127.0.0.1", 0),
        metavar="HOST:PORT",
        help="UDP address children connect to (default 127.0.0.1, any port)",
    )
    command.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="address to give the tracker, if children must use another one (NAT, 0.0.0.0)",
    )
    command.add_argument(
        "--stats-file",
        type=Path,
        metavar="FILE",
        help="keep this file updated with the node's stats as JSON",
    )
    command.add_argument(
        "--trace",
        type=Path,
        metavar="FILE",
        help="write `seq unix_time_us` for every chunk as it arrives (for latency benches)",
    )
    command.add_argument(
        "--stats-interval",
        type=_positive,
        default=5.0,
        metavar="S",
        help="seconds between stats log lines and stats-file updates (default 5)",
    )


def _add_origin(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    command = _command(
        sub,
        "origin",
        run_origin,
        "stream an Ogg Opus input",
        "Read Ogg Opus from a file or stdin (e.g. `ffmpeg -re -i talk.mp3 -c:a libopus "
        "-b:a 32k -page_duration 20000 -f ogg - | meshd origin ... --input -`), pace it "
        "in real time, sign it, and feed at most --capacity children. Ends the stream "
        "at the end of input (or on SIGINT/SIGTERM) and exits once its children have it.",
    )
    command.add_argument(
        "--key",
        type=Path,
        required=True,
        metavar="FILE",
        help="the stream's key (its id is the stream id)",
    )
    command.add_argument(
        "--input", required=True, metavar="PATH|-", help="Ogg Opus file, or - for stdin"
    )
    command.add_argument(
        "--capacity",
        type=_count,
        default=4,
        metavar="N",
        help="children the origin feeds itself (default 4)",
    )
    _add_node_options(command)


def run_origin(args: argparse.Namespace) -> int:
    key = load_key(args.key)
    if args.input != "-" and not Path(args.input).is_file():
        raise UsageError(f"--input {args.input}: no such file")
    settings = OriginSettings(
        tracker=args.tracker,
        input=args.input,
        capacity=args.capacity,
        listen=args.listen,
        advertise=args.advertise,
        tracker_key=args.tracker_key,
    )
    config = NodeConfig(stats_interval=args.stats_interval)
    trace = ChunkTrace(args.trace) if args.trace else None
    origin = Origin(key, settings, config, stats_file=args.stats_file, trace=trace)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_on_signal, origin.stop)
            await origin.run()
            nursery.cancel_scope.cancel()

    trio.run(run)
    return 0


async def _on_signal(action: Callable[[], None]) -> None:
    """First SIGINT/SIGTERM: graceful `action`; a second one: exit at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if action is _exit_now:
                _exit_now()
            logger.info(
                "%s: finishing gracefully (again to quit at once)", signal.Signals(signum).name
            )
            action()
            action = _exit_now


def _exit_now() -> None:
    sys.exit(130)


# -- listen ---------------------------------------------------------------------------------


def _add_listen(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    command = _command(
        sub,
        "listen",
        run_listen,
        "play a stream and relay it",
        "Join a stream at its live edge, write it as Ogg Opus to a file or stdout "
        "(`--output - | ffplay -nodisp -`), and relay it to up to --max-children other "
        "listeners. SIGINT/SIGTERM leaves gracefully (children are moved to other "
        "parents first). Exit status: 0 after playing the whole stream (or a graceful "
        "leave); 3 if the stream ended but audio was missed (cut off from it for "
        "--join-timeout, or chunks lost); 1 if it never got going.",
    )
    command.add_argument(
        "--stream",
        type=_key_id,
        required=True,
        metavar="STREAM_ID",
        help="the stream id (the origin's key id)",
    )
    command.add_argument(
        "--output",
        required=True,
        metavar="PATH|-",
        help="where to write the audio (Ogg Opus); - for stdout",
    )
    command.add_argument(
        "--max-children",
        type=_count,
        default=4,
        metavar="N",
        help="listeners to relay to (default 4; 0 = leaf only)",
    )
    command.add_argument(
        "--buffer",
        type=int,
        default=10_000,
        metavar="MS",
        help="audio kept for children and repairs (default 10000 ms)",
    )
    command.add_argument(
        "--silence-timeout",
        type=int,
        default=600,
        metavar="MS",
        help="switch parent after this long without data (default 600; at least 3 of the "
        "parents' 200 ms heartbeats)",
    )
    command.add_argument(
        "--stall-timeout",
        type=int,
        default=2000,
        metavar="MS",
        help="switch parent after this long with nothing new to play, unless the parent "
        "says it is stalled too (default 2000; longer than --silence-timeout)",
    )
    command.add_argument(
        "--key", type=Path, metavar="FILE", help="this node's key (default: a new key each run)"
    )
    command.add_argument(
        "--token",
        metavar="TOKEN",
        help="admission token from the host (base64), if the stream needs one",
    )
    command.add_argument(
        "--join-timeout",
        type=_positive,
        default=60.0,
        metavar="S",
        help="give up after this long without audio: no parent found at start, or cut "
        "off from the stream later (default 60)",
    )
    _add_node_options(command)


def run_listen(args: argparse.Namespace) -> int:
    if args.buffer < 1000:
        raise UsageError("--buffer must be at least 1000 ms")
    if args.silence_timeout < 100:
        raise UsageError("--silence-timeout must be at least 100 ms")
    if args.stall_timeout <= args.silence_timeout:
        raise UsageError("--stall-timeout must be longer than --silence-timeout")
    key = load_key(args.key) if args.key else Ed25519PrivateKey.generate()
    token = _decode_token(args.token) if args.token else None
    config = NodeConfig(
        buffer_seconds=args.buffer / 1000,
        silence_timeout=args.silence_timeout / 1000,
        stall_timeout=args.stall_timeout / 1000,
        heartbeat_interval=min(0.2, args.silence_timeout / 3000),
        stats_interval=args.stats_interval,
    )
    settings = RelaySettings(
        tracker=args.tracker,
        stream=args.stream,
        capacity=args.max_children,
        listen=args.listen,
        advertise=args.advertise,
        token=token,
        tracker_key=args.tracker_key,
        join_timeout=args.join_timeout,
    )
    trace = ChunkTrace(args.trace) if args.trace else None
    relay = Relay(
        key, settings, AudioSink(args.output), config, stats_file=args.stats_file, trace=trace
    )

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_on_signal, relay.leave)
            await relay.run()
            nursery.cancel_scope.cancel()

    trio.run(run)
    return 0


def _decode_token(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise UsageError("--token is not base64 (copy it as `meshd token` printed it)") from None


# -- status ---------------------------------------------------------------------------------


def _add_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    command = _command(
        sub,
        "status",
        run_status,
        "show a stream's tree",
        "Ask the tracker for a stream's audience, tree depth, origin load and activity.",
    )
    command.add_argument("--tracker", type=_address, required=True, metavar="HOST:PORT")
    command.add_argument("--stream", type=_key_id, required=True, metavar="STREAM_ID")
    command.add_argument("--json", action="store_true", help="print JSON")


def run_status(args: argparse.Namespace) -> int:
    async def ask() -> object:
        async with open_quic_endpoint(Ed25519PrivateKey.generate()) as endpoint:
            return await ask_tracker(
                endpoint, args.tracker, StatusRequest(args.stream), give_up_after=10.0
            )

    report = trio.run(ask)
    assert isinstance(report, StatusReport)
    if args.json:
        print(json.dumps(status_dict(report)))
    else:
        print(format_status(report))
    return 0


def status_dict(report: StatusReport) -> dict[str, object]:
    return {
        "stream": key_to_text(report.stream),
        "audience": report.audience,
        "origin_children": report.origin_children,
        "origin_capacity": report.origin_capacity,
        "depth_histogram": list(report.depth_histogram),
        "joins_per_s": report.joins_per_s,
        "rejoins_per_s": report.rejoins_per_s,
        "total_joins": report.total_joins,
        "total_rejoins": report.total_rejoins,
        "total_leaves": report.total_leaves,
        "total_failures": report.total_failures,
        "total_shed": report.total_shed,
    }


def format_status(report: StatusReport) -> str:
    depths = " ".join(f"{d}:{n}" for d, n in enumerate(report.depth_histogram) if d)
    return (
        f"stream {key_to_text(report.stream)}\n"
        f"  audience        {report.audience}\n"
        f"  origin children {report.origin_children}/{report.origin_capacity}\n"
        f"  depth histogram {depths or '-'}\n"
        f"  joins/s {report.joins_per_s:.1f}  rejoins/s {report.rejoins_per_s:.1f}\n"
        f"  totals: joins {report.total_joins}, rejoins {report.total_rejoins}, "
        f"leaves {report.total_leaves}, failures {report.total_failures}, "
        f"shed {report.total_shed}"
    )


# -- token ----------------------------------------------------------------------------------


def _add_token(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    command = _command(
        sub,
        "token",
        run_token,
        "issue an admission token",
        "As the host: sign a token that lets NODE join STREAM (for trackers started "
        "with --host-key). Prints it in base64 for `meshd listen --token`.",
    )
    command.add_argument("--host-key", type=Path, required=True, metavar="FILE")
    command.add_argument("--stream", type=_key_id, required=True, metavar="STREAM_ID")
    command.add_argument("--node", type=_key_id, required=True, metavar="NODE_ID")
    command.add_argument(
        "--ttl",
        type=_positive,
        default=3600.0,
        metavar="S",
        help="seconds the token stays valid (default 3600)",
    )


def run_token(args: argparse.Namespace) -> int:
    host_key = load_key(args.host_key)
    expires_ms = int((time.time() + args.ttl) * 1000)
    token = issue_token(host_key, args.stream, args.node, expires_ms)
    print(base64.urlsafe_b64encode(token).decode().rstrip("="))
    return 0


# -- demo -----------------------------------------------------------------------------------


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    command = _command(
        sub,
        "demo",
        run_demo,
        "see a whole room work on this machine",
        "Start a tracker, an origin playing a bundled sample and N listeners on this "
        "machine, show the tree and the origin's egress live, and end with a summary.",
    )
    command.add_argument(
        "--listeners", type=_count, default=12, metavar="N", help="listeners to start (default 12)"
    )
    command.add_argument(
        "--duration",
        type=_positive,
        default=20.0,
        metavar="S",
        help="seconds of the sample to play (default 20)",
    )


def run_demo(args: argparse.Namespace) -> int:
    from meshd.demo import run_demo as demo

    return demo(args.listeners, args.duration, random.Random())


# -- sim ------------------------------------------------------------------------------------


SIM_EPILOG = """\
Levels:
  chunk  every listener runs the real node core (meshd/node/core.py), the origin the
         real origin core, chunk by chunk, over a modelled network; the tracker is the
         real one and answers at once. Exact; fits up to a few thousand listeners.
  flow   the real tracker (meshd/tracker), behind a server serving --tracker-rate
         requests/s; listeners follow the node core's rules link by link, and play while
         their path to the origin is intact (a gap shorter than the ring buffer loses
         nothing). A model, for hundreds of thousands of listeners.
  auto   chunk up to {limit:,} listeners, flow above.

The audience is drawn from the seed: one-way delays (lognormal, median 20 ms), loss
(median 0.3 %), uploads (lognormal, median 1 Mbps); 42 % accept connections, so about
40 % relay, to at most 4 children; sessions are heavy-tailed (median 20 min).

Scenarios:
{scenarios}

Examples:
  meshd sim melt --listeners 200                 # chunk level, a few seconds
  meshd sim launch --listeners 500000 --plot out # the seed's night, flow level
"""


def _add_sim(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from meshd.sim.run import CHUNK_LIMIT
    from meshd.sim.scenarios import SCENARIOS

    command = _command(
        sub,
        "sim",
        run_sim,
        "simulate a room of any size on a virtual clock",
        "Play a named scenario on a simulated room driven by the real decision code, on a "
        "virtual clock, and print its figures: origin egress against a central "
        "server's, depth, join time, stalls and chunks lost, recovery after a shock, the "
        "tracker's peak load, and the sim's own cost. The same seed gives the same run.",
    )
    command.formatter_class = argparse.RawDescriptionHelpFormatter
    scenarios = "\n".join(
        textwrap.fill(
            f"{name:<9} {scenario.story} Default run: {scenario.duration:.0f} s.",
            width=86,
            initial_indent="  ",
            subsequent_indent=" " * 12,
        )
        for name, scenario in SCENARIOS.items()
    )
    command.epilog = SIM_EPILOG.format(limit=CHUNK_LIMIT, scenarios=scenarios)
    command.add_argument("scenario", choices=list(SCENARIOS), help="what happens to the room")
    command.add_argument(
        "--listeners",
        type=_positive_int,
        metavar="N",
        help="listeners taking part (default: 200 at the chunk level, 100,000 otherwise)",
    )
    command.add_argument(
        "--seed", type=int, default=1, metavar="S", help="draws the audience and its fate"
    )
    command.add_argument(
        "--duration",
        type=_positive,
        metavar="S",
        help="virtual seconds to run (default: the scenario's)",
    )
    command.add_argument(
        "--level",
        choices=["auto", "chunk", "flow"],
        default="auto",
        help="how finely to simulate (see Levels below; default auto)",
    )
    command.add_argument(
        "--origin-capacity",
        type=_positive_int,
        default=4,
        metavar="N",
        help="children the origin feeds (default 4)",
    )
    command.add_argument(
        "--tracker-rate",
        type=float,
        default=4000.0,
        metavar="R",
        help="requests/s the flow level's tracker serves, 0 for no limit (default 4000)",
    )
    command.add_argument(
        "--refresh",
        type=int,
        default=180,
        metavar="S",
        help="seconds between a node's soft-state refreshes (default 180)",
    )
    command.add_argument("--plot", type=Path, metavar="DIR", help="write a PNG of the run here")
    command.add_argument("--json", type=Path, metavar="FILE", help="write the figures as JSON")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def run_sim(args: argparse.Namespace) -> int:
    from meshd.sim.plot import PlotUnavailable, write_png
    from meshd.sim.report import figures, table
    from meshd.sim.run import RunSpec, run

    if args.tracker_rate < 0:
        raise UsageError("--tracker-rate must be 0 (no limit) or more")
    if not args.verbose:
        logging.getLogger("meshd").setLevel(logging.ERROR)  # thousands of nodes speak
    spec = RunSpec(
        args.scenario,
        level=args.level,
        listeners=args.listeners,
        seed=args.seed,
        duration=args.duration,
        origin_capacity=args.origin_capacity,
        tracker_rate=args.tracker_rate or None,
        refresh_s=args.refresh,
    )
    try:
        results = run(spec)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(table(results), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(figures(results), indent=1) + "\n")
    if args.plot is not None:
        try:
            print(f"plot: {write_png(results, args.plot)}")
        except PlotUnavailable as exc:
            raise UsageError(str(exc)) from None
    return 0


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s.%(msecs)03d meshd: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("quic").setLevel(logging.DEBUG if verbose else logging.WARNING)
