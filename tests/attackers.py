"""Hostile peers that speak raw meshd/2, for tests/test_attacks.py and bench/bench_attacks.py.

One small async function per attack from the security trial (issue 11). Each runs until
cancelled (or until its work is done) and fills in a `Take`: what the attacker got out
of the room (identities accepted, children held, bytes pulled, connections held). The
room it attacks is made of real `meshd` processes; the attacker runs in the caller's
trio run, with its own QUIC endpoints (one per identity: a parent is pinned by its key).

Attackers bind to their own loopback address (`ATTACKER_HOST`, another /24 than the
honest listeners' 127.0.0.1), so per-network limits see them as one distinct network,
as they would on the internet.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import trio
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.addresses import parse_address
from meshd.conformance.wire import Closed, Link, Received, StreamEnded, open_link
from meshd.quic import QuicConn, QuicEndpoint, QuicStream, open_quic_endpoint
from meshd.quic.config import DEFAULT_ALPN
from protocol import (
    Ack,
    Assigned,
    Chunk,
    ErrorCode,
    Goodbye,
    Heartbeat,
    Join,
    Message,
    MessageReader,
    Missing,
    PathUpdate,
    Peer,
    ProtocolError,
    Refresh,
    Rejoin,
    Repair,
    RetryAfter,
    StatusReport,
    StatusRequest,
    StreamInfo,
    Subscribe,
    TreeReport,
    TreeRequest,
    frame,
    key_id,
    sign_message,
)

ATTACKER_HOST = "127.66.0.1"
"""Loopback, but another /24 than 127.0.0.1 (Linux routes all of 127/8 to lo)."""
TIMEOUT = 5.0
HEARTBEAT = 0.2  # what an honest parent uses


@dataclass
class Take:
    """What the attacker got; every field a count, JSON-ready."""

    identities_accepted: int = 0
    """JOINs (or REFRESHes) the tracker answered ASSIGNED/ACK."""
    identities_refused: int = 0
    """Answered RETRY_AFTER or GOODBYE."""
    identities_unanswered: int = 0
    retry_after: int = 0
    """Of the refused, those answered RETRY_AFTER."""
    children_served: int = 0
    """Honest children that subscribed to a hostile relay."""
    max_children: int = 0
    """The most honest children a hostile relay (all its identities) held at once."""
    child_seconds: float = 0.0
    """Honest children's time spent under hostile relays, summed."""
    bytes_pulled: int = 0
    """Audio bytes the attacker received (chunks, live and repaired)."""
    live_bytes: int = 0
    repair_bytes: int = 0
    missing_answers: int = 0
    """Sequence numbers a parent answered MISSING."""
    connections_opened: int = 0
    max_held: int = 0
    """The most attacker connections open at once."""
    held_now: int = 0
    closed_by_target: dict[str, int] = field(default_factory=dict)
    """Connections the target closed, by error code name."""
    relays_targeted: int = 0
    """Relays with two planted identities under them (a quorum, were they witnesses)."""
    relays_evicted: int = 0
    audience_before: int = 0
    audience_after: int = 0
    initials_sent: int = 0
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def closed(self, code: int | None) -> None:
        name = "timeout" if code is None else _code_name(code)
        self.closed_by_target[name] = self.closed_by_target.get(name, 0) + 1


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"code {code:#x}"


def now_ms() -> int:
    return int(time.time() * 1000)


# -- asking the tracker ----------------------------------------------------------------


async def ask(
    endpoint: QuicEndpoint,
    tracker: tuple[str, int],
    requests: list[Message],
    within: float = TIMEOUT,
) -> list[Message | None]:
    """Send `requests` on one connection; their answers in order (None: none `within` s).
    A refused connection or no answer at all gives all None; nothing is retried."""
    answers: list[Message | None] = []
    with trio.move_on_after(within):
        try:
            async with await endpoint.connect(tracker) as conn:
                stream = await conn.open_stream()
                await stream.send_all(b"".join(frame(r) for r in requests))
                reader = MessageReader()
                while len(answers) < len(requests):
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    reader.receive_data(data)
                    while (msg := reader.next_message()) is not None:
                        answers.append(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError, OSError):
            pass
    return answers + [None] * (len(requests) - len(answers))


