"""Cases for a node or origin serving children
(`meshd conformance --parent HOST:PORT --parent-id ID --stream ID`).

The suite plays children. Accepted links take one of the parent's child slots, so
these cases run one at a time by default; every link is closed before the next case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.conformance.common import Target, add_common_cases
from meshd.conformance.report import Level, Outcome, Verdict
from meshd.conformance.suite import CaseList, Mismatch, Unmet, judge_error, read_until_closed
from meshd.conformance.wire import (
    Closed,
    Event,
    Link,
    Received,
    describe,
    describe_event,
    framed,
    open_link,
    packb,
)
from meshd.quic import open_quic_endpoint
from meshd.quic.transport import Address, UdpTransport
from meshd.tracker_client import now_ms
from protocol import (
    Chunk,
    ErrorCode,
    Goodbye,
    Heartbeat,
    Message,
    Missing,
    PathUpdate,
    ProtocolError,
    StreamInfo,
    StreamVerifier,
    issue_token,
    key_id,
)
from protocol.limits import MAX_PATH, REPAIR_BURST_BYTES

SILENCE_TIMEOUT = 0.6  # §6.2: the child's default silence timeout
_NOT_NOW = {ErrorCode.NO_CAPACITY, ErrorCode.NOT_AVAILABLE, ErrorCode.GOING_AWAY}


@dataclass
class Accepted:
    info: StreamInfo
    path: tuple[bytes, ...]
    link: Link


@dataclass
class ParentTarget(Target):
    stream: bytes = b""
    child_timeout: float = 1.0
    """The parent's child timeout (§6.6; 1 s by default)."""
    host_key: Ed25519PrivateKey | None = None
    """The host's key, if the parent feeds only admitted children: the suite then sends
    ADMIT with a token of its own before every SUBSCRIBE (§6.1)."""

    def admit_bytes(self, node: bytes, expires_ms: int | None = None) -> bytes:
        """ADMIT with a token for `node` (valid for an hour by default), or nothing
        without the host's key."""
        if self.host_key is None:
            return b""
        expires = now_ms() + 3_600_000 if expires_ms is None else expires_ms
        return framed(packb([0x0A, issue_token(self.host_key, self.stream, node, expires)]))

    def subscribe_bytes(self, from_seq: int | None, node: bytes | None = None) -> bytes:
        """SUBSCRIBE naming `node`, by default the suite's own key (its certificate's),
        after ADMIT if the parent needs it."""
        child = node if node is not None else self.endpoint.key
        subscribe = framed(packb([0x01, self.stream, from_seq, child]))
        return self.admit_bytes(child) + subscribe

    async def subscribe(
        self, link: Link, from_seq: int | None, node: bytes | None = None
    ) -> Accepted:
        """SUBSCRIBE; the parent must answer STREAM_INFO then PATH (a refusal that says
        "not now" skips the case: the parent is full or has no audio yet)."""
        sent = f"SUBSCRIBE(from_seq={from_seq})"
        await link.send(self.subscribe_bytes(from_seq, node))
        messages: list[Message] = []
        for _ in range(2):
            event = await link.next_message(self.timeout)
            if not isinstance(event, Received):
                seen = [describe(m) for m in messages] + [_describe(event)]
                raise Mismatch(sent, "STREAM_INFO, then PATH", ", then ".join(seen))
            if isinstance(event.message, Goodbye) and event.message.code in _NOT_NOW:
                raise Unmet(f"the parent refused a SUBSCRIBE: {describe(event.message)}")
            messages.append(event.message)
        info, path = messages
        if not isinstance(info, StreamInfo) or not isinstance(path, PathUpdate):
            got = ", then ".join(describe(m) for m in messages)
            raise Mismatch(sent, "STREAM_INFO, then PATH", got)
        return Accepted(info, path.nodes, link)

    async def chunks(
        self, link: Link, *, until: Callable[[list[Received]], bool]
    ) -> list[Received]:
        """Chunks (stream and datagram) from now until `until(chunks so far)` holds."""
        got: list[Received] = []
        deadline = trio.current_time() + 4 * self.timeout
        while not until(got):
            event = await link.next_event(deadline - trio.current_time())
            if event is None:
                raise Mismatch("a SUBSCRIBE", "chunks", f"{len(got)} chunks, then nothing")
            if isinstance(event, Received) and isinstance(event.message, Chunk):
                got.append(event)
            elif isinstance(event, Closed):
                raise Mismatch("a SUBSCRIBE", "chunks", describe_event(event))
        return got

    async def latest_seq(self) -> int:
        """The parent's newest chunk, once it holds at least four."""
        async with self.link() as link:
            await self.subscribe(link, None)
            chunks = await self.chunks(link, until=lambda c: bool(c) and _top(c) >= 3)
            return _top(chunks)


