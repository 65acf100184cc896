"""Cases for a node's child side (`meshd conformance --child --child-command CMD`).

The suite plays the tracker and the node's parents (see `stage`): each case starts the
node from CMD, lets it JOIN, points it at a parent of the suite's, misbehaves on
purpose there, and watches what the node does on the wire (and how it exits). Each case
runs its own node process, so they run one at a time by default.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.conformance.report import Level, Outcome, Verdict
from meshd.conformance.stage import (
    SAMPLES_PER_CHUNK,
    FakeParent,
    NodeLink,
    Scene,
    describe_request,
    heartbeat,
    open_scene,
    path,
)
from meshd.conformance.suite import CaseList, Mismatch, Reply, judge_error, read_until_closed
from meshd.conformance.wire import (
    Received,
    code_name,
    describe,
    describe_event,
    framed,
    packb,
)
from meshd.tracker_client import now_ms
from protocol import (
    ErrorCode,
    Goodbye,
    Join,
    ProtocolError,
    Rejoin,
    Repair,
    Subscribe,
    key_id,
    short_id,
    verify_message,
)
from protocol.identity import public_key_from_id
from protocol.limits import MAX_PATH

SKEW_MS = 300_000  # §5.2: the tracker refuses requests further from its clock
PLAYED = 5  # chunks 0…4 a parent sends once it accepted: the node's next seq is 5
MIN_DATAGRAM_FRAME_SIZE = 1200
_names = itertools.count()


@dataclass
class ChildTarget:
    """The implementation's node, started from `command` (an argv template)."""

    command: Sequence[str]
    workdir: Path
    timeout: float = 3.0
    """How long to wait for anything the node should do, beyond its own timers."""
    close_wait: float = 1.0
    start_timeout: float = 10.0
    """How long a node may take from its start to its JOIN."""
    silence_timeout: float = 0.6
    stall_timeout: float = 2.0
    repair_timeout: float = 0.5
    reorder_delay: float = 0.05

    @asynccontextmanager
    async def scene(self) -> AsyncIterator[Scene]:
        async with open_scene(self.command, self.workdir, f"node{next(_names)}") as scene:
            yield scene

    async def attached(
        self, scene: Scene, parent: FakeParent, backups: Sequence[FakeParent] = ()
    ) -> NodeLink:
        """Start the node under `parent` (with `backups`), accept it and send chunks
        0…4 on the stream, where they are played in order before anything sent after."""
        await scene.joined(parent, backups, within=self.start_timeout)
        link = await parent.subscribed(self.timeout)
        await link.accept()
        await link.chunks(range(PLAYED))
        return link

    async def failed_over(
        self, backup: FakeParent, after: float, sent: str, within: float | None = None
    ) -> Subscribe:
        """The node's SUBSCRIBE at `backup`, from a connection opened `after`."""
        try:
            link = await backup.subscribed(within or self.timeout, after=after)
        except Mismatch as exc:
            raise Mismatch(sent, "a SUBSCRIBE at the backup parent", exc.outcome.got) from None
        assert link.subscribe is not None
        return link.subscribe


CASES: CaseList[ChildTarget] = CaseList()
case = CASES.case


def _verdict(ok: bool) -> Verdict:
    return Verdict.PASS if ok else Verdict.FAIL


def _near_now(time_ms: int) -> bool:
    return abs(time_ms - now_ms()) <= SKEW_MS


def _signature(message: Join | Rejoin) -> str:
    """What is wrong with the signature of `message` ("" if `node` signed it, §4.3)."""
    key = public_key_from_id(message.node)
    for context, problem in (
        (b"", ""),
        (message.stream, "signed with the stream id as context (§4.3: empty for requests)"),
    ):
        with suppress(ProtocolError):
            verify_message(message, key, context)
            return problem
    return "the signature does not verify against `node`"


# -- the first request and the subscription (§5.2, §4.3, §6.1, §2) -------------------------


@case("5.2-join", "5.2", Level.MUST,
      "the node's first request is a JOIN for the stream, time_ms within 300 s of now")  # fmt: skip
async def _join(target: ChildTarget) -> Outcome:
    async with target.scene() as scene:
        parent = await scene.parent()
        request = await scene.joined(parent, within=target.start_timeout)
    join = request.message
    assert isinstance(join, Join)
    problems = []
    if join.stream != scene.stream:
        problems.append("another stream")
    if not _near_now(join.time_ms):
        problems.append(f"time_ms {join.time_ms - now_ms():+} ms from now")
    if (join.capacity == 0) != (join.address == ""):
        problems.append("address must be empty exactly when capacity is 0")
    return Outcome(
        _verdict(not problems),
        "the node started with --stream and the suite's tracker",
        "JOIN(stream, node, capacity, address, token, time_ms ≈ now, sig)",
        describe(join) + (f": {'; '.join(problems)}" if problems else ""),
    )


@case("4.3-join-signature", "4.3", Level.MUST,
      "JOIN is signed by the key named in `node`, with an empty context")  # fmt: skip
async def _join_signature(target: ChildTarget) -> Outcome:
    async with target.scene() as scene:
        parent = await scene.parent()
        request = await scene.joined(parent, within=target.start_timeout)
    assert isinstance(request.message, Join)
    problem = _signature(request.message)
    return Outcome(
        _verdict(not problem),
        "the node started",
        '"meshd/1" 00 || msgpack(JOIN without sig), signed by `node`',
        problem or "it verifies",
    )


@case("6.1-subscribe", "6.1", Level.MUST,
      "SUBSCRIBE(stream, from_seq nil or 0, node = its id) on the first stream (id 0)")  # fmt: skip
