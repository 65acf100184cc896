"""The `meshd` command: keygen, tracker, origin, listen, status, token, demo, sim,
conformance."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import socket
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeAlias

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd import __version__
from meshd.addresses import format_address, parse_address
from meshd.conformance.command import register as register_conformance
from meshd.errors import EXIT_FAILED, NodeError, UsageError
from meshd.keys import KeyFileError, load_key, write_new_key
from meshd.logs import LOG_FORMATS, configure_logging, log_as
from meshd.node.config import NodeConfig
from meshd.node.origin import Origin, OriginSettings
from meshd.node.output import AudioSink, check_output_path
from meshd.node.relay import Relay, RelaySettings
from meshd.node.stats import ChunkTrace, NodeStats
from meshd.quic import open_quic_endpoint
from meshd.tracker.front import collect_garbage_less_often
from meshd.tracker.server import serve_tracker
from meshd.tracker.service import Tracker, TrackerConfig
from meshd.tracker_client import WARN_AFTER, TrackerRefused, ask_tracker
from meshd.view import format_status, status_dict
from protocol import (
    ProtocolError,
    RemoteProtocolError,
    StatusReport,
    StatusRequest,
    Token,
    TreeReport,
    TreeRequest,
    check_token,
    decode_message,
    issue_token,
    key_from_text,
    key_id,
    key_to_text,
    short_id,
    token_from_text,
    token_to_text,
)
from protocol.identity import public_key_from_id
from protocol.limits import MAX_TREE_NODES

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

logger = logging.getLogger("meshd")
MAX_WORKERS = 256

EPILOG = """\
A whole room on one machine (each in its own terminal):
  meshd keygen --out origin.key            # prints the stream id, STREAM_ID
  meshd tracker --listen 127.0.0.1:4433
  meshd origin --tracker 127.0.0.1:4433 --key origin.key --input talk.opus
  meshd listen --tracker 127.0.0.1:4433 --stream STREAM_ID --output - | ffplay -nodisp -
  meshd status --tracker 127.0.0.1:4433 --stream STREAM_ID
Or just: meshd demo

Exit status: 0 done; 1 it ran but achieved nothing (no tracker, refused, no audio);
2 a bad command line (an option, a file, an address); 3 `listen` missed audio;
130 stopped at once (a second Ctrl-C).
"""
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> NoReturn:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    configure_logging(level, args.log_format, sys.stderr)
    try:
        code = args.run(args)
    except BaseException as exc:  # sorted by _outcome: a bug is raised again
        status, message = _outcome(exc)
        if status is None:
            raise
        parser.exit(status, f"meshd: error: {message}\n" if message else None)
    sys.exit(code)


FATAL = (NodeError, KeyFileError, TrackerRefused, OSError, trio.TooSlowError)


def _outcome(exc: BaseException) -> tuple[int | None, str]:
    """(exit status, message) for what ended a command; (None, "") for a bug.

    Errors from inside trio nurseries come wrapped in exception groups: the first
    fatal one speaks for the group."""
    if isinstance(exc, BaseExceptionGroup):
        outcomes = [_outcome(inner) for inner in exc.exceptions]
        if any(status is None for status, _ in outcomes):
            return None, ""
        return outcomes[0]
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, ""
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else EXIT_FAILED, ""
    if isinstance(exc, NodeError):
        return exc.exit_status, str(exc)
    if isinstance(exc, FATAL):
        return EXIT_FAILED, str(exc) or type(exc).__name__
    return None, ""


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _add_common_options(common, argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="meshd",
        description="Live audio to huge audiences: every listener relays the stream to a "
        "few others over QUIC, so the origin only feeds its few direct children.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"meshd {__version__}")
    _add_common_options(parser, None)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in (_add_keygen, _add_tracker, _add_origin, _add_listen, _add_status, _add_token):
        add(sub, common)
    _add_demo(sub, common)
    _add_sim(sub, common)
    register_conformance(sub, _address, _key_id)
    return parser


def _add_common_options(parser: argparse.ArgumentParser, default: object) -> None:
    """Logging options, accepted before or after the command (`meshd -q listen ...` or
    `meshd listen -q ...`): the subcommands' copies only override when given."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default if default is not None else False,
        help="log debug detail",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default if default is not None else False,
        help="log warnings only",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=default if default is not None else "text",
        help="log lines for people (text, the default) or one JSON object per line (json)",
    )


Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _command(
    sub: Subparsers,
    common: argparse.ArgumentParser,
    name: str,
    run: Callable[[argparse.Namespace], int],
    summary: str,
    description: str,
) -> argparse.ArgumentParser:
    command = sub.add_parser(name, help=summary, description=description, parents=[common])
    command.set_defaults(run=run)
    return command