def _live(chunks: list[Received]) -> int:
    return sum(r.datagram for r in chunks)


def _top(chunks: list[Received]) -> int:
    return max(_seq(c) for c in chunks)


def _seq(received: Received) -> int:
    assert isinstance(received.message, Chunk)
    return received.message.seq


def _describe(event: Event | None) -> str:
    return "nothing" if event is None else describe_event(event)


CASES: CaseList[ParentTarget] = CaseList()
add_common_cases(CASES, packb([0x01, bytes(32), None, bytes(32)]), "SUBSCRIBE")
case = CASES.case


@case("6.1-accept", "6.1", Level.MUST,
      "SUBSCRIBE is accepted with STREAM_INFO (codec opus, an OpusHead), then PATH")  # fmt: skip
async def _accept(target: ParentTarget) -> Outcome:
    async with target.link() as link:
        accepted = await target.subscribe(link, None)
    info = accepted.info
    ok = info.codec == "opus" and info.head.startswith(b"OpusHead")
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        "SUBSCRIBE(from_seq=nil)",
        "STREAM_INFO(codec 'opus', head = an OpusHead packet), then PATH",
        f"{describe(info)}, then PATH",
    )


@case("4.3-stream-info-signature", "4.3", Level.MUST,
      "STREAM_INFO is signed by the stream key with the stream id as context")  # fmt: skip
async def _info_signature(target: ParentTarget) -> Outcome:
    async with target.link() as link:
        accepted = await target.subscribe(link, None)
    try:
        StreamVerifier(target.stream).verify_info(accepted.info)
    except ProtocolError as exc:
        got = f"{describe(accepted.info)}: {exc}"
        return Outcome(Verdict.FAIL, "SUBSCRIBE", "a STREAM_INFO that verifies", got)
    return Outcome(Verdict.PASS, "SUBSCRIBE", "a STREAM_INFO that verifies", "it verifies")


@case("6.5-path", "6.5", Level.MUST,
      "PATH runs from the stream id to the parent, names no node twice, < 64 ids")  # fmt: skip
async def _path(target: ParentTarget) -> Outcome:
    async with target.link() as link:
        path = (await target.subscribe(link, None)).path
    ends = target.peer_key if target.peer_key is not None else path[-1]
    ok = path[0] == target.stream and path[-1] == ends and len(set(path)) == len(path)
    ok = ok and len(path) < MAX_PATH
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        "SUBSCRIBE",
        "PATH([stream id, …, parent id]) with distinct ids, fewer than 64",
        describe(PathUpdate(path)),
    )


@case("5.1-chunks-signed", "5.1", Level.MUST,
      "every CHUNK (stream or datagram) verifies against the stream id")  # fmt: skip