async def _subscribe(target: ChildTarget) -> Outcome:
    async with target.scene() as scene:
        parent = await scene.parent()
        await scene.joined(parent, within=target.start_timeout)
        link = await parent.subscribed(target.timeout)
    sub = link.subscribe
    assert sub is not None
    stream_id = link.link.stream.stream_id
    ok = sub.stream == scene.stream and sub.from_seq in (None, 0) and sub.node == scene.node_id
    return Outcome(
        _verdict(ok and stream_id == 0),
        f"ASSIGNED(parent {short_id(parent.node)})",
        "SUBSCRIBE(stream, nil or 0, the JOIN's node) on stream 0",
        f"{describe(sub)} on stream {stream_id}",
    )


@case("2-datagram-parameter", "2", Level.MUST,
      f"the node advertises max_datagram_frame_size ≥ {MIN_DATAGRAM_FRAME_SIZE}")  # fmt: skip
async def _datagram_parameter(target: ChildTarget) -> Outcome:
    async with target.scene() as scene:
        parent = await scene.parent()
        await scene.joined(parent, within=target.start_timeout)
        link = await parent.subscribed(target.timeout)
        size = link.link.conn.peer_max_datagram_frame_size
    return Outcome(
        _verdict(size is not None and size >= MIN_DATAGRAM_FRAME_SIZE),
        "a parent's QUIC handshake with the node",
        f"max_datagram_frame_size >= {MIN_DATAGRAM_FRAME_SIZE}",
        "not advertised" if size is None else f"max_datagram_frame_size = {size}",
    )


@case("3-wrong-peer", "3", Level.MUST,
      "a parent whose certificate key is not the id the tracker named is refused")  # fmt: skip
async def _wrong_peer(target: ChildTarget) -> Outcome:
    sent = "ASSIGNED naming parent X at an address whose certificate carries key Y ≠ X"
    expected = "the handshake aborted (no stream there), then SUBSCRIBE at the backup"
    async with target.scene() as scene:
        impostor = await scene.parent(impostor=True)
        backup = await scene.parent()
        await scene.joined(impostor, [backup], within=target.start_timeout)
        subscribe = await target.failed_over(backup, 0.0, sent)
        streams = len(impostor.links)
    got = f"{streams} stream(s) opened at the impostor; {describe(subscribe)} at the backup"
    return Outcome(_verdict(streams == 0), sent, expected, got)


# -- the child's state table (§6.2, §4, §10) ------------------------------------------------

Misbehave = Callable[[Scene, NodeLink], Awaitable[None]]


def _error_case(
    case_id: str,
    section: str,
    title: str,
    sent: str,
    codes: Collection[ErrorCode],
    misbehave: Misbehave,
    *,
    accept: bool = True,
    failover: bool = False,
) -> None:
    """The parent (accepted, chunks 0…4 sent, unless not `accept`) does `misbehave`; the
    node must answer GOODBYE(one of `codes`) and close with it, and, with `failover`,
    SUBSCRIBE at the backup."""

    async def run(target: ChildTarget) -> Outcome:
        async with target.scene() as scene:
            parent = await scene.parent()
            backups = [await scene.parent()] if failover else []
            if accept:
                link = await target.attached(scene, parent, backups)
            else:
                await scene.joined(parent, backups, within=target.start_timeout)
                link = await parent.subscribed(target.timeout)
            started = trio.current_time()
            await misbehave(scene, link)
            reply = await read_until_closed(link.link, target.timeout, target.close_wait)
            outcome = judge_error(reply, sent, codes)
            if not failover or outcome.verdict is not Verdict.PASS:
                return outcome
            subscribe = await target.failed_over(backups[0], started, sent)
        got = f"{outcome.got}; then {describe(subscribe)} at the backup"
        return Outcome(Verdict.PASS, sent, outcome.expected + ", and a backup tried", got)

    case(case_id, section, Level.MUST, title)(run)


def _sends(data: bytes | Callable[[Scene], bytes], *, eof: bool = False) -> Misbehave:
    async def misbehave(scene: Scene, link: NodeLink) -> None:
        await link.link.send(data(scene) if callable(data) else data, eof=eof)

    return misbehave


def _sends_datagram(data: Callable[[Scene], bytes]) -> Misbehave:
    async def misbehave(scene: Scene, link: NodeLink) -> None:
        link.send_datagram(data(scene))

    return misbehave


def _accepts_with_path(nodes: Callable[[Scene, FakeParent], list[bytes]]) -> Misbehave:
    async def misbehave(scene: Scene, link: NodeLink) -> None:
        await link.accept(nodes(scene, link.parent))

    return misbehave


def _others(count: int) -> list[bytes]:
    return [key_id(Ed25519PrivateKey.generate()) for _ in range(count)]


async def _forged_info(scene: Scene, link: NodeLink) -> None:
    await link.accept(forged=True)


