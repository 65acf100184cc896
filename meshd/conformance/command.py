"""`meshd conformance`: the suite from the command line.

Only the parser is built when `meshd` starts; the suite itself is imported when the
command runs, so other commands do not pay for loading it.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from meshd.keys import load_key

if TYPE_CHECKING:
    from meshd.conformance.report import Report

REFERENCE_NODE = (
    "meshd listen --tracker {tracker} --tracker-id {tracker_id} --stream {stream} "
    "--output {output} -q"
)


DESCRIPTION = """\
Test another meshd/2 implementation (or this one) against docs/spec.md, over the
wire only: real QUIC connections to HOST:PORT, numbered cases tied to spec sections
(e.g. 4.2-zero-length), each MUST / SHOULD / INFO, each reported with what was sent,
what the spec expects and what came back. Verdicts: pass, fail, non-strict (acceptable
but not exactly the spec, or a missed SHOULD), informational (the spec leaves it
open), skipped (the target cannot be tested that way).

Targets:
  --tracker HOST:PORT [--tracker-id ID] [--host-key FILE] [--peer-ttl S]
          [--join-burst N] [--promote-after S]
      the implementation is a tracker; the suite plays origins and nodes, each case
      with a stream of its own. Give the host key whose id the tracker accepts tokens
      from (--host-key) to run the admission token cases, and the tracker's settings
      (--peer-ttl, --join-burst, --promote-after) for the cases that depend on them.
  --parent HOST:PORT --parent-id ID --stream ID [--host-key FILE]
      the implementation is an origin or a node serving children of a live stream;
      the suite plays children, one at a time (--concurrency N needs N free slots).
      A parent that feeds only admitted children needs the host key (--host-key):
      the suite then sends ADMIT with tokens of its own and runs the admission cases.
  --child --child-command CMD
      the implementation is a node (its child side); the suite plays the tracker and
      the node's parents, on 127.0.0.1. Each case runs CMD (split like a shell would,
      but run without one) with these placeholders filled in:
        {tracker}     the suite's tracker, HOST:PORT
        {tracker_id}  the tracker's key id
        {stream}      the stream id (a new stream per case)
        {output}      a file the node may write the audio to
      The node must JOIN the tracker for {stream} and keep the default timers (or
      pass --silence-timeout/--stall-timeout). The suite kills it (and its process
      group) at the end of each case. The reference node:
        --child-command "{reference}"