async def _chunks_signed(target: ParentTarget) -> Outcome:
    verifier = StreamVerifier(target.stream)
    async with target.link() as link:
        await target.subscribe(link, None)
        chunks = await target.chunks(link, until=lambda c: len(c) >= 5)
    bad = []
    for received in chunks:
        assert isinstance(received.message, Chunk)
        try:
            verifier.verify_chunk(received.message, received.raw)
        except ProtocolError:
            bad.append(received.message.seq)
        if received.message.flags & ~(Chunk.FLAG_END | Chunk.FLAG_ANNOUNCE):
            bad.append(received.message.seq)
    got = f"{len(chunks)} chunks (seqs {_seq(chunks[0])}…{_top(chunks)})"
    if bad:
        got += f"; seqs {bad} do not verify or have reserved flag bits set"
    return Outcome(
        Verdict.FAIL if bad else Verdict.PASS,
        "SUBSCRIBE(from_seq=nil), then read 5 chunks",
        "every chunk signed by the stream key (context: the stream id), flags ⊆ END, ANNOUNCE",
        got,
    )


@case("6.1-live-edge", "6.1", Level.MUST,
      "SUBSCRIBE from nil gets only the newest chunk as backlog")  # fmt: skip
async def _live_edge(target: ParentTarget) -> Outcome:
    await target.latest_seq()
    async with target.link() as link:
        await target.subscribe(link, None)
        chunks = await target.chunks(link, until=lambda c: any(r.datagram for r in c))
    backlog = [_seq(r) for r in chunks[: next(i for i, r in enumerate(chunks) if r.datagram)]]
    return Outcome(
        Verdict.PASS if len(backlog) <= 1 else Verdict.FAIL,
        "SUBSCRIBE(from_seq=nil) to a parent holding several chunks",
        "at most one chunk on the stream before the live datagrams",
        f"seqs {backlog} on the stream before the first datagram",
    )


@case("6.1-backlog-from-seq", "6.1", Level.MUST,
      "SUBSCRIBE(from_seq) gets the chunks held from from_seq, in order")  # fmt: skip
async def _backlog(target: ParentTarget) -> Outcome:
    latest = await target.latest_seq()
    start = latest - 3
    async with target.link() as link:
        await target.subscribe(link, start)
        # The backlog precedes live chunks on the stream; three live ones mean it is over.
        chunks = await target.chunks(
            link, until=lambda c: sum(not r.datagram for r in c) >= 4 or _live(c) >= 3
        )
    stream_seqs = [_seq(r) for r in chunks if not r.datagram][:4]
    wanted = list(range(start, start + 4))
    return Outcome(
        Verdict.PASS if stream_seqs == wanted else Verdict.FAIL,
        f"SUBSCRIBE(from_seq={start}) when the newest chunk is {latest}",
        f"chunks {wanted} first on the stream",
        f"chunks {stream_seqs} first on the stream",
    )


@case("6.1-from-seq-ahead", "6.1", Level.MUST,
      "a from_seq beyond the newest chunk is no error")  # fmt: skip
async def _from_seq_ahead(target: ParentTarget) -> Outcome:
    latest = await target.latest_seq()
    sent = f"SUBSCRIBE(from_seq={latest + 10_000}) when the newest chunk is {latest}"
    async with target.link() as link:
        await target.subscribe(link, latest + 10_000)
        reply = await read_until_closed(link, target.close_wait, 0)
    ok = reply.goodbye is None and reply.closed is None
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        sent,
        "STREAM_INFO, PATH, and the link stays up",
        "STREAM_INFO, PATH, then " + reply.describe(),
    )


@case("6.4-repair", "6.4", Level.MUST, "REPAIR is answered with the chunks held, on the stream")
async def _repair(target: ParentTarget) -> Outcome:
    async with target.link() as link:
        await target.subscribe(link, None)
        chunks = await target.chunks(link, until=lambda c: bool(c) and _top(c) >= 3)
        wanted = [_top(chunks) - 2, _top(chunks) - 1]
        await link.send(framed(packb([0x05, wanted])))
        repaired = await target.chunks(
            link, until=lambda c: {_seq(r) for r in c if not r.datagram} >= set(wanted)
        )
    got = sorted({_seq(r) for r in repaired if not r.datagram} & set(wanted))
    return Outcome(Verdict.PASS, f"REPAIR({wanted})", f"CHUNK {wanted} on the stream", str(got))


@case("6.4-missing", "6.4", Level.MUST,
      "REPAIR of an announced chunk: CHUNK if held, else MISSING")  # fmt: skip