_error_case(
    "6.2-stream-info-signature", "6.2",
    "STREAM_INFO whose signature does not verify is BAD_SIGNATURE; a backup is tried",
    "SUBSCRIBE answered with STREAM_INFO signed by another key",
    {ErrorCode.BAD_SIGNATURE}, _forged_info, accept=False, failover=True,
)  # fmt: skip
_error_case(
    "6.2-chunk-signature-stream", "6.2",
    "a CHUNK on the stream whose signature does not verify is BAD_SIGNATURE; failover",
    "chunks 0…4, then CHUNK 5 signed by another key, on the stream",
    {ErrorCode.BAD_SIGNATURE},
    _sends(lambda scene: framed(scene.media.chunk(PLAYED, forged=True))), failover=True,
)  # fmt: skip
_error_case(
    "6.2-chunk-signature-datagram", "6.2",
    "a CHUNK datagram whose signature does not verify is BAD_SIGNATURE; failover",
    "chunks 0…4, then CHUNK 5 signed by another key, as a datagram",
    {ErrorCode.BAD_SIGNATURE},
    _sends_datagram(lambda scene: scene.media.chunk(PLAYED, forged=True)), failover=True,
)  # fmt: skip
_error_case(
    "6.2-chunk-before-accept", "6.2",
    "a CHUNK before STREAM_INFO is UNEXPECTED_MESSAGE",
    "SUBSCRIBE answered with CHUNK 0 (no STREAM_INFO)",
    {ErrorCode.UNEXPECTED_MESSAGE},
    _sends(lambda scene: framed(scene.media.chunk(0))), accept=False,
)  # fmt: skip
_error_case(
    "6.2-subscribe-from-parent", "6.2",
    "a SUBSCRIBE from the parent is UNEXPECTED_MESSAGE",
    "SUBSCRIBE sent to the child on a streaming link",
    {ErrorCode.UNEXPECTED_MESSAGE},
    _sends(lambda scene: framed(packb([0x01, scene.stream, None, bytes(32)]))),
)  # fmt: skip
_error_case(
    "6.2-repair-from-parent", "6.2",
    "a REPAIR from the parent is UNEXPECTED_MESSAGE",
    "REPAIR([0]) sent to the child on a streaming link",
    {ErrorCode.UNEXPECTED_MESSAGE}, _sends(framed(packb([0x05, [0]]))),
)  # fmt: skip
_error_case(
    "6.2-stream-info-twice", "6.2",
    "a second STREAM_INFO on a streaming link is UNEXPECTED_MESSAGE",
    "STREAM_INFO again (validly signed) on a streaming link",
    {ErrorCode.UNEXPECTED_MESSAGE}, _sends(lambda scene: framed(scene.media.info())),
)  # fmt: skip
_error_case(
    "4.2-zero-length", "4.2", "a frame of length 0 from the parent is MALFORMED_MESSAGE",
    "00000000 on a streaming link", {ErrorCode.MALFORMED_MESSAGE}, _sends(bytes(4)),
)  # fmt: skip
_error_case(
    "4.2-over-length", "4.2",
    "a length prefix above 65,536 from the parent is MESSAGE_TOO_LARGE",
    "00010001 (no body follows) on a streaming link",
    {ErrorCode.MESSAGE_TOO_LARGE}, _sends((65_537).to_bytes(4, "big")),
)  # fmt: skip
_error_case(
    "4.2-truncated", "4.2",
    "a parent's stream that ends inside a frame is MALFORMED_MESSAGE",
    "0000000a 9304, then FIN",
    {ErrorCode.MALFORMED_MESSAGE}, _sends((10).to_bytes(4, "big") + b"\x93\x04", eof=True),
)  # fmt: skip
_error_case(
    "4.1-not-msgpack", "4.1", "bytes that are not MessagePack are MALFORMED_MESSAGE",
    "00000001 c1", {ErrorCode.MALFORMED_MESSAGE}, _sends(framed(b"\xc1")),
)  # fmt: skip
_error_case(
    "4.1-unknown-type", "4.1", "an unknown type code from the parent is UNKNOWN_MESSAGE",
    "91 7f ([0x7f])", {ErrorCode.UNKNOWN_MESSAGE}, _sends(framed(packb([0x7F]))),
)  # fmt: skip
_error_case(
    "4.1-arity", "4.1", "a HEARTBEAT with one field is MALFORMED_MESSAGE",
    "92 04 04 (HEARTBEAT without stalled_ms)",
    {ErrorCode.MALFORMED_MESSAGE}, _sends(framed(packb([0x04, 4]))),
)  # fmt: skip
_error_case(
    "10-datagram-not-chunk", "10",
    "a datagram from the parent that is not a CHUNK is UNEXPECTED_MESSAGE",
    "HEARTBEAT(4, 0) as a datagram on a streaming link",
    {ErrorCode.UNEXPECTED_MESSAGE}, _sends_datagram(lambda scene: packb([0x04, 4, 0])),
)  # fmt: skip


# -- PATH (§6.5) ----------------------------------------------------------------------------

_error_case(
    "6.5-path-contains-child", "6.5",
    "a PATH that contains the child is BAD_PATH, and the node fails over",
    "STREAM_INFO, then PATH([stream, the child, parent])",
    {ErrorCode.BAD_PATH},
    _accepts_with_path(lambda scene, parent: [scene.stream, scene.node_id, parent.node]),
    accept=False, failover=True,
)  # fmt: skip
_error_case(
    "6.5-path-update-contains-child", "6.5",
    "a later PATH that contains the child is BAD_PATH, and the node fails over",
    "chunks 0…4, then PATH([stream, the child, parent])",
    {ErrorCode.BAD_PATH},
    _sends(lambda scene: _path_through_child(scene)), failover=True,
)  # fmt: skip
_error_case(
    "6.5-path-start", "6.5", "a PATH that does not start with the stream id is BAD_PATH",
    "STREAM_INFO, then PATH([X, parent])", {ErrorCode.BAD_PATH},
    _accepts_with_path(lambda scene, parent: [*_others(1), parent.node]), accept=False,
)  # fmt: skip
_error_case(
    "6.5-path-end", "6.5", "a PATH that does not end with the parent's id is BAD_PATH",
    "STREAM_INFO, then PATH([stream, X])", {ErrorCode.BAD_PATH},
    _accepts_with_path(lambda scene, parent: [scene.stream, *_others(1)]), accept=False,
)  # fmt: skip
_error_case(
    "6.5-path-duplicate", "6.5", "a PATH that names a node twice is BAD_PATH",
    "STREAM_INFO, then PATH([stream, X, X, parent])", {ErrorCode.BAD_PATH},
    _accepts_with_path(lambda scene, parent: [scene.stream, *_others(1) * 2, parent.node]),
    accept=False,
)  # fmt: skip
_error_case(
    "6.5-path-too-deep", "6.5", f"a PATH of {MAX_PATH} ids is BAD_PATH",
    f"STREAM_INFO, then PATH([stream, {MAX_PATH - 2} others, parent])", {ErrorCode.BAD_PATH},
    _accepts_with_path(lambda scene, parent: [scene.stream, *_others(MAX_PATH - 2), parent.node]),
    accept=False,
)  # fmt: skip