Exit status: 0 if every MUST case passed, 1 if one failed, 2 on a usage error.
docs/conformance.md lists every case.
""".replace("{reference}", REFERENCE_NODE)


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    address: Callable[[str], tuple[str, int]],
    key_id: Callable[[str], bytes],
) -> None:
    """Add the `conformance` command (meshd.cli passes its argument parsers)."""
    command = sub.add_parser(
        "conformance",
        help="test an implementation against the meshd/2 spec",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.set_defaults(run=run, conformance_parser=command)
    target = command.add_mutually_exclusive_group(required=True)
    target.add_argument("--tracker", type=address, metavar="HOST:PORT", help="test a tracker")
    target.add_argument(
        "--parent", type=address, metavar="HOST:PORT", help="test an origin or node as a parent"
    )
    target.add_argument(
        "--child", action="store_true", help="test a node as a child (needs --child-command)"
    )
    command.add_argument(
        "--child-command",
        metavar="CMD",
        help="the node to test with --child, a command with placeholders (see above)",
    )
    command.add_argument(
        "--silence-timeout",
        type=float,
        default=0.6,
        metavar="S",
        help="--child: the node's silence timeout, §6.2 (default 0.6)",
    )
    command.add_argument(
        "--stall-timeout",
        type=float,
        default=2.0,
        metavar="S",
        help="--child: the node's stall timeout, §6.2 (default 2)",
    )
    command.add_argument(
        "--tracker-id", type=key_id, metavar="ID", help="the tracker's key id (checked)"
    )
    command.add_argument(
        "--host-key",
        type=Path,
        metavar="FILE",
        help="host key file, to issue tokens (tracker and parent targets)",
    )
    command.add_argument(
        "--peer-ttl",
        type=float,
        metavar="S",
        help="the tracker's peer_ttl (§7.2), to run the soft-state expiry cases, which "
        "wait about that long (they are skipped without it; a short one keeps them quick)",
    )
    command.add_argument(
        "--join-burst",
        type=int,
        default=100,
        metavar="N",
        help="JOINs the tracker takes from one source network at once (§7.3): the "
        "RETRY_AFTER case sends N + 50 (default 100, the reference's)",
    )
    command.add_argument(
        "--promote-after",
        type=float,
        metavar="S",
        help="how long a relay must be in the tree before the tracker moves it up "
        "(§7.3, the reference's promote_after: 60): the relay rebalancing case waits "
        "that long (skipped without it)",
    )
    command.add_argument("--parent-id", type=key_id, metavar="ID", help="the parent's node id")
    command.add_argument("--stream", type=key_id, metavar="ID", help="the stream it serves")
    command.add_argument(
        "--case",
        action="append",
        default=[],
        metavar="PREFIX",
        help="run only cases whose id starts with PREFIX (repeatable), e.g. 4.2 or 6.1-accept",
    )
    command.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        metavar="S",
        help="how long to wait for an answer (default 3)",
    )
    command.add_argument(
        "--close-wait",
        type=float,
        default=1.0,
        metavar="S",
        help="how long after a GOODBYE to wait for the connection's close (default 1)",
    )
    command.add_argument(
        "--child-timeout",
        type=float,
        default=1.0,
        metavar="S",
        help="the parent's child timeout, §6.6 (default 1)",
    )
    command.add_argument(
        "--concurrency", type=int, metavar="N", help="cases at once (tracker 8, others 1)"
    )
    command.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    command.add_argument("--junit", type=Path, metavar="FILE", help="write a JUnit XML report")
    command.add_argument(
        "--all", action="store_true", help="show every case, not only those that did not pass"
    )


def run(args: argparse.Namespace) -> int:
    if args.parent is not None and (args.parent_id is None or args.stream is None):
        args.conformance_parser.error("--parent needs --parent-id and --stream")
    if args.child:
        args.child_command = _child_command(args)
    report = trio.run(_run, args)
    print(report.format(verbose=args.all))
    if args.json:
        report.write_json(args.json)
    if args.junit:
        report.write_junit(args.junit)
    return 0 if report.ok else 1


def _child_command(args: argparse.Namespace) -> list[str]:
    """--child-command as an argv template; a usage error unless it is one."""
    parser = args.conformance_parser
    if not args.child_command:
        parser.error(
            "--child needs --child-command CMD: the command that starts the node, with "
            "placeholders the suite fills in for each case, e.g.\n"
            f'  --child-command "{REFERENCE_NODE}"'
        )
    from meshd.conformance.stage import PLACEHOLDERS, node_command

    try:
        argv = shlex.split(args.child_command)
        node_command(argv, {name: name for name in PLACEHOLDERS})
    except (ValueError, KeyError, IndexError) as exc:
        known = ", ".join(f"{{{name}}}" for name in PLACEHOLDERS)
        parser.error(f"--child-command: {exc!r} (the placeholders are {known})")
    if not argv or shutil.which(argv[0]) is None:
        parser.error(f"--child-command: cannot run {argv[0] if argv else 'an empty command'}")
    return argv


async def _run(args: argparse.Namespace) -> Report:
    from meshd.conformance.runner import check_child, check_parent, check_tracker

    if args.child:
        return await check_child(
            args.child_command,
            only=args.case,
            reply_wait=args.timeout,
            close_wait=args.close_wait,
            silence_timeout=args.silence_timeout,
            stall_timeout=args.stall_timeout,
            concurrency=args.concurrency or 1,
        )

    host_key = load_key(args.host_key) if args.host_key else None
    if args.tracker is not None:
        return await check_tracker(
            args.tracker,
            tracker_id=args.tracker_id,
            host_key=host_key,
            peer_ttl=args.peer_ttl,
            join_burst=args.join_burst,
            promote_after=args.promote_after,
            only=args.case,
            reply_wait=args.timeout,
            close_wait=args.close_wait,
            concurrency=args.concurrency or 8,
        )
    return await check_parent(
        args.parent,
        parent_id=args.parent_id,
        stream=args.stream,
        only=args.case,
        reply_wait=args.timeout,
        close_wait=args.close_wait,
        child_timeout=args.child_timeout,
        concurrency=args.concurrency or 1,
        host_key=host_key,
    )