async def status(
    tracker: tuple[str, int], stream: bytes, within: float = 3.0
) -> StatusReport | None:
    """The tracker's STATUS for `stream`, or None if it did not answer `within` s."""
    async with open_quic_endpoint(Ed25519PrivateKey.generate()) as endpoint:
        (answer,) = await ask(endpoint, tracker, [StatusRequest(stream)], within)
    return answer if isinstance(answer, StatusReport) else None


async def tree(
    endpoint: QuicEndpoint, tracker: tuple[str, int], stream: bytes
) -> TreeReport | None:
    (answer,) = await ask(endpoint, tracker, [TreeRequest(stream, 256)])
    return answer if isinstance(answer, TreeReport) else None


def join_request(key: Ed25519PrivateKey, stream: bytes, capacity: int, address: str) -> Join:
    return sign_message(Join(stream, key_id(key), capacity, address, None, now_ms()), key)


def count_answer(take: Take, answer: Message | None) -> Assigned | None:
    if isinstance(answer, Assigned):
        take.identities_accepted += 1
        return answer
    if answer is None:
        take.identities_unanswered += 1
    else:
        take.identities_refused += 1
        take.retry_after += isinstance(answer, RetryAfter)
        take.note = f"last refusal: {answer}"[:120]
    return None


# -- a child's subscription (the attacker's own source of the stream) -------------------


@dataclass
class Source:
    """What the attacker learns by subscribing like an honest child: the signed header,
    and the chunks as they come (raw encodings, by sequence number)."""

    info: StreamInfo | None = None
    info_raw: bytes = b""
    chunks: dict[int, bytes] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    """Sequence numbers in arrival order."""
    latest: int | None = None
    ready: trio.Event = field(default_factory=trio.Event)

    def add(self, seq: int, raw: bytes) -> None:
        if seq in self.chunks:
            return
        self.chunks[seq] = raw
        self.order.append(seq)
        if len(self.order) > 1500:  # keep the first 50 (old chunks to replay) and recent
            del self.chunks[self.order.pop(50)]
        self.latest = seq if self.latest is None else max(self.latest, seq)


async def subscribe(
    endpoint: QuicEndpoint, parent: Peer, stream: bytes, node: bytes, source: Source, take: Take
) -> None:
    """Subscribe to `parent` and record everything it sends into `source` until it closes."""
    async with open_link(
        endpoint, parse_address(parent.address), peer_key=parent.node, within=TIMEOUT
    ) as link:
        await link.send(frame(Subscribe(stream, None, node)))
        await _consume(link, source, take)


async def _consume(link: Link, source: Source, take: Take) -> None:
    while True:
        event = await link.next_event(math.inf)
        if isinstance(event, Received):
            msg = event.message
            if isinstance(msg, StreamInfo) and source.info is None:
                source.info, source.info_raw = msg, event.raw
                source.ready.set()
            elif isinstance(msg, Chunk):
                take.bytes_pulled += len(event.raw)
                if event.datagram:
                    take.live_bytes += len(event.raw)
                else:
                    take.repair_bytes += len(event.raw)
                source.add(msg.seq, event.raw)
            elif isinstance(msg, Heartbeat) and msg.latest_seq is not None:
                source.latest = max(source.latest or 0, msg.latest_seq)
            elif isinstance(msg, Missing):
                take.missing_answers += len(msg.seqs)
        elif isinstance(event, Closed | StreamEnded):
            if isinstance(event, Closed):
                take.closed(event.code)
            return


async def join_and_subscribe(
    endpoint: QuicEndpoint,
    key: Ed25519PrivateKey,
    tracker: tuple[str, int],
    stream: bytes,
    source: Source,
    take: Take,
    *,
    capacity: int = 0,
    address: str = "",
) -> None:
    """JOIN like a listener, then subscribe to the assigned parent (its backups if it
    refuses), feeding `source`, until the link closes."""
    for _ in range(20):
        (answer,) = await ask(endpoint, tracker, [join_request(key, stream, capacity, address)])
        assigned = count_answer(take, answer)
        if assigned is not None:
            break
        await trio.sleep(0.5)
    else:
        raise RuntimeError(f"the tracker never assigned the attacker a parent: {answer}")
    for parent in (assigned.parent, *assigned.backups):
        try:
            await subscribe(endpoint, parent, stream, key_id(key), source, take)
        except (trio.BrokenResourceError, trio.TooSlowError, OSError):
            continue
        if source.info is not None:
            return