def _path_through_child(scene: Scene) -> bytes:
    parent = scene.parents[0]
    return path([scene.stream, scene.node_id, parent.node])


@case("6.5-path-deepest", "6.5", Level.MUST,
      f"a PATH of {MAX_PATH - 1} ids is accepted (the child at depth {MAX_PATH - 1})")  # fmt: skip
async def _path_deepest(target: ChildTarget) -> Outcome:
    sent = f"STREAM_INFO, PATH([stream, {MAX_PATH - 3} others, parent]), then live chunks"
    async with target.scene() as scene:
        parent = await scene.parent()
        await scene.joined(parent, within=target.start_timeout)
        link = await parent.subscribed(target.timeout)
        await link.accept([scene.stream, *_others(MAX_PATH - 3), parent.node])
        await link.chunks(range(PLAYED), datagram=True)
        scene.background(lambda: link.live(PLAYED))
        reply = await read_until_closed(link.link, target.timeout, 0)
    ok = reply.goodbye is None and reply.closed is None
    got = "the link stayed up" if ok else reply.describe()
    return Outcome(_verdict(ok), sent, "the link stays up", got)


# -- repair (§6.4) ---------------------------------------------------------------------------


async def _next_repair(link: NodeLink, within: float) -> tuple[Repair | None, str]:
    """The node's next REPAIR within `within` s (None otherwise), and what else came."""
    seen: list[str] = []
    deadline = trio.current_time() + within
    while (event := await link.next_event(deadline - trio.current_time())) is not None:
        if isinstance(event, Received) and isinstance(event.message, Repair):
            return event.message, ", ".join(seen)
        seen.append(describe_event(event))
        if not isinstance(event, Received) or isinstance(event.message, Goodbye):
            break
    return None, ", ".join(seen) or "nothing"


async def _streaming(target: ChildTarget, scene: Scene, parent: FakeParent) -> NodeLink:
    await scene.joined(parent, within=target.start_timeout)
    link = await parent.subscribed(target.timeout)
    await link.accept()
    return link


async def _expect_repair_of_5(
    target: ChildTarget, sent: str, feed: Callable[[NodeLink], Awaitable[None]]
) -> Outcome:
    """Stream to the node, `feed` it what leaves seq 5 missing, and wait for its REPAIR."""
    within = target.reorder_delay + target.timeout
    async with target.scene() as scene:
        link = await _streaming(target, scene, await scene.parent())
        await feed(link)
        repair, other = await _next_repair(link, within)
    ok = repair is not None and PLAYED in repair.seqs
    got = describe(repair) if repair is not None else f"no REPAIR within {within:g} s: {other}"
    return Outcome(_verdict(ok), sent, "REPAIR naming 5", got)


@case("6.4-repair-gap", "6.4", Level.MUST,
      "a seq skipped in the datagrams is asked for with REPAIR")  # fmt: skip
async def _repair_gap(target: ChildTarget) -> Outcome:
    async def feed(link: NodeLink) -> None:
        await link.chunks([*range(5), *range(6, 10)], datagram=True)

    return await _expect_repair_of_5(target, "chunks 0…4 and 6…9 as datagrams (5 skipped)", feed)


@case("6.4-repair-heartbeat", "6.4", Level.MUST,
      "a chunk announced only by HEARTBEAT latest_seq is asked for with REPAIR")  # fmt: skip
async def _repair_heartbeat(target: ChildTarget) -> Outcome:
    async def feed(link: NodeLink) -> None:
        await link.chunks(range(PLAYED))
        await link.send(heartbeat(PLAYED))

    sent = "chunks 0…4 on the stream, then HEARTBEAT(latest_seq=5) (5 never sent)"
    return await _expect_repair_of_5(target, sent, feed)


@case("6.4-missing-asks-again", "6.4", Level.MUST,
      "after MISSING the node asks again (after about the repair timeout)")  # fmt: skip
async def _missing_again(target: ChildTarget) -> Outcome:
    sent = "chunks 0…4 and 6…9 as datagrams; REPAIR answered MISSING([5]); HEARTBEATs"
    within = target.repair_timeout + target.timeout
    async with target.scene() as scene:
        link = await _streaming(target, scene, await scene.parent())
        await link.chunks([*range(5), *range(6, 10)], datagram=True)
        scene.background(lambda: link.heartbeats(9))
        first, other = await _next_repair(link, target.reorder_delay + target.timeout)
        if first is None or PLAYED not in first.seqs:
            raise Mismatch(sent, "REPAIR naming 5", describe(first) if first else other)
        await link.send(framed(packb([0x06, [PLAYED]])))
        answered = trio.current_time()
        again, other = await _next_repair(link, within)
        waited = trio.current_time() - answered
    ok = again is not None and PLAYED in again.seqs
    got = f"{describe(again)} {waited * 1000:.0f} ms after MISSING" if again else other
    return Outcome(_verdict(ok), sent, "REPAIR naming 5 again", got)