def _reachable(text: str) -> tuple[str, int]:
    """HOST:PORT whose host resolves here (a typo'd name fails now, clearly)."""
    host, port = _address(text)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise argparse.ArgumentTypeError(
            f"cannot resolve the host {host!r} ({exc.strerror or exc})"
        ) from None
    return host, port


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _advertised(text: str) -> str:
    _address(text)
    return text


def _key_id(text: str) -> bytes:
    try:
        return key_from_text(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    if not text.isdigit() or int(text) > 1024:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 0 to 1024")
    return int(text)


def _children(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1024:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number from 1 to 1024 (the origin must feed someone)"
        )
    return int(text)


def _workers(text: str) -> int:
    if not text.isdigit() or int(text) > MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of workers from 0 to {MAX_WORKERS}"
            f" (hint: one per core, {os.cpu_count()} here; 0 serves in one process)"
        )
    return int(text)


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate per second (0: no limit)")
    return value


def _burst(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _limit(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (0 or more)")
    return int(text)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _add_metrics_option(command: argparse.ArgumentParser, what: str) -> None:
    command.add_argument(
        "--metrics",
        type=_reachable,
        metavar="HOST:PORT",
        help=f"serve {what} for Prometheus at http://HOST:PORT/metrics (port 0: any free "
        "one; the address is logged)",
    )


# -- keygen ---------------------------------------------------------------------------------


def _add_keygen(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    command = _command(
        sub,
        common,
        "keygen",
        run_keygen,
        "create an Ed25519 key file",
        "Write a new Ed25519 key (mode 0600) and print its id. An origin's id is the "
        "STREAM_ID listeners pass to `meshd listen --stream`; a host's is the HOST_ID a "
        "tracker trusts with `--host-id`; a listener's is the NODE_ID a host issues its "
        "admission token for.",
    )
    command.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE",
        help="where to write the key (never replaces a file unless --force)",
    )
    command.add_argument("--force", action="store_true", help="replace an existing file")


def run_keygen(args: argparse.Namespace) -> int:
    key = write_new_key(args.out, overwrite=args.force)
    print(key_to_text(key_id(key)))
    return 0


# -- tracker --------------------------------------------------------------------------------


def _add_tracker(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    command = _command(
        sub,
        common,
        "tracker",
        run_tracker,
        "run a tracker",
        "Assign each joining listener a parent and backups, and repair the tree when "
        "listeners leave or die. Prints `listening on HOST:PORT` once ready; stops "
        "cleanly on Ctrl-C (SIGINT) or SIGTERM.",
    )
    command.add_argument(
        "--listen",
        type=_reachable,
        default=("127.0.0.1", 4433),
        metavar="HOST:PORT",
        help="UDP address to serve on (default 127.0.0.1:4433; port 0 picks one)",
    )
    command.add_argument(
        "--key",
        type=Path,
        metavar="FILE",
        help="the tracker's key file (default: a new key each run); nodes may pin its id "
        "with --tracker-id",
    )
    _add_host_id_option(
        command,
        "require admission tokens signed by this host (the id `meshd keygen` printed for "
        "the host's key; repeatable); without any, the tracker is open to everyone",
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
        metavar="S",
        help="forget a node not heard from for this long (default: 600, or 3 x --refresh "
        "if that is longer)",
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
        type=_rate,
        default=20.0,
        metavar="RATE",
        help="JOINs per second from one source network (IPv4 /24, IPv6 /48), all workers "
        "together, after a burst of --join-burst; beyond, clients are told to retry later, "
        "so one machine cannot flood the tree with fresh identities (default 20; 0: no "
        "limit)",
    )
    command.add_argument(
        "--join-burst",
        type=_burst,
        default=100,
        metavar="N",
        help="JOINs one source network may send at once before --joins-per-network "
        "applies, e.g. a household or an office starting together (default 100)",
    )
    command.add_argument(
        "--handshakes-per-network",
        type=_rate,
        default=50.0,
        metavar="RATE",
        help="QUIC handshakes per second one source network may start (all workers "
        "together), after a burst of 200; beyond, its connection attempts are dropped "
        "before any crypto, so one machine cannot keep the tracker busy with handshakes "
        "(default 50; 0: no limit)",
    )
    command.add_argument(
        "--max-capacity",
        type=_count,
        default=16,
        metavar="N",
        help="children the tracker gives one node at most, whatever it declares (up to "
        "1,024 on the wire); the origin gets what it declares (default 16)",
    )
    command.add_argument(
        "--initial-capacity",
        type=_count,
        default=4,
        metavar="N",
        help="children a relay starts with: it may then hold twice as many as have "
        "confirmed it delivers (up to what it declared), and falls back to this when a "
        "child reports it, so fresh identities cannot take the top of the tree "
        "(default 4, what a listener declares by default; 0: trust declared capacity)",
    )
    command.add_argument(
        "--identities-per-network",
        type=_limit,
        default=64,
        metavar="N",
        help="nodes one source network (IPv4 /24, IPv6 /48) may have in one stream at "
        "once; more are told to retry later. Enough for a household or an office behind "
        "one address (default 64; 0: no limit)",
    )
    command.add_argument(
        "--capacity-per-network",
        type=_limit,
        default=256,
        metavar="N",
        help="declared capacity (each node's within --max-capacity) one source network "
        "may hold in one stream; a node beyond it is placed as a leaf (default 256; 0: "
        "no limit)",
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
    _add_metrics_option(command, "the audience, joins, failures and tree depth")


def run_tracker(args: argparse.Namespace) -> int:
    key = load_key(args.key) if args.key else Ed25519PrivateKey.generate()
    config = TrackerConfig(
        refresh_s=args.refresh,
        peer_ttl=args.peer_ttl or 0.0,
        host_keys=tuple(public_key_from_id(k) for k in args.host_id),
        max_pending=args.max_pending,
        joins_per_network_s=args.joins_per_network,
        join_burst_per_network=args.join_burst,
        handshakes_per_network_s=args.handshakes_per_network,
        max_capacity=args.max_capacity,
        initial_capacity=args.initial_capacity,
        identities_per_network=args.identities_per_network,
        capacity_per_network=args.capacity_per_network,
    )
    if config.peer_ttl < 2 * config.refresh_s:
        logger.warning(
            "--peer-ttl %g s is under twice --refresh (%d s): a node that misses one "
            "REFRESH will be forgotten while it still streams",
            config.peer_ttl,
            config.refresh_s,
        )
    tracker = Tracker(config)
    collect_garbage_less_often()

    async def serve() -> None:
        log_as("tracker", short_id(key_id(key)))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, nursery.cancel_scope)
            address = await nursery.start(serve_tracker, tracker, key, *args.listen, args.workers)
            if args.metrics:
                await _serve_tracker_metrics(nursery, tracker, args.metrics)
            mode = "tokens required" if args.host_id else "open to everyone"
            print(f"listening on {format_address(address)}", flush=True)
            logger.info("tracker %s ready (%s)", key_to_text(key_id(key)), mode)

    trio.run(serve)
    return 0


# meshd.metrics is imported only when --metrics asks for it: prometheus_client adds a
# tenth to every start-up, which a room of processes starting at once feels.


async def _serve_tracker_metrics(
    nursery: trio.Nursery, tracker: Tracker, address: tuple[str, int]
) -> None:
    from meshd.metrics import tracker_metrics

    await _serve_metrics(nursery, tracker_metrics(tracker), address)


async def _serve_node_metrics(
    nursery: trio.Nursery,
    stats: NodeStats,
    address: tuple[str, int],
    relay: Relay | None = None,
) -> None:
    from meshd.metrics import NodeCollector, node_metrics

    collector = (
        NodeCollector(stats)
        if relay is None
        else NodeCollector(stats, relay.parent_rtt, relay.refresh_stats)
    )
    await _serve_metrics(nursery, node_metrics(collector), address)


async def _serve_metrics(
    nursery: trio.Nursery, registry: CollectorRegistry, address: tuple[str, int]
) -> None:
    from meshd.metrics import serve_metrics

    bound = await nursery.start(serve_metrics, registry, *address)
    logger.info("metrics on http://%s/metrics", format_address(bound))


async def _cancel_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            logger.info("%s: shutting down", signal.Signals(signum).name)
            scope.cancel()
            return


# -- origin ---------------------------------------------------------------------------------


def _add_host_id_option(command: argparse.ArgumentParser, help_text: str) -> None:
    command.add_argument(
        "--host-id",
        type=_key_id,
        action="append",
        default=[],
        metavar="HOST_ID",
        help=help_text,
    )


def _add_node_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--tracker",
        type=_reachable,
        required=True,
        metavar="HOST:PORT",
        help="the tracker's address",
    )
    _add_host_id_option(
        command,
        "feed only children that present an admission token signed by this host (the "
        "HOST_ID the tracker was started with; repeatable), so nobody the host did not "
        "admit can pull the stream from this node; without any, it feeds any child",
    )
    command.add_argument(
        "--tracker-id",
        type=_key_id,
        metavar="ID",
        help="refuse a tracker whose key is not this id (`meshd keygen` printed it for "
        "the tracker's --key)",
    )
    command.add_argument(
        "--listen",
        type=_reachable,
        default=("127.0.0.1", 0),
        metavar="HOST:PORT",
        help="UDP address children connect to (default 127.0.0.1, any port)",
    )
    command.add_argument(
        "--advertise",
        type=_advertised,
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
    _add_metrics_option(command, "bytes in and out, chunks played and lost, failovers, stall")


def _check_node_files(args: argparse.Namespace) -> None:
    """Fail now, not at the end of the stream, if a stats or trace file cannot be written."""
    for option, path in (("--stats-file", args.stats_file), ("--trace", args.trace)):
        if path is not None:
            check_output_path(str(path), option)


def _add_origin(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    command = _command(
        sub,
        common,
        "origin",
        run_origin,
        "stream an Ogg Opus input",
        "Read Ogg Opus from a file or stdin (e.g. `ffmpeg -re -i talk.mp3 -c:a libopus "
        "-b:a 32k -page_duration 20000 -f ogg - | meshd origin ... --input -`), register "
        "the stream at the tracker, then pace it in real time, sign it, and feed at most "
        "--capacity children. Ends the stream at the end of input (or on Ctrl-C) and exits "
        "once its children have it. Exits 1 without streaming if the tracker does not "
        "accept the stream within --register-timeout.",
    )
    command.add_argument(
        "--key",
        type=Path,
        required=True,
        metavar="FILE",
        help="the stream's key file (from `meshd keygen`; its id is the stream id)",
    )
    command.add_argument(
        "--input", required=True, metavar="PATH|-", help="Ogg Opus file, or - for stdin"
    )
    command.add_argument(
        "--capacity",
        type=_children,
        default=4,
        metavar="N",
        help="children the origin feeds itself, 1 to 1024 (default 4)",
    )
    command.add_argument(
        "--register-timeout",
        type=_positive,
        default=10.0,
        metavar="S",
        help="give up if the tracker has not accepted the stream after this long (default 10)",
    )
    _add_node_options(command)


def run_origin(args: argparse.Namespace) -> int:
    key = load_key(args.key)
    _check_node_files(args)
    settings = OriginSettings(
        tracker=args.tracker,
        input=args.input,
        capacity=args.capacity,
        listen=args.listen,
        advertise=args.advertise,
        tracker_key=args.tracker_id,
        register_timeout=args.register_timeout,
    )
    config = NodeConfig(stats_interval=args.stats_interval, host_keys=tuple(args.host_id))
    trace = ChunkTrace(args.trace) if args.trace else None
    origin = Origin(key, settings, config, stats_file=args.stats_file, trace=trace)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_on_signal, origin.stop)
            if args.metrics:
                await _serve_node_metrics(nursery, origin.stats, args.metrics)
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
    sys.exit(EXIT_INTERRUPTED)


# -- listen ---------------------------------------------------------------------------------


def _add_listen(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    command = _command(
        sub,
        common,
        "listen",
        run_listen,
        "play a stream and relay it",
        "Join a stream (at its live edge; from its first packet if it has not started "
        "yet), write it as Ogg Opus to a file or stdout (`--output - | ffplay -nodisp -`), "
        "and relay it to up to --max-children other listeners. Ctrl-C (SIGINT) or SIGTERM "
        "leaves gracefully: children are moved to other parents first. Exit status: 0 "
        "after playing the whole stream (or a graceful leave); 3 if the stream ended but "
        "audio was missed (cut off from it for --join-timeout, or chunks lost); 1 if it "
        "never got going.",
    )
    command.add_argument(
        "--stream",
        type=_key_id,
        required=True,
        metavar="STREAM_ID",
        help="the stream id (the origin's key id, as `meshd keygen` printed it)",
    )
    command.add_argument(
        "--output",
        required=True,
        metavar="PATH|-",
        help="where to write the audio (Ogg Opus; created once audio arrives); - for stdout",
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
        "--key",
        type=Path,
        metavar="FILE",
        help="this node's key file (default: a new key each run; needed with --token)",
    )
    command.add_argument(
        "--token",
        metavar="TOKEN",
        help="admission token from the host, if the tracker requires one (the text "
        "`meshd token` printed for this stream and this --key's NODE_ID)",
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
    if args.token and not args.key:
        raise UsageError("--token needs --key: a token admits the one node key it was issued for")
    key = load_key(args.key) if args.key else Ed25519PrivateKey.generate()
    token = None
    if args.token:
        token = _check_token(args.token, args.stream, key_id(key), args.host_id)
        if not args.host_id and args.max_children > 0:
            logger.warning(
                "this listener holds an admission token but was given no --host-id: it "
                "relays to any child that reaches it, admitted or not; pass the host's id "
                "(--host-id HOST_ID, as the tracker has it) so it checks its children's tokens"
            )
    output = AudioSink(args.output)
    _check_node_files(args)
    config = NodeConfig(
        buffer_seconds=args.buffer / 1000,
        silence_timeout=args.silence_timeout / 1000,
        stall_timeout=args.stall_timeout / 1000,
        first_chunk_timeout=min(NodeConfig.first_chunk_timeout, args.stall_timeout / 1000),
        heartbeat_interval=min(0.2, args.silence_timeout / 3000),
        stats_interval=args.stats_interval,
        host_keys=tuple(args.host_id),
    )
    settings = RelaySettings(
        tracker=args.tracker,
        stream=args.stream,
        capacity=args.max_children,
        listen=args.listen,
        advertise=args.advertise,
        token=token,
        tracker_key=args.tracker_id,
        join_timeout=args.join_timeout,
    )
    trace = ChunkTrace(args.trace) if args.trace else None
    relay = Relay(key, settings, output, config, stats_file=args.stats_file, trace=trace)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_on_signal, relay.leave)
            if args.metrics:
                await _serve_node_metrics(nursery, relay.stats, args.metrics, relay)
            await relay.run()
            nursery.cancel_scope.cancel()

    trio.run(run)
    return 0


def _check_token(text: str, stream: bytes, node: bytes, hosts: list[bytes]) -> bytes:
    """The token's bytes, if it is one this node can use for this stream (signed by one
    of `hosts`, when it was given any)."""
    hint = "copy it whole, as `meshd token` printed it"
    try:
        data = token_from_text(text)
        token = decode_message(data)
    except (ValueError, ProtocolError):
        raise UsageError(f"--token is not an admission token ({hint})") from None
    if not isinstance(token, Token):
        raise UsageError(f"--token is not an admission token ({hint})")
    if token.stream != stream:
        raise UsageError(f"--token was issued for stream {short_id(token.stream)}…, not this one")
    if token.node != node:
        raise UsageError(
            f"--token was issued for node {short_id(token.node)}…, not for this --key "
            f"({short_id(node)}…)"
        )
    if token.expires_ms <= time.time() * 1000:
        expired = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(token.expires_ms / 1000))
        raise UsageError(f"--token expired at {expired}; ask the host for a new one")
    host_keys = [public_key_from_id(host) for host in hosts]
    try:
        check_token(data, host_keys, stream=stream, node=node, now_ms=int(time.time() * 1000))
    except RemoteProtocolError:
        ids = ", ".join(f"{short_id(host)}…" for host in hosts)
        raise UsageError(
            f"--token is not signed by any host given with --host-id ({ids}): ask that host for a "
            "token, or check --host-id"
        ) from None
    return data


# -- status ---------------------------------------------------------------------------------


def _add_status(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    command = _command(
        sub,
        common,
        "status",
        run_status,
        "show a stream's tree",
        "Ask the tracker for a stream's tree: the origin, the relays and their children, "
        "each with its depth, children used of its capacity, address and uptime, as the "
        "tracker sees them; plus the audience, the origin's load and recent activity. A "
        "big audience is shown from the top, down to --limit nodes.",
    )
    command.add_argument(
        "--tracker",
        type=_reachable,
        required=True,
        metavar="HOST:PORT",
        help="the tracker's address",
    )
    command.add_argument(
        "--stream",
        type=_key_id,
        required=True,
        metavar="STREAM_ID",
        help="the stream id (the origin's key id)",
    )
    command.add_argument(
        "--limit",
        type=int,
        default=40,
        metavar="N",
        help=f"show at most this many nodes of the tree, from the top (default 40, "
        f"at most {MAX_TREE_NODES})",
    )
    command.add_argument(
        "--json", action="store_true", help="print the figures and the listed nodes as JSON"
    )


def run_status(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= MAX_TREE_NODES:
        raise UsageError(f"--limit must be from 1 to {MAX_TREE_NODES}")

    async def ask() -> tuple[object, object]:
        async with open_quic_endpoint(Ed25519PrivateKey.generate()) as endpoint:
            answers = []
            for request in (StatusRequest(args.stream), TreeRequest(args.stream, args.limit)):
                answers.append(
                    await ask_tracker(
                        endpoint,
                        args.tracker,
                        request,
                        give_up_after=10.0,
                        warn_after=WARN_AFTER,
                    )
                )
            return answers[0], answers[1]

    report, tree = trio.run(ask)
    assert isinstance(report, StatusReport) and isinstance(tree, TreeReport)
    if args.json:
        print(json.dumps(status_dict(report, tree)))
    else:
        print(format_status(report, tree, args.limit + 1))
    return 0


# -- token ----------------------------------------------------------------------------------


def _add_token(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    command = _command(
        sub,
        common,
        "token",
        run_token,
        "issue an admission token",
        "As the host: sign a token that lets one listener (NODE_ID, the id `meshd keygen` "
        "printed for its key) join one stream, on a tracker started with --host-id HOST_ID "
        "(the id of this --host-key). Prints it in base64 for `meshd listen --token`.",
    )
    command.add_argument(
        "--host-key",
        type=Path,
        required=True,
        metavar="FILE",
        help="the host's key file (from `meshd keygen`); the tracker trusts its id",
    )
    command.add_argument(
        "--stream",
        type=_key_id,
        required=True,
        metavar="STREAM_ID",
        help="the stream the listener may join",
    )
    command.add_argument(
        "--node",
        type=_key_id,
        required=True,
        metavar="NODE_ID",
        help="the listener's id (its key's id; it runs `meshd listen --key` with that key)",
    )
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
    print(token_to_text(token))
    return 0


# -- demo -----------------------------------------------------------------------------------


def _add_demo(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    command = _command(
        sub,
        common,
        "demo",
        run_demo,
        "see a whole room work on this machine",
        "Start a tracker, an origin playing a bundled sample and N listeners on this "
        "machine, show the tree and the origin's egress live, and end with a summary. "
        "The room's log lines go to a file (named on screen). Ctrl-C ends it early.",
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
    command.add_argument(
        "--log",
        type=Path,
        metavar="FILE",
        help="where the room's log lines go (default: a new file in the temporary folder)",
    )


def run_demo(args: argparse.Namespace) -> int:
    from meshd.demo import run_demo as demo

    if args.log is not None:
        check_output_path(str(args.log), "--log")
    return demo(args.listeners, args.duration, random.Random(), args.log, args.log_format)


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


def _add_sim(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    from meshd.sim.run import CHUNK_LIMIT
    from meshd.sim.scenarios import SCENARIOS

    command = _command(
        sub,
        common,
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