async def _missing(target: ParentTarget) -> Outcome:
    async with target.link() as link:
        await target.subscribe(link, None)
        await target.chunks(link, until=lambda c: bool(c))
        await link.send(framed(packb([0x05, [0]])))  # held unless the stream is > 10 s old
        deadline = trio.current_time() + target.timeout
        while (event := await link.next_message(deadline - trio.current_time())) is not None:
            if isinstance(event, Received) and isinstance(event.message, Chunk):
                if _seq(event) == 0:
                    break
                continue
            break
    ok = isinstance(event, Received) and (
        event.message == Missing((0,)) or isinstance(event.message, Chunk)
    )
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        "REPAIR([0])",
        "CHUNK 0 on the stream, or MISSING([0])",
        _describe(event),
    )


@case("6.4-repair-unannounced", "6.4", Level.MUST,
      "REPAIR of a chunk the parent never announced is BAD_REPAIR")  # fmt: skip
async def _repair_unannounced(target: ParentTarget) -> Outcome:
    async with target.link() as link:
        await target.subscribe(link, None)
        chunks = await target.chunks(link, until=lambda c: bool(c))
        ahead = _top(chunks) + 1_000_000
        await link.send(framed(packb([0x05, [ahead]])))
        reply = await read_until_closed(link, target.timeout, target.close_wait)
    return judge_error(
        reply, f"SUBSCRIBE, accepted; then REPAIR([{ahead}])", {ErrorCode.BAD_REPAIR}
    )


_IN_FLIGHT = 8_192  # live chunk bytes the parent sent that the suite has not read yet


@case("6.4-repair-budget", "6.4", Level.MUST,
      "a child gets no more repaired bytes than live ones plus 65,536: MISSING beyond")  # fmt: skip
async def _repair_budget(target: ParentTarget) -> Outcome:
    """A leech asks for the same announced chunks again and again. The parent counts the
    live bytes it sent, some still on their way: the suite allows `_IN_FLIGHT` more."""
    async with target.link() as link:
        await target.subscribe(link, None)
        chunks = await target.chunks(link, until=lambda c: len(c) >= 3)
        wanted = sorted({_seq(c) for c in chunks})
        live = sum(len(c.raw) for c in chunks)
        repaired = 0
        refused = False
        deadline = trio.current_time() + 4 * target.timeout
        while not refused and repaired <= live + REPAIR_BURST_BYTES + _IN_FLIGHT:
            await link.send(framed(packb([0x05, wanted])))
            answered = 0
            while answered < len(wanted):
                event = await link.next_message(deadline - trio.current_time())
                if not isinstance(event, Received):
                    return Outcome(Verdict.FAIL, f"REPAIR({wanted}) again and again",
                                   "CHUNK or MISSING for each", _describe(event))  # fmt: skip
                message = event.message
                if isinstance(message, Chunk) and not event.datagram and message.seq in wanted:
                    repaired += len(event.raw)
                    answered += 1
                elif isinstance(message, Chunk):
                    live += len(event.raw)
                elif isinstance(message, Missing):
                    refused = refused or bool(set(message.seqs) & set(wanted))
                    answered += len(message.seqs)
    ok = refused and repaired <= live + REPAIR_BURST_BYTES + _IN_FLIGHT
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        f"REPAIR({wanted}) again and again",
        f"MISSING once the repairs reach the live bytes + {REPAIR_BURST_BYTES}",
        f"{repaired} bytes repaired against {live} live, then "
        + ("MISSING" if refused else "still more chunks"),
    )


def _refused_first(
    case_id: str, section: str, title: str, codes: set[ErrorCode], build: Callable[..., bytes]
) -> None:
    async def run(target: ParentTarget) -> Outcome:
        data = build(target)
        sent = title.split(" is ")[0].split(":")[0]
        return await target.expect_error(data, codes, sent)

    case(case_id, section, Level.MUST, title)(run)