@case("6.4-repair-only-announced", "6.4", Level.MUST,
      "after a move the node asks its new parent only for seqs that parent announced")  # fmt: skip
async def _only_announced(target: ChildTarget) -> Outcome:
    """The first parent announces 0…9 but never delivers 5 and leaves; the backup
    announces only up to 4 (HEARTBEAT latest_seq=4): a REPAIR for 5 there is BAD_REPAIR."""
    sent = "parent A: 0…4, 6…9, MISSING([5]), GOODBYE; backup B: HEARTBEAT(latest_seq=4)"
    watch = 2 * target.repair_timeout + target.reorder_delay + 0.2
    async with target.scene() as scene:
        first, backup = await scene.parent(), await scene.parent()
        await scene.joined(first, [backup], within=target.start_timeout)
        link = await first.subscribed(target.timeout)
        await link.accept()
        await link.chunks([*range(5), *range(6, 10)], datagram=True)
        repair, other = await _next_repair(link, target.reorder_delay + target.timeout)
        if repair is None:
            raise Mismatch(sent, "REPAIR naming 5 at A", other)
        await link.send(framed(packb([0x06, list(repair.seqs)])))
        await link.leave(ErrorCode.GOING_AWAY, target.close_wait)
        moved = await backup.subscribed(target.timeout)
        await moved.accept()
        scene.background(lambda: moved.heartbeats(PLAYED - 1))
        unasked, _ = await _next_repair(moved, watch)
    ok = unasked is None or max(unasked.seqs) < PLAYED
    got = f"{describe(unasked)} at B" if unasked else f"no REPAIR at B for {watch:g} s"
    return Outcome(_verdict(ok), sent, "no REPAIR at B for a seq above 4", got)


# -- failure detection and failover (§6.3) --------------------------------------------------


async def _left(
    target: ChildTarget, link: NodeLink, backup: FakeParent, since: float, sent: str, within: float
) -> tuple[Subscribe, str]:
    """The SUBSCRIBE at `backup` (within `within` s of `since`), and how the failed link
    ended."""
    try:
        subscribe = await target.failed_over(backup, since, sent, within)
    except Mismatch as exc:
        old = await read_until_closed(link.link, 0, 0)
        got = f"{exc.outcome.got}; on the old link: {old.describe()}"
        raise Mismatch(sent, f"a backup tried within {within:g} s", got) from None
    waited = trio.current_time() - since
    if waited > within:
        got = f"{describe(subscribe)} at the backup only after {waited:.1f} s"
        raise Mismatch(sent, f"a backup tried within {within:g} s", got)
    reply = await read_until_closed(link.link, target.close_wait, target.close_wait)
    return subscribe, f"{describe(subscribe)} at the backup after {waited:.2f} s; " + (
        f"on the old link: {reply.describe()}"
    )


def _failover_outcome(
    subscribe: Subscribe, got: str, sent: str, expected: str, code: ErrorCode | None
) -> Outcome:
    """PASS if the backup got SUBSCRIBE(from_seq=5) (and, with `code`, the old link a
    GOODBYE with that code)."""
    if subscribe.from_seq != PLAYED:
        return Outcome(Verdict.FAIL, sent, expected, got, "from_seq must be the next unplayed")
    if code is not None and f"GOODBYE({code.name}" not in got:
        return Outcome(Verdict.FAIL, sent, expected, got)
    return Outcome(Verdict.PASS, sent, expected, got)


@case("6.2-goodbye-failover", "6.2", Level.MUST,
      "GOODBYE from the parent: the node tries a backup at once, from its next seq")  # fmt: skip
async def _goodbye_failover(target: ChildTarget) -> Outcome:
    sent = "chunks 0…4, then GOODBYE(GOING_AWAY) and the close"
    async with target.scene() as scene:
        parent, backup = await scene.parent(), await scene.parent()
        link = await target.attached(scene, parent, [backup])
        since = trio.current_time()
        await link.leave(ErrorCode.GOING_AWAY, target.close_wait)
        subscribe, got = await _left(target, link, backup, since, sent, target.timeout)
    return _failover_outcome(subscribe, got, sent, "SUBSCRIBE(from_seq=5) at the backup", None)


@case("6.2-refused-tries-backup", "6.2", Level.MUST,
      "a SUBSCRIBE answered GOODBYE: the node tries a backup")  # fmt: skip
async def _refused(target: ChildTarget) -> Outcome:
    sent = "SUBSCRIBE answered GOODBYE(NOT_AVAILABLE)"
    async with target.scene() as scene:
        parent, backup = await scene.parent(), await scene.parent()
        await scene.joined(parent, [backup], within=target.start_timeout)
        link = await parent.subscribed(target.timeout)
        since = trio.current_time()
        await link.leave(ErrorCode.NOT_AVAILABLE, target.close_wait)
        subscribe = await target.failed_over(backup, since, sent)
    return Outcome(Verdict.PASS, sent, "SUBSCRIBE at the backup", f"{describe(subscribe)}")


@case("6.3-silence", "6.3", Level.MUST,
      "a parent silent for the silence timeout is left (PARENT_TIMEOUT) for a backup")  # fmt: skip
async def _silence(target: ChildTarget) -> Outcome:
    sent = "chunks 0…4, then nothing at all on the link (QUIC still acknowledges)"
    within = target.silence_timeout + target.timeout
    expected = f"GOODBYE(PARENT_TIMEOUT), SUBSCRIBE(from_seq=5) at the backup within {within:g} s"
    async with target.scene() as scene:
        parent, backup = await scene.parent(), await scene.parent()
        link = await target.attached(scene, parent, [backup])
        subscribe, got = await _left(target, link, backup, trio.current_time(), sent, within)
    return _failover_outcome(subscribe, got, sent, expected, ErrorCode.PARENT_TIMEOUT)