# -- hostile relays --------------------------------------------------------------------

RELAY_MODES = ("silent", "missing", "old", "every-other", "other-stream")
"""silent: STREAM_INFO, PATH and HEARTBEATs announcing the live edge, no audio.
missing: the same, and MISSING for every REPAIR.
old: the chunks it got first, over and over, one for each new live chunk.
every-other: live chunks with an even sequence number only; MISSING for REPAIRs.
other-stream: live chunks of another stream (signed by that stream's origin)."""


@dataclass
class _Served:
    take: Take
    current: int = 0

    def enter(self) -> None:
        self.take.children_served += 1
        self.current += 1
        self.take.max_children = max(self.take.max_children, self.current)

    def leave(self, seconds: float) -> None:
        self.current -= 1
        self.take.child_seconds += seconds


async def hostile_relays(
    tracker: tuple[str, int],
    stream: bytes,
    take: Take,
    *,
    mode: str,
    count: int,
    capacity: int = 1024,
    other_stream: bytes | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`count` fresh identities JOIN with `capacity` and serve whoever the tracker sends
    them as `mode` says. The first subscribes like a listener to learn the signed
    header (and, for `other-stream`, a second identity subscribes to `other_stream`).
    `task_status.started()` once every identity is placed and serving."""
    if mode not in RELAY_MODES:
        raise ValueError(f"mode must be one of {RELAY_MODES}")
    source, feed = Source(), Source()
    served = _Served(take)
    async with trio.open_nursery() as nursery:
        keys = [Ed25519PrivateKey.generate() for _ in range(count)]
        endpoints = [
            await nursery.start(_endpoint, key, ATTACKER_HOST) for key in keys
        ]  # fmt: skip
        for key, endpoint in zip(keys, endpoints, strict=True):
            path = (stream, key_id(key))

            async def handler(conn: QuicConn, path: tuple[bytes, ...] = path) -> None:
                await _serve_child(conn, mode, path, source, feed, served)

            nursery.start_soon(endpoint.serve, handler)
        addresses = [f"{e.address[0]}:{e.address[1]}" for e in endpoints]
        # The first identity subscribes like a listener, for the signed header.
        nursery.start_soon(
            functools.partial(
                join_and_subscribe, endpoints[0], keys[0], tracker, stream, source, take,
                capacity=capacity, address=addresses[0],
            )
        )  # fmt: skip
        if mode == "other-stream":
            if other_stream is None:
                raise ValueError("other-stream needs other_stream")
            other_key = Ed25519PrivateKey.generate()
            other_endpoint = await nursery.start(_endpoint, other_key, ATTACKER_HOST)
            nursery.start_soon(
                join_and_subscribe, other_endpoint, other_key, tracker, other_stream, feed, Take()
            )  # fmt: skip
        else:
            feed = source
        with trio.fail_after(30):
            await source.ready.wait()
            await feed.ready.wait()
        for key, endpoint, address in zip(keys[1:], endpoints[1:], addresses[1:], strict=True):
            (answer,) = await ask(endpoint, tracker, [join_request(key, stream, capacity, address)])
            count_answer(take, answer)
        task_status.started()


def _refresh(
    key: Ed25519PrivateKey, stream: bytes, parent: bytes | None, capacity: int, address: str
) -> Refresh:
    return sign_message(Refresh(stream, key_id(key), parent, capacity, address, now_ms()), key)


async def _endpoint(
    key: Ed25519PrivateKey, host: str, *, task_status: trio.TaskStatus[QuicEndpoint]
) -> None:
    async with open_quic_endpoint(key, host) as endpoint:
        task_status.started(endpoint)
        await trio.sleep_forever()


async def _serve_child(
    conn: QuicConn,
    mode: str,
    path: tuple[bytes, ...],
    source: Source,
    feed: Source,
    served: _Served,
) -> None:
    stream = await conn.accept_stream()
    reader = MessageReader()
    while (msg := reader.next_message()) is None:
        data = await stream.receive_some(65536)
        if not data:
            return
        reader.receive_data(data)
    if not isinstance(msg, Subscribe):
        return
    await source.ready.wait()
    assert source.info is not None
    await stream.send_all(frame(source.info) + frame(PathUpdate(path)))
    started = trio.current_time()
    served.enter()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_answer_repairs, stream, reader, mode, nursery.cancel_scope)
            await _feed_child(conn, stream, mode, source, feed)
    finally:
        served.leave(trio.current_time() - started)


async def _answer_repairs(
    stream: QuicStream, reader: MessageReader, mode: str, scope: trio.CancelScope
) -> None:
    try:
        while True:
            while (msg := reader.next_message()) is not None:
                if isinstance(msg, Repair) and mode != "silent":
                    await stream.send_all(frame(Missing(msg.seqs)))
                elif isinstance(msg, Goodbye):
                    return
            data = await stream.receive_some(65536)
            if not data:
                return
            reader.receive_data(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError):
        pass
    finally:
        scope.cancel()


async def _feed_child(
    conn: QuicConn, stream: QuicStream, mode: str, source: Source, feed: Source
) -> None:
    seen = len(feed.order)  # the child is fed from the live edge on
    replay = 0
    last_heartbeat = -math.inf
    while True:
        await trio.sleep(0.01)
        new = feed.order[seen:] if len(feed.order) >= seen else []
        seen = len(feed.order)
        for seq in new:
            if mode == "old":
                old = feed.order[replay % min(50, len(feed.order))]
                replay += 1
                _send_chunk(conn, feed.chunks[old])
            elif seq in feed.chunks and (
                (mode == "every-other" and seq % 2 == 0) or mode == "other-stream"
            ):
                _send_chunk(conn, feed.chunks[seq])
        now = trio.current_time()
        if now - last_heartbeat >= HEARTBEAT:
            last_heartbeat = now
            await stream.send_all(frame(Heartbeat(source.latest, 0)))


def _send_chunk(conn: QuicConn, raw: bytes) -> None:
    with contextlib.suppress(ValueError):  # too large: a real relay would use the stream
        conn.send_datagram(raw)


# -- slot squatting and JOIN floods ----------------------------------------------------


async def join_flood(
    tracker: tuple[str, int],
    stream: bytes,
    take: Take,
    *,
    count: int,
    capacity: int = 0,
    per_connection: int = 16,
    connections_at_once: int = 4,
) -> None:
    """`count` fresh identities JOIN (capacity `capacity`, no address: they never
    serve, and never connect to the parent they are given), `per_connection` JOINs on
    each QUIC connection, as fast as the tracker answers."""
    keys = [Ed25519PrivateKey.generate() for _ in range(count)]
    batches = [keys[i : i + per_connection] for i in range(0, count, per_connection)]
    limit = trio.CapacityLimiter(connections_at_once)

    async def batch(endpoint: QuicEndpoint, group: list[Ed25519PrivateKey]) -> None:
        async with limit:
            requests: list[Message] = [join_request(k, stream, capacity, "") for k in group]
            take.connections_opened += 1
            for answer in await ask(endpoint, tracker, requests):
                count_answer(take, answer)

    async with (
        open_quic_endpoint(Ed25519PrivateKey.generate(), ATTACKER_HOST) as endpoint,
        trio.open_nursery() as nursery,
    ):
        for group in batches:
            nursery.start_soon(batch, endpoint, group)


# -- false failure reports -------------------------------------------------------------


async def false_reports(
    tracker: tuple[str, int], stream: bytes, take: Take, *, per_relay: int = 2
) -> None:
    """For every listener that may serve (capacity > 0): plant up to `per_relay` fresh
    identities under it by REFRESH (the tracker takes a REFRESH naming a parent with a
    free slot), then have each planted one REJOIN naming it dead. Counts the relays the
    tracker no longer has in its tree 4 s later (after its probes)."""
    async with open_quic_endpoint(Ed25519PrivateKey.generate(), ATTACKER_HOST) as endpoint:
        before = await _audience_before(endpoint, tracker, stream, take)
        if before is None:
            return
        targets = [n.node for n in before.nodes if n.parent is not None and n.capacity > 0]
        planted_under = 0
        for target in targets:
            keys = [Ed25519PrivateKey.generate() for _ in range(per_relay)]
            planted = []
            for key in keys:  # one at a time: each takes a slot in the tracker's view
                (answer,) = await ask(endpoint, tracker, [_refresh(key, stream, target, 0, "")])
                if isinstance(answer, Ack):
                    take.identities_accepted += 1
                    planted.append(key)
                else:
                    take.identities_refused += 1
            planted_under += len(planted) > 0
            take.relays_targeted += len(planted) >= 2
            await _report_dead(endpoint, tracker, stream, target, planted)
        await _count_evicted(endpoint, tracker, stream, targets, take)
        take.note = f"{planted_under} of {len(targets)} relays planted under"


async def false_reports_by_join(
    tracker: tuple[str, int], stream: bytes, take: Take, *, relays: int = 3, tries: int = 60
) -> None:
    """Let the tracker place the planted identities: JOIN fresh capacity-0 identities one
    at a time until two landed under each of `relays` listeners (or `tries` JOINs were
    made), then have both REJOIN naming it dead. Counts the relays the tracker no longer
    has in its tree 4 s later (after its probes)."""
    async with open_quic_endpoint(Ed25519PrivateKey.generate(), ATTACKER_HOST) as endpoint:
        before = await _audience_before(endpoint, tracker, stream, take)
        if before is None:
            return
        origin = next(n.node for n in before.nodes if n.parent is None)
        under: dict[bytes, list[Ed25519PrivateKey]] = {}
        for _ in range(tries):
            key = Ed25519PrivateKey.generate()
            (answer,) = await ask(endpoint, tracker, [join_request(key, stream, 0, "")])
            assigned = count_answer(take, answer)
            if assigned is not None and assigned.parent.node != origin:
                under.setdefault(assigned.parent.node, []).append(key)
            if sum(len(keys) >= 2 for keys in under.values()) >= relays:
                break
        targets = [parent for parent, keys in under.items() if len(keys) >= 2]
        take.relays_targeted = len(targets)
        planted = {key_id(k) for keys in under.values() for k in keys}
        view = await tree(endpoint, tracker, stream)
        shared = (
            sum(any(n.parent == t and n.node not in planted for n in view.nodes) for t in targets)
            if view is not None
            else 0
        )
        for target in targets:
            await _report_dead(endpoint, tracker, stream, target, under[target][:2])
        await _count_evicted(endpoint, tracker, stream, targets, take)
        take.note = f"two placed under {len(targets)} relays, {shared} with other children"


async def _audience_before(
    endpoint: QuicEndpoint, tracker: tuple[str, int], stream: bytes, take: Take
) -> TreeReport | None:
    """The tracker's tree before the attack (None, noted in `take`, if it does not say)."""
    before = await tree(endpoint, tracker, stream)
    if before is None:
        take.note = "no TREE answer"
    else:
        take.audience_before = before.audience
    return before


async def _report_dead(
    endpoint: QuicEndpoint,
    tracker: tuple[str, int],
    stream: bytes,
    target: bytes,
    keys: list[Ed25519PrivateKey],
) -> None:
    """Each identity of `keys` sends a REJOIN naming `target` as its dead parent."""
    reports: list[Message] = [
        sign_message(Rejoin(stream, key_id(k), target, None, 0, "", None, now_ms()), k)
        for k in keys
    ]
    if reports:
        await ask(endpoint, tracker, reports)


async def _count_evicted(
    endpoint: QuicEndpoint,
    tracker: tuple[str, int],
    stream: bytes,
    targets: list[bytes],
    take: Take,
) -> None:
    """The audience, and how many of `targets` the tracker's tree no longer has, once
    its probes are done (they take up to 3 s)."""
    await trio.sleep(4.0)
    after = await tree(endpoint, tracker, stream)
    if after is not None:
        take.audience_after = after.audience
        left = {n.node for n in after.nodes}
        take.relays_evicted = sum(1 for t in targets if t not in left)


# -- pulling the stream ----------------------------------------------------------------


async def repair_leech(
    tracker: tuple[str, int],
    stream: bytes,
    take: Take,
    *,
    rate: float = 60.0,
    future: bool = False,
) -> None:
    """JOIN, subscribe, then send `rate` REPAIRs a second for the last 64 chunks the
    parent announced (with `future`, for chunks it has not announced yet)."""
    key = Ed25519PrivateKey.generate()
    source = Source()
    async with open_quic_endpoint(key, ATTACKER_HOST) as endpoint:
        for _ in range(20):
            (answer,) = await ask(endpoint, tracker, [join_request(key, stream, 0, "")])
            assigned = count_answer(take, answer)
            if assigned is not None:
                break
            await trio.sleep(0.5)
        else:
            return
        parent = assigned.parent
        async with open_link(
            endpoint, parse_address(parent.address), peer_key=parent.node, within=TIMEOUT
        ) as link, trio.open_nursery() as nursery:  # fmt: skip
            await link.send(frame(Subscribe(stream, None, key_id(key))))

            async def consume() -> None:
                await _consume(link, source, take)
                nursery.cancel_scope.cancel()

            nursery.start_soon(consume)
            await source.ready.wait()
            while True:
                if source.latest is None:
                    await trio.sleep(0.02)
                    continue
                top = source.latest
                seqs = range(top + 1, top + 65) if future else range(max(0, top - 63), top + 1)
                try:
                    await link.send(frame(Repair(tuple(seqs))))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                await trio.sleep(1 / rate)


async def unauthenticated_pull(relay: Peer, stream: bytes, take: Take, *, seconds: float) -> None:
    """Subscribe straight to a relay, no JOIN and no token, and pull for `seconds`."""
    source = Source()
    key = Ed25519PrivateKey.generate()
    async with open_quic_endpoint(key, ATTACKER_HOST) as endpoint:
        with trio.move_on_after(seconds):
            try:
                await subscribe(endpoint, relay, stream, key_id(key), source, take)
            except (trio.BrokenResourceError, trio.TooSlowError) as exc:
                take.note = f"refused: {exc}"
    take.identities_accepted = int(source.info is not None)


# -- holding connections ---------------------------------------------------------------


async def slowloris(
    target: tuple[str, int], take: Take, *, count: int, reopen: bool = True
) -> None:
    """Hold `count` connections to a server, each having sent 1 byte of a frame and
    nothing more; with `reopen`, open a new one whenever the server closes one."""

    async def hold(endpoint: QuicEndpoint) -> None:
        while True:
            try:
                async with await endpoint.connect(target) as conn:
                    take.connections_opened += 1
                    stream = await conn.open_stream()
                    await stream.send_all(b"\x00")
                    take.held_now += 1
                    take.max_held = max(take.max_held, take.held_now)
                    try:
                        await conn.wait_closed()
                    finally:
                        take.held_now -= 1
                    take.closed(conn.close_code)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                take.closed(None)
            if not reopen:
                return
            await trio.sleep(0.1)

    # One endpoint per 64 connections: a server sees them as a few clients.
    async with trio.open_nursery() as nursery:
        endpoints = [
            await nursery.start(_endpoint, Ed25519PrivateKey.generate(), ATTACKER_HOST)
            for _ in range(max(1, count // 64))
        ]  # fmt: skip
        async with trio.open_nursery() as holders:
            for index in range(count):
                holders.start_soon(hold, endpoints[index % len(endpoints)])
                if index % 16 == 15:
                    await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


# -- never-completed QUIC Initials -----------------------------------------------------


def make_initials(target: tuple[str, int], count: int) -> list[bytes]:
    """`count` client Initials (each a fresh connection with its own ids and key
    share), built with aioquic and never continued."""
    config = QuicConfiguration(is_client=True, alpn_protocols=[DEFAULT_ALPN])
    initials: list[bytes] = []
    for _ in range(count):
        conn = QuicConnection(configuration=config)
        conn.connect(target, now=time.monotonic())
        initials.extend(data for data, _ in conn.datagrams_to_send(now=time.monotonic())[:1])
    return initials


async def initial_flood(
    target: tuple[str, int], take: Take, *, rate: float, initials: list[bytes]
) -> None:
    """Send the Initials at `rate` per second, in a loop, never answering the server."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind((ATTACKER_HOST, 0))
        start = trio.current_time()
        rng = random.Random(11)
        order = list(range(len(initials)))
        rng.shuffle(order)
        index = 0
        while True:
            due = start + index / rate
            await trio.sleep_until(due)
            await sock.sendto(initials[order[index % len(order)]], target)
            index += 1
            take.initials_sent = index