_refused_first(
    "6.1-unknown-stream",
    "6.1",
    "SUBSCRIBE for another stream is UNKNOWN_STREAM",
    {ErrorCode.UNKNOWN_STREAM},
    lambda t: framed(packb([0x01, key_id(Ed25519PrivateKey.generate()), None, bytes(32)])),
)
_refused_first(
    "3-subscribe-as-ancestor",
    "3",
    "SUBSCRIBE naming the origin, from a child whose certificate is another key, is WRONG_PEER",
    {ErrorCode.WRONG_PEER},
    lambda t: t.subscribe_bytes(None, node=t.stream),
)
_refused_first(
    "3-subscribe-as-another",
    "3",
    "SUBSCRIBE naming another node than the child's certificate is WRONG_PEER",
    {ErrorCode.WRONG_PEER},
    lambda t: t.subscribe_bytes(None, node=key_id(Ed25519PrivateKey.generate())),
)
_refused_first(
    "6.2-heartbeat-first",
    "6.2",
    "HEARTBEAT before SUBSCRIBE is UNEXPECTED_MESSAGE",
    {ErrorCode.UNEXPECTED_MESSAGE},
    lambda t: framed(packb([0x04, None, 0])),
)
_refused_first(
    "6.2-repair-first",
    "6.2",
    "REPAIR before SUBSCRIBE is UNEXPECTED_MESSAGE",
    {ErrorCode.UNEXPECTED_MESSAGE},
    lambda t: framed(packb([0x05, [0]])),
)
_refused_first(
    "6.2-tracker-request",
    "6.2",
    "STATUS sent to a parent is UNEXPECTED_MESSAGE",
    {ErrorCode.UNEXPECTED_MESSAGE},
    lambda t: framed(packb([0x15, t.stream])),
)
_refused_first(
    "4.1-subscribe-arity",
    "4.1",
    "SUBSCRIBE with two fields is MALFORMED_MESSAGE",
    {ErrorCode.MALFORMED_MESSAGE},
    lambda t: framed(packb([0x01, t.stream, None])),
)
_refused_first(
    "4.1-subscribe-field-type",
    "4.1",
    "SUBSCRIBE with from_seq as a str is MALFORMED_MESSAGE",
    {ErrorCode.MALFORMED_MESSAGE},
    lambda t: framed(packb([0x01, t.stream, "0", bytes(32)])),
)


def _after_accept(
    case_id: str,
    section: str,
    title: str,
    data: bytes,
    sent: str,
    codes: set[ErrorCode],
) -> None:
    async def run(target: ParentTarget) -> Outcome:
        async with target.link() as link:
            await target.subscribe(link, None)
            await link.send(data)
            reply = await read_until_closed(link, target.timeout, target.close_wait)
        return judge_error(reply, f"SUBSCRIBE, accepted; then {sent}", codes)

    case(case_id, section, Level.MUST, title)(run)


_SOME_CHUNK = packb([0x03, 0, 0, 0, [], bytes(64)])
_after_accept(
    "6.2-subscribe-twice",
    "6.2",
    "a second SUBSCRIBE on a streaming link is UNEXPECTED_MESSAGE",
    framed(packb([0x01, bytes(32), None, bytes(32)])),
    "SUBSCRIBE again",
    {ErrorCode.UNEXPECTED_MESSAGE},
)
_after_accept(
    "6.2-chunk-from-child",
    "6.2",
    "a CHUNK from the child is UNEXPECTED_MESSAGE",
    framed(_SOME_CHUNK),
    "CHUNK(seq 0, no packets) on the stream",
    {ErrorCode.UNEXPECTED_MESSAGE},
)
_after_accept(
    "8-repair-too-many",
    "8",
    "REPAIR with 65 seqs is MALFORMED_MESSAGE",
    framed(packb([0x05, list(range(65))])),
    "REPAIR(0…64)",
    {ErrorCode.MALFORMED_MESSAGE},
)
_after_accept(
    "8-repair-empty",
    "8",
    "REPAIR with no seq is MALFORMED_MESSAGE",
    framed(packb([0x05, []])),
    "REPAIR([])",
    {ErrorCode.MALFORMED_MESSAGE},
)
_after_accept(
    "4.2-over-length-streaming",
    "4.2",
    "an over-length prefix on a streaming link is MESSAGE_TOO_LARGE",
    (70_000).to_bytes(4, "big"),
    "a length prefix of 70,000 and no body",
    {ErrorCode.MESSAGE_TOO_LARGE},
)