@case("6.3-stall", "6.3", Level.MUST,
      "HEARTBEATs but no new chunk for the stall timeout: PARENT_STALLED, a backup")  # fmt: skip
async def _stall(target: ChildTarget) -> Outcome:
    sent = "chunks 0…4, then only HEARTBEAT(latest_seq=4, stalled_ms=0) every 200 ms"
    within = target.stall_timeout + target.timeout
    expected = f"GOODBYE(PARENT_STALLED), SUBSCRIBE(from_seq=5) at the backup within {within:g} s"
    async with target.scene() as scene:
        parent, backup = await scene.parent(), await scene.parent()
        link = await target.attached(scene, parent, [backup])
        scene.background(lambda: link.heartbeats(PLAYED - 1))
        subscribe, got = await _left(target, link, backup, trio.current_time(), sent, within)
    return _failover_outcome(subscribe, got, sent, expected, ErrorCode.PARENT_STALLED)


def _kept(reply: Reply, backup: FakeParent, started: float, watch: float, sent: str) -> Outcome:
    """Pass if the link is still up `watch` s after `started` and the node did not go to
    its backup."""
    moved = backup.links[0] if backup.links else None
    ok = reply.goodbye is None and reply.closed is None and moved is None
    got = reply.describe() if not ok else f"still attached after {watch:g} s"
    if moved is not None:
        got += f"; a connection to the backup {moved.arrived_at - started:.1f} s in"
    return Outcome(_verdict(ok), sent, f"the link kept for {watch:g} s", got)


@case("6.3-parent-stalled-too", "6.3", Level.SHOULD,
      "a parent whose HEARTBEATs say it is stalled as long is kept past the timeout")  # fmt: skip
async def _stalled_too(target: ChildTarget) -> Outcome:
    sent = "chunks 0…4, then HEARTBEAT(latest_seq=4, stalled_ms ≥ 3000, growing) every 200 ms"
    watch = target.stall_timeout + 1.0
    async with target.scene() as scene:
        parent, backup = await scene.parent(), await scene.parent()
        link = await target.attached(scene, parent, [backup])
        scene.background(lambda: link.heartbeats(PLAYED - 1, stalled_ms=3000))
        started = trio.current_time()
        reply = await read_until_closed(link.link, watch, 0)
    return _kept(reply, backup, started, watch, sent)


@case("6.3-first-chunk", "6.3", Level.SHOULD,
      "a first parent that accepts but sends no chunk nor stalled_ms is left early")  # fmt: skip
async def _first_chunk(target: ChildTarget) -> Outcome:
    sent = "STREAM_INFO, PATH, no chunk; HEARTBEAT(latest_seq=nil, stalled_ms=0) every 200 ms"
    within = target.stall_timeout  # before the stall timeout: the first-chunk timeout
    expected = f"GOODBYE(PARENT_STALLED), SUBSCRIBE at the backup within {within:g} s"
    async with target.scene() as scene:
        parent, backup = await scene.parent(), await scene.parent()
        await scene.joined(parent, [backup], within=target.start_timeout)
        link = await parent.subscribed(target.timeout)
        await link.accept()
        scene.background(lambda: link.heartbeats(None))
        _, got = await _left(target, link, backup, trio.current_time(), sent, within)
    ok = f"GOODBYE({ErrorCode.PARENT_STALLED.name}" in got
    return Outcome(_verdict(ok), sent, expected, got)


@case("6.3-first-chunk-stalled", "6.3", Level.SHOULD,
      "a first parent that sends no chunk but says it is stalled is kept")  # fmt: skip
async def _first_chunk_stalled(target: ChildTarget) -> Outcome:
    sent = "STREAM_INFO, PATH, no chunk; HEARTBEAT(latest_seq=nil, stalled_ms ≥ 500, growing)"
    watch = target.stall_timeout - 0.5  # past the first-chunk timeout, short of the stall one
    async with target.scene() as scene:
        parent, backup = await scene.parent(), await scene.parent()
        await scene.joined(parent, [backup], within=target.start_timeout)
        link = await parent.subscribed(target.timeout)
        await link.accept()
        scene.background(lambda: link.heartbeats(None, stalled_ms=500))
        started = trio.current_time()
        reply = await read_until_closed(link.link, watch, 0)
    return _kept(reply, backup, started, watch, sent)


@case("6.3-start-lag", "6.3", Level.SHOULD,
      "a newcomer starts no further behind ASSIGNED's live_granule than the start lag")  # fmt: skip
async def _start_lag(target: ChildTarget) -> Outcome:
    live = 500  # ASSIGNED says the origin was at chunk 500's granule: 10 s after chunk 0's
    sent = (
        f"ASSIGNED(live_granule = chunk {live}'s); the parent: STREAM_INFO, PATH, chunks "
        f"0…{PLAYED - 1}, then HEARTBEAT(latest_seq={PLAYED - 1}, stalled_ms=0) every 200 ms"
    )
    expected = "GOODBYE(PARENT_STALLED), then SUBSCRIBE(from_seq=nil) at the backup"
    granule = (live + 1) * SAMPLES_PER_CHUNK
    async with target.scene() as scene:
        parent, backup = await scene.parent(), await scene.parent()
        await scene.joined(parent, [backup], within=target.start_timeout, live_granule=granule)
        link = await parent.subscribed(target.timeout)
        await link.accept()
        await link.chunks(range(PLAYED))
        scene.background(lambda: link.heartbeats(PLAYED - 1))
        subscribe, got = await _left(
            target, link, backup, trio.current_time(), sent, target.stall_timeout + target.timeout
        )
    ok = f"GOODBYE({ErrorCode.PARENT_STALLED.name}" in got and subscribe.from_seq is None
    return Outcome(_verdict(ok), sent, expected, got)


