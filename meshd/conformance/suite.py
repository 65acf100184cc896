"""Cases, the runner, and the checks most cases share.

A case is an async function of a target context that returns an `Outcome` judged
against the spec's expectation alone; the runner then applies the case's level (a
failed SHOULD is non-strict, an INFO case is informational), times it, and turns the
implementation's misbehaviour (no answer, a broken connection, bytes that do not
decode) into a failure of that case rather than of the suite.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio

from meshd.conformance.report import CaseResult, Level, Outcome, Report, Verdict
from meshd.conformance.wire import (
    Closed,
    Event,
    Link,
    Received,
    StreamEnded,
    Undecodable,
    describe_event,
)
from meshd.quic import ConnectionLost
from protocol import Chunk, ErrorCode, Goodbye, Heartbeat


class Mismatch(Exception):
    """A step of a case got something other than what the spec says: the case fails."""

    def __init__(self, sent: str, expected: str, got: str, note: str = "") -> None:
        super().__init__(f"sent {sent}; expected {expected}; got {got}")
        self.outcome = Outcome(Verdict.FAIL, sent, expected, got, note)


class Unmet(Exception):
    """A precondition the case cannot arrange (e.g. a parent that is full): skipped."""


C = TypeVar("C")


@dataclass(frozen=True)
class Case(Generic[C]):
    id: str
    section: str
    level: Level
    title: str
    run: Callable[[C], Awaitable[Outcome]]
    alone: bool = False
    """Run after the others, by itself: it disturbs what other cases measure (e.g. it
    spends a tracker's JOIN allowance for the suite's network)."""


class CaseList(Generic[C]):
    """The cases of one target, in definition order; `@cases.case(...)` adds one."""

    def __init__(self) -> None:
        self.cases: list[Case[C]] = []

    def case(
        self, case_id: str, section: str, level: Level, title: str, *, alone: bool = False
    ) -> Callable[[Callable[[C], Awaitable[Outcome]]], Callable[[C], Awaitable[Outcome]]]:
        def add(run: Callable[[C], Awaitable[Outcome]]) -> Callable[[C], Awaitable[Outcome]]:
            if any(c.id == case_id for c in self.cases):
                raise ValueError(f"duplicate case id {case_id}")
            self.cases.append(Case(case_id, section, level, title, run, alone))
            return run

        return add

    def select(self, patterns: Collection[str]) -> list[Case[C]]:
        """Cases whose id starts with one of `patterns` (all of them if none is given)."""
        if not patterns:
            return list(self.cases)
        return [c for c in self.cases if any(c.id.startswith(p) for p in patterns)]


async def run_cases(
    target: str,
    cases: list[Case[C]],
    context: C,
    *,
    case_timeout: float,
    concurrency: int,
) -> Report:
    """Run `cases` against one target, `concurrency` at a time, each within `case_timeout`;
    then those that must run alone, one by one."""
    results: dict[str, CaseResult] = {}
    limiter = trio.CapacityLimiter(concurrency)

    async def run_one(case: Case[C]) -> None:
        async with limiter:
            results[case.id] = await _run_case(case, context, case_timeout)

    async with trio.open_nursery() as nursery:
        for case in cases:
            if not case.alone:
                nursery.start_soon(run_one, case)
    for case in cases:
        if case.alone:
            results[case.id] = await _run_case(case, context, case_timeout)
    return Report(target, tuple(results[case.id] for case in cases))


async def _run_case(case: Case[C], context: C, case_timeout: float) -> CaseResult:
    started = trio.current_time()
    try:
        with trio.fail_after(case_timeout):
            outcome = await _unwrapped(case.run(context))
    except Mismatch as exc:
        outcome = exc.outcome
    except Unmet as exc:
        outcome = Outcome(Verdict.SKIPPED, "-", "-", "-", f"not run: {exc}")
    except trio.TooSlowError:
        outcome = Outcome(
            Verdict.FAIL, case.title, "an answer", f"nothing within {case_timeout:g} s"
        )
    except ConnectionLost as exc:
        outcome = Outcome(Verdict.FAIL, case.title, "the exchange to complete", str(exc))
    verdict = outcome.verdict
    if case.level is Level.SHOULD and verdict is Verdict.FAIL:
        verdict = Verdict.NON_STRICT
    elif case.level is Level.INFO and verdict in (Verdict.PASS, Verdict.FAIL):
        verdict = Verdict.INFORMATIONAL
    return CaseResult(
        case.id,
        case.section,
        case.level,
        case.title,
        verdict,
        outcome.sent,
        outcome.expected,
        outcome.got,
        outcome.note,
        trio.current_time() - started,
    )


_CASE_ENDINGS = (Mismatch, Unmet, trio.TooSlowError, ConnectionLost)


async def _unwrapped(run: Awaitable[Outcome]) -> Outcome:
    """`run`, with a case-ending exception raised inside a nursery (a link's) taken out of
    its exception group."""
    try:
        return await run
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if all(isinstance(leaf, _CASE_ENDINGS) for leaf in leaves):
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found


# -- shared checks ---------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """What came back after a request, up to the answer (and the close that follows it)."""

    events: tuple[Event, ...]

    @property
    def goodbye(self) -> Goodbye | None:
        for event in self.events:
            if isinstance(event, Received) and isinstance(event.message, Goodbye):
                return event.message
        return None

    @property
    def closed(self) -> Closed | None:
        for event in self.events:
            if isinstance(event, Closed):
                return event
        return None

    def first_message(self) -> Received | None:
        for event in self.events:
            if isinstance(event, Received) and not event.datagram:
                return event
        return None

    def describe(self) -> str:
        shown = [describe_event(e) for e in self.events if not _is_live_chunk(e)]
        return ", then ".join(shown) or "nothing"


def _is_live_chunk(event: Event) -> bool:
    return isinstance(event, Received) and event.datagram


async def read_reply(link: Link, within: float, close_wait: float) -> Reply:
    """Events until the first answer on the stream; after a GOODBYE (or the end of the
    stream) also the connection's close, if it comes within `close_wait`."""
    events: list[Event] = []
    deadline = trio.current_time() + within
    while (event := await link.next_message(deadline - trio.current_time())) is not None:
        events.append(event)
        if isinstance(event, Closed | Undecodable):
            break
        if isinstance(event, StreamEnded) or (
            isinstance(event, Received) and isinstance(event.message, Goodbye)
        ):
            deadline = trio.current_time() + close_wait
            continue
        if isinstance(event, Received):
            break
    return Reply(tuple(events))


async def read_until_closed(link: Link, within: float, close_wait: float) -> Reply:
    """Events until the connection closes (or `close_wait` after a GOODBYE, or `within` s),
    leaving out the stream flowing meanwhile: chunks and heartbeats."""
    events: list[Event] = []
    deadline = trio.current_time() + within
    while (event := await link.next_message(deadline - trio.current_time())) is not None:
        if isinstance(event, Received) and isinstance(event.message, Chunk | Heartbeat):
            continue
        events.append(event)
        if isinstance(event, Closed | Undecodable):
            break
        if isinstance(event, Received) and isinstance(event.message, Goodbye):
            deadline = trio.current_time() + close_wait
    return Reply(tuple(events))


def judge_error(
    reply: Reply,
    sent: str,
    codes: Collection[ErrorCode],
    *,
    refusal: bool = False,
    note: str = "",
) -> Outcome:
    """The spec's answer to bad input: GOODBYE with one of `codes`, then a connection close
    with the same code (§2, §10); the right close code without the GOODBYE before it is
    non-strict.

    A tracker's `refusal` of a well-formed request is only the GOODBYE (§2): the connection
    may stay open for the next request, or close with that code or NO_ERROR.
    """
    names = " or ".join(code.name for code in codes)
    expected = f"GOODBYE({names}), then the connection closed with that code"
    if refusal:
        expected = f"GOODBYE({names}); the connection open, or closed with that code or NO_ERROR"
    goodbye, closed = reply.goodbye, reply.closed
    got = reply.describe()
    if goodbye is not None and goodbye.code in codes:
        if closed is not None and closed.by_peer and closed.code == goodbye.code:
            return Outcome(Verdict.PASS, sent, expected, got, note)
        if refusal and (closed is None or closed.code == ErrorCode.NO_ERROR):
            return Outcome(Verdict.PASS, sent, expected, got, note)
        return Outcome(Verdict.FAIL, sent, expected, got, note)
    if goodbye is None and closed is not None and closed.by_peer and closed.code in codes:
        why = "closed with the right code but sent no GOODBYE first"
        return Outcome(Verdict.NON_STRICT, sent, expected, got, _join(note, why))
    return Outcome(Verdict.FAIL, sent, expected, got, note)


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def expect_message(reply: Reply, sent: str, kind: type[object], expected: str) -> Received:
    """The reply's first message, which must be a `kind`; Mismatch otherwise."""
    first = reply.first_message()
    if first is None or not isinstance(first.message, kind):
        raise Mismatch(sent, expected, reply.describe())
    return first