@case("10-datagram-from-child", "10", Level.MUST,
      "a datagram that is not a CHUNK is UNEXPECTED_MESSAGE")  # fmt: skip
async def _datagram_from_child(target: ParentTarget) -> Outcome:
    sent = "SUBSCRIBE, accepted; then REPAIR([0]) as a datagram"
    expected = "the connection closed with UNEXPECTED_MESSAGE"
    async with target.link() as link:
        await target.subscribe(link, None)
        link.send_datagram(packb([0x05, [0]]))
        reply = await read_until_closed(link, target.close_wait, 0)
    closed = reply.closed
    if closed is not None and closed.code == ErrorCode.UNEXPECTED_MESSAGE:
        return Outcome(Verdict.PASS, sent, expected, reply.describe())
    if closed is None and reply.goodbye is None:
        note = "the datagram was ignored and the link stayed up"
        return Outcome(Verdict.NON_STRICT, sent, expected, reply.describe(), note)
    return Outcome(Verdict.FAIL, sent, expected, reply.describe())


@case("6.2-goodbye-from-child", "6.2", Level.SHOULD,
      "after the child's GOODBYE(NO_ERROR) the parent forgets it and closes")  # fmt: skip
async def _goodbye_from_child(target: ParentTarget) -> Outcome:
    async with target.link() as link:
        await target.subscribe(link, None)
        await link.send(framed(packb([0x08, 0, "bye"])))
        deadline = trio.current_time() + target.timeout
        while (event := await link.next_event(deadline - trio.current_time())) is not None:
            if isinstance(event, Closed):
                break
    ok = isinstance(event, Closed) and event.by_peer and event.code == ErrorCode.NO_ERROR
    return Outcome(
        Verdict.PASS if ok else Verdict.FAIL,
        "SUBSCRIBE, accepted; then GOODBYE(NO_ERROR)",
        "the connection closed by the parent with NO_ERROR",
        _describe(event),
    )


@case("6.2-no-silence", "6.2", Level.SHOULD,
      "the parent sends something (chunk or HEARTBEAT) at least every silence timeout")  # fmt: skip
async def _no_silence(target: ParentTarget) -> Outcome:
    gaps: list[float] = []
    heartbeats = 0
    async with target.link() as link:
        await target.subscribe(link, None)
        last = trio.current_time()
        end = last + 2.0
        while (now := trio.current_time()) < end:
            event = await link.next_event(end - now)
            if event is None:
                break
            if isinstance(event, Received):
                heartbeats += isinstance(event.message, Heartbeat)
                gaps.append(trio.current_time() - last)
                last = trio.current_time()
    longest = max([*gaps, trio.current_time() - last])
    return Outcome(
        Verdict.PASS if longest <= SILENCE_TIMEOUT else Verdict.FAIL,
        "SUBSCRIBE, then listen for 2 s",
        f"no silence longer than {SILENCE_TIMEOUT * 1000:.0f} ms",
        f"longest silence {longest * 1000:.0f} ms ({heartbeats} HEARTBEATs)",
        "timing: a busy machine can fail this; rerun before trusting a failure",
    )