@case("6.3-backups-at-once", "6.3", Level.SHOULD,
      "every backup is tried at once; those not needed get GOODBYE(NO_ERROR)")  # fmt: skip
async def _backups_at_once(target: ChildTarget) -> Outcome:
    sent = "chunks 0…4, GOODBYE(GOING_AWAY); backups B1 and B2: B1 accepts, B2 never answers"
    expected = "SUBSCRIBE(from_seq=5) at B1 and B2, then GOODBYE(NO_ERROR) to B2"
    async with target.scene() as scene:
        parent, b1, b2 = await scene.parent(), await scene.parent(), await scene.parent()
        link = await target.attached(scene, parent, [b1, b2])
        since = trio.current_time()
        await link.leave(ErrorCode.GOING_AWAY, target.close_wait)
        first = await b1.subscribed(target.timeout, after=since)
        second = await b2.subscribed(target.timeout, after=since)
        await first.accept()
        reply = await read_until_closed(second.link, target.timeout, target.close_wait)
    subs = [first.subscribe, second.subscribe]
    got = f"{', '.join(describe(s) for s in subs if s)}; B2: {reply.describe()}"
    ok = all(s is not None and s.from_seq == PLAYED for s in subs)
    ok = ok and reply.goodbye is not None and reply.goodbye.code == ErrorCode.NO_ERROR
    return Outcome(_verdict(ok), sent, expected, got)


async def _next_rejoin(target: ChildTarget, scene: Scene, sent: str) -> Rejoin:
    """The node's next REJOIN (other requests, e.g. REFRESH, are passed over)."""
    deadline = trio.current_time() + target.timeout
    while True:
        request = await scene.request(deadline - trio.current_time(), sent)
        if isinstance(request.message, Rejoin):
            return request.message
        if isinstance(request.message, Join):
            raise Mismatch(sent, "REJOIN naming the failed parent", describe_request(request))


@case("6.3-rejoin", "6.3", Level.MUST,
      "after its parent failed the node sends REJOIN naming it as `dead`, signed")  # fmt: skip
async def _rejoin(target: ChildTarget) -> Outcome:
    sent = "chunks 0…4, then GOODBYE(GOING_AWAY) and the close (no backups)"
    async with target.scene() as scene:
        parent, other = await scene.parent(), await scene.parent()
        link = await target.attached(scene, parent)
        scene.tracker.assign(other.peer)
        await link.leave(ErrorCode.GOING_AWAY, target.close_wait)
        rejoin = await _next_rejoin(target, scene, sent)
    problems = [_signature(rejoin)]
    if rejoin.dead != parent.node:
        problems.append(f"dead is {short_id(rejoin.dead)}, not the parent")
    if rejoin.stream != scene.stream or rejoin.node != scene.node_id:
        problems.append("another stream or node")
    if not _near_now(rejoin.time_ms):
        problems.append("time_ms not within 300 s of now")
    problems = [p for p in problems if p]
    return Outcome(
        _verdict(not problems),
        sent,
        f"REJOIN(dead = {short_id(parent.node)}), signed, time_ms ≈ now",
        describe(rejoin) + (f": {'; '.join(problems)}" if problems else ""),
    )


@case("6.3-all-refuse", "6.3", Level.MUST,
      "refused NO_CAPACITY by its parent (no backups): REJOIN naming it dead")  # fmt: skip
async def _all_refuse(target: ChildTarget) -> Outcome:
    sent = "SUBSCRIBE answered GOODBYE(NO_CAPACITY), no backups"
    async with target.scene() as scene:
        parent, other = await scene.parent(), await scene.parent()
        await scene.joined(parent, within=target.start_timeout)
        link = await parent.subscribed(target.timeout)
        scene.tracker.assign(other.peer)
        await link.leave(ErrorCode.NO_CAPACITY, target.close_wait)
        rejoin = await _next_rejoin(target, scene, sent)
    return Outcome(
        _verdict(rejoin.dead == parent.node),
        sent,
        f"REJOIN(dead = {short_id(parent.node)})",
        describe(rejoin),
    )


# -- graceful leave and the end (§6.7, §6.8) ------------------------------------------------


@case("6.7-redirect", "6.7", Level.MUST,
      "REDIRECT: SUBSCRIBE at the new parent from the next seq, then GOODBYE here")  # fmt: skip
async def _redirect(target: ChildTarget) -> Outcome:
    sent = "chunks 0…4, REDIRECT(Q); Q accepts 0.5 s after the SUBSCRIBE"
    expected = "SUBSCRIBE(from_seq=5) at Q; GOODBYE(NO_ERROR) here only after Q accepted"
    async with target.scene() as scene:
        parent, new = await scene.parent(), await scene.parent()
        link = await target.attached(scene, parent)
        scene.background(lambda: link.heartbeats(PLAYED - 1))
        peer = new.peer
        await link.send(framed(packb([0x07, [peer.node, peer.address], []])))
        moved = await new.subscribed(target.timeout)
        early = await read_until_closed(link.link, 0.5, 0)
        if early.goodbye is not None or early.closed is not None:
            return Outcome(Verdict.FAIL, sent, expected, f"before Q accepted: {early.describe()}")
        await moved.accept()
        await moved.chunks([PLAYED])
        reply = await read_until_closed(link.link, target.timeout, target.close_wait)
    assert moved.subscribe is not None
    got = f"{describe(moved.subscribe)} at Q; here: {reply.describe()}"
    ok = moved.subscribe.from_seq == PLAYED and reply.goodbye is not None
    ok = ok and reply.goodbye is not None and reply.goodbye.code == ErrorCode.NO_ERROR
    return Outcome(_verdict(ok), sent, expected, got)


@case("6.8-end", "6.8", Level.MUST,
      "after playing the END chunk: GOODBYE(STREAM_ENDED), then exit status 0")  # fmt: skip
async def _end(target: ChildTarget) -> Outcome:
    sent = "chunks 0…4, chunk 5 with the END flag"
    expected = "GOODBYE(STREAM_ENDED), the close with it, and exit status 0"
    async with target.scene() as scene:
        link = await target.attached(scene, await scene.parent())
        await link.send(framed(scene.media.chunk(PLAYED, end=True)))
        reply = await read_until_closed(link.link, target.timeout, target.close_wait)
        assert scene.node is not None
        status = await scene.node.exit_status(target.timeout)
    outcome = judge_error(reply, sent, {ErrorCode.STREAM_ENDED})
    got = f"{reply.describe()}; " + ("still running" if status is None else f"exit status {status}")
    return Outcome(_verdict(outcome.verdict is Verdict.PASS and status == 0), sent, expected, got)


# -- the tracker's answers (§7.4, §6.3, §6.4) -----------------------------------------------


@case("7.4-retry-after", "7.4", Level.MUST,
      "RETRY_AFTER(d): the node asks again, not before d")  # fmt: skip
async def _retry_after(target: ChildTarget) -> Outcome:
    delay = 1.0
    sent = f"the first JOIN answered RETRY_AFTER({delay * 1000:.0f} ms)"
    async with target.scene() as scene:
        parent = await scene.parent()
        scene.tracker.answers.append(packb([0x1B, int(delay * 1000), "busy"]))
        first = await scene.joined(parent, within=target.start_timeout)
        again = await scene.request(delay * 1.5 + target.timeout, sent)
    waited = again.at - first.at
    return Outcome(
        _verdict(isinstance(again.message, Join) and waited >= delay),
        sent,
        f"JOIN again after d * uniform(1, 1.5) >= {delay:g} s",
        f"{describe_request(again)} after {waited:.2f} s",
    )


@case("7.4-unexpected-answer", "7.4", Level.MUST,
      "a wrong kind of answer: the node closes with UNEXPECTED_MESSAGE, asks again")  # fmt: skip
async def _unexpected_answer(target: ChildTarget) -> Outcome:
    sent = "the first JOIN answered ACK(180)"
    expected = "the connection closed with UNEXPECTED_MESSAGE, then JOIN again"
    async with target.scene() as scene:
        parent = await scene.parent()
        scene.tracker.answers.append(packb([0x1A, 180]))
        first = await scene.joined(parent, within=target.start_timeout)
        again = await scene.request(target.timeout, sent)
        conn = first.conn
        with trio.move_on_after(target.close_wait):
            await conn.wait_closed()
    closed = "still open" if not conn.is_closed else f"closed with {code_name(conn.close_code)}"
    if not conn.closed_by_peer and conn.is_closed:
        closed += " (by the suite)"
    got = f"the connection {closed}; then {describe_request(again)}"
    if not isinstance(again.message, Join):
        return Outcome(Verdict.FAIL, sent, expected, got)
    if conn.closed_by_peer and conn.close_code == ErrorCode.UNEXPECTED_MESSAGE:
        return Outcome(Verdict.PASS, sent, expected, got)
    note = "the answer was refused and the JOIN sent again, but not with §7.4's close code"
    return Outcome(Verdict.NON_STRICT, sent, expected, got, note)


@case("6.3-tracker-stream-ended", "6.3", Level.MUST,
      "JOIN answered STREAM_ENDED: the node stops at once with a status that says so")  # fmt: skip
async def _stream_ended(target: ChildTarget) -> Outcome:
    sent = "the first JOIN answered GOODBYE(STREAM_ENDED)"
    async with target.scene() as scene:
        parent = await scene.parent()
        scene.tracker.answers.append(packb([0x08, int(ErrorCode.STREAM_ENDED), "over"]))
        await scene.joined(parent, within=target.start_timeout)
        assert scene.node is not None
        status = await scene.node.exit_status(target.timeout)
    return Outcome(
        _verdict(status not in (None, 0)),
        sent,
        "the node exits with a non-zero status (audio was missed)",
        "still running" if status is None else f"exit status {status}",
    )


@case("6.4-start-from-zero", "6.4", Level.SHOULD,
      "told UNKNOWN_STREAM before it played anything, the node SUBSCRIBEs from_seq 0")  # fmt: skip
async def _start_from_zero(target: ChildTarget) -> Outcome:
    sent = "the first JOIN answered GOODBYE(UNKNOWN_STREAM), the next ASSIGNED"
    async with target.scene() as scene:
        parent = await scene.parent()
        scene.tracker.answers.append(packb([0x08, int(ErrorCode.UNKNOWN_STREAM), "not yet"]))
        await scene.joined(parent, within=target.start_timeout)
        link = await parent.subscribed(target.timeout + 2.0)  # its JOIN retry backs off
    assert link.subscribe is not None
    return Outcome(
        _verdict(link.subscribe.from_seq == 0),
        sent,
        "SUBSCRIBE(from_seq=0)",
        describe(link.subscribe),
    )