class _DeafTransport:
    """A UDP socket that can play dead: while deaf it sends nothing and keeps what
    arrives unread (so nothing is acknowledged), and hands it all over once `wake` is
    called."""

    def __init__(self, inner: UdpTransport) -> None:
        self._inner = inner
        self._held: list[tuple[bytes, Address]] = []
        self._waiting = trio.CancelScope()
        self.deaf = False

    @property
    def local_address(self) -> tuple[str, int]:
        return self._inner.local_address

    def send(self, data: bytes, address: Address) -> None:
        if not self.deaf:
            self._inner.send(data, address)

    async def receive_batch(self) -> list[tuple[bytes, Address]]:
        while True:
            if not self.deaf and self._held:
                batch, self._held = self._held, []
                return batch
            with trio.CancelScope() as self._waiting:
                batch = await self._inner.receive_batch()
                if not self.deaf:
                    return batch
                self._held += batch

    def wake(self) -> None:
        self.deaf = False
        self._waiting.cancel()

    def close(self) -> None:
        self._inner.close()


@case("6.6-dead-child", "6.6", Level.MUST,
      "a child silent for the child timeout is let go with CHILD_TIMEOUT")  # fmt: skip
async def _dead_child(target: ParentTarget) -> Outcome:
    silence = target.child_timeout + 1.5
    sent = f"SUBSCRIBE, accepted; then no packet at all (not even ACKs) for {silence:g} s"
    expected = "GOODBYE(CHILD_TIMEOUT), then the connection closed with CHILD_TIMEOUT"
    transport = _DeafTransport(await UdpTransport.bind(target.endpoint.address[0], 0))
    async with (
        open_quic_endpoint(
            Ed25519PrivateKey.generate(), config=target.endpoint.config, transport=transport
        ) as endpoint,
        open_link(
            endpoint, target.address, peer_key=target.peer_key, within=target.timeout
        ) as link,
    ):
        await target.subscribe(link, None, node=endpoint.key)
        transport.deaf = True
        await trio.sleep(silence)
        transport.wake()
        reply = await read_until_closed(link, target.timeout, target.close_wait)
    outcome = judge_error(reply, sent, {ErrorCode.CHILD_TIMEOUT})
    return Outcome(outcome.verdict, sent, expected, outcome.got)


def _own_id(target: ParentTarget) -> bytes:
    assert target.peer_key is not None, "a parent target always has its node id"
    return target.peer_key


_refused_first(
    "3-subscribe-as-parent",
    "3",
    "SUBSCRIBE naming the parent itself, from a child whose certificate is another key, "
    "is WRONG_PEER",
    {ErrorCode.WRONG_PEER},
    lambda t: t.subscribe_bytes(None, node=_own_id(t)),
)


HEARTBEAT_WAIT = 3.0  # how long the suite listens for HEARTBEATs between chunks


@case("5.1-heartbeat-form", "5.1", Level.MUST,
      "HEARTBEAT while the stream advances: latest_seq = a chunk sent, stalled_ms 0")  # fmt: skip
async def _heartbeat_form(target: ParentTarget) -> Outcome:
    """`latest_seq` is at least the newest chunk the parent sent on the stream before the
    HEARTBEAT and at most the newest chunk it sent at all; `stalled_ms` is 0 unless the
    parent's playback stood still for 2 heartbeat intervals, which it cannot have done
    for longer than the suite saw no new chunk."""
    heartbeats: list[tuple[Heartbeat, int | None, float]] = []
    newest: int | None = None  # the highest seq so far, any way it came
    on_stream: int | None = None  # the highest seq so far on the stream
    last_new = longest_pause = 0.0
    async with target.link() as link:
        await target.subscribe(link, None)
        start = last_new = trio.current_time()
        end = start + HEARTBEAT_WAIT
        while (now := trio.current_time()) < end:
            event = await link.next_event(end - now)
            if not isinstance(event, Received):
                break
            message, now = event.message, trio.current_time()
            if isinstance(message, Chunk) and (newest is None or message.seq > newest):
                newest, last_new = message.seq, now
            if isinstance(message, Chunk) and not event.datagram:
                on_stream = max(message.seq, on_stream or 0)
            longest_pause = max(longest_pause, now - last_new)
            if isinstance(message, Heartbeat):
                heartbeats.append((message, on_stream, longest_pause))
                end = max(end, now + target.close_wait)  # its latest_seq must arrive too
    if not heartbeats:
        raise Unmet(f"no HEARTBEAT in {HEARTBEAT_WAIT:g} s: chunks left no interval idle")
    bad = [
        describe(heartbeat)
        for heartbeat, low, pause in heartbeats
        if heartbeat.latest_seq is None
        or newest is None
        or not (low or 0) <= heartbeat.latest_seq <= newest
        or heartbeat.stalled_ms > pause * 1000
    ]
    got = f"{len(heartbeats)} HEARTBEATs, chunks up to {newest}"
    return Outcome(
        Verdict.FAIL if bad else Verdict.PASS,
        f"SUBSCRIBE, then listen {HEARTBEAT_WAIT:g} s while the stream advances",
        "each HEARTBEAT's latest_seq between the newest chunk on the stream before it and "
        "the newest chunk sent; stalled_ms 0 (at most the longest pause between new chunks)",
        got + (f"; wrong: {', '.join(bad[:3])}" if bad else ""),
    )


# -- admission on every hop (§6.1) ----------------------------------------------------------


def _admission_case(
    case_id: str, title: str, code: ErrorCode, build: Callable[[ParentTarget], bytes]
) -> None:
    async def run(target: ParentTarget) -> Outcome:
        if target.host_key is None:
            raise Unmet("admission cases need the host's key (--host-key)")
        data = build(target) + framed(packb([0x01, target.stream, None, target.endpoint.key]))
        return await target.expect_error(data, {code}, title.split(" is ")[0])

    case(case_id, "6.1", Level.MUST, title)(run)


_admission_case(
    "6.1-admission-required",
    "SUBSCRIBE without ADMIT is TOKEN_REQUIRED",
    ErrorCode.TOKEN_REQUIRED,
    lambda t: b"",
)
_admission_case(
    "6.1-admission-other-node",
    "ADMIT with a token for another node, then SUBSCRIBE is TOKEN_INVALID",
    ErrorCode.TOKEN_INVALID,
    lambda t: t.admit_bytes(key_id(Ed25519PrivateKey.generate())),
)
_admission_case(
    "6.1-admission-other-host",
    "ADMIT with a token signed by another key, then SUBSCRIBE is TOKEN_INVALID",
    ErrorCode.TOKEN_INVALID,
    lambda t: framed(
        packb(
            [
                0x0A,
                issue_token(
                    Ed25519PrivateKey.generate(), t.stream, t.endpoint.key, now_ms() + 3_600_000
                ),
            ]
        )
    ),
)
_admission_case(
    "6.1-admission-expired",
    "ADMIT with an expired token, then SUBSCRIBE is TOKEN_EXPIRED",
    ErrorCode.TOKEN_EXPIRED,
    lambda t: t.admit_bytes(t.endpoint.key, expires_ms=now_ms() - 60_000),
)


@case("6.1-admit-ignored-when-open", "6.1", Level.MUST,
      "a parent that admits everyone ignores ADMIT: ADMIT, then SUBSCRIBE is accepted")  # fmt: skip
async def _admit_ignored(target: ParentTarget) -> Outcome:
    if target.host_key is not None:
        raise Unmet("the parent admits only token holders (every case sends ADMIT)")
    sent = "ADMIT(a token nobody signed), then SUBSCRIBE"
    token = issue_token(Ed25519PrivateKey.generate(), target.stream, target.endpoint.key, 0)
    async with target.link() as link:
        await link.send(framed(packb([0x0A, token])))
        try:
            await target.subscribe(link, None)
        except Mismatch as exc:
            if "TOKEN_" in exc.outcome.got:
                raise Unmet(
                    f"the parent checks tokens ({exc.outcome.got}): give --host-key"
                ) from None
            raise
    return Outcome(Verdict.PASS, sent, "STREAM_INFO, then PATH", "STREAM_INFO, then PATH")


_after_accept(
    "6.2-admit-after-subscribe",
    "6.2",
    "ADMIT on a streaming link is UNEXPECTED_MESSAGE",
    framed(packb([0x0A, b"late"])),
    "ADMIT",
    {ErrorCode.UNEXPECTED_MESSAGE},
)
