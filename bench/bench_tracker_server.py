"""Tracker server JOINs/s over real QUIC on loopback: throughput, workers, resumption, shedding.

Run: .venv/bin/python bench/bench_tracker_server.py [--seconds 8] [--clients 2] [--baseline main]

Budgets (issue 12): >= 600 fresh JOINs and >= 1,500 resumed requests per server CPU-second;
2 workers >= 1.7x the JOINs/s of 1 worker; a shed connection <= 10 % of a JOIN's CPU.

The tracker is the real `meshd tracker` command in its own process (with --workers, plus
its worker processes), with its default logging (one INFO line per join, to a log file).
Client processes run many requests at once through `ask_tracker`: every fresh JOIN is a
new connection, a full handshake and one request/response, as a node does it. Node keys
and signed requests are made before the clock starts. Server CPU is read from /proc for
the tracker and all its children; "per CPU-s" is requests per second of that CPU.

Runs, each against a fresh tracker with one registered stream:
  fresh       JOINs for --seconds, with --workers 0, 1 and 2 (and the --baseline git ref's
              tracker, today's code, for comparison) in one run: per CPU-s and JOINs/s;
  resumed     each simulated node (its own endpoint, as a real node) JOINs once untimed,
              then REFRESHes on a new connection again and again: resumed TLS session,
              REFRESH in 0-RTT;
  shed        --max-pending 0: every connection is refused before the handshake; server
              CPU per refusal against a fresh JOIN's;
  overload    --max-pending 8 and many more JOINs in flight; a fixed number of JOINs
              that must all complete by backing off;
  profile     the fresh load against a one-process tracker under cProfile.
On this 2-core machine the clients need about as much CPU as the tracker, so JOINs/s with
2 workers is bounded by the machine, not by the tracker; the report says how busy it was.
(bench_tracker_core.py measures the tree decisions alone, in process.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import multiprocessing
import os
import pstats
import random
import re
import resource
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import trio
from bench_node import checkout  # bench/ is on the path when a bench script runs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd import tracker_client
from meshd.quic import HandshakeFailed, open_quic_endpoint
from meshd.tracker_client import TrackerRefused, ask_tracker, now_ms
from protocol import (
    Ack,
    Assigned,
    ErrorCode,
    ExchangeState,
    Join,
    Refresh,
    Register,
    StatusReport,
    StatusRequest,
    TrackerExchange,
    key_id,
    sign_message,
)

BUDGET_PER_CORE = 600.0
BUDGET_RESUMED = 1500.0
BUDGET_SHED_SHARE = 0.10
BUDGET_SCALING = 1.7
SEED_JOINS_PER_S = 1700.0
ORIGIN_ADDRESS = "127.0.0.1:9"
ORIGIN_CAPACITY = 8
NODE_CAPACITY = 4  # relays, so the tree never runs out of room
NODE_ADDRESS = "127.0.0.1:10"
GIVE_UP_AFTER = 60.0  # ask_tracker's default
STARTUP_TIMEOUT = 30.0
IDLE_SECONDS = 2.0  # one client, one JOIN in flight: latency without queueing
RESULT_TIMEOUT = 120.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CPUS = os.cpu_count() or 1
# `python -c PROFILED_MESHD OUT ARGS...` is `meshd ARGS...` with cProfile switched on by
# one SIGUSR1 and off by the next, which also writes the stats to OUT: the profile covers
# the load window only, not start-up. cProfile's default (wall) clock is kept: CPU-time
# clocks cost a system call per event and distort the profile far more.
PROFILED_MESHD = """
import cProfile, runpy, signal, sys
out, sys.argv = sys.argv[1], ["meshd", *sys.argv[2:]]
profiler, on = cProfile.Profile(), [False]
def toggle(signum, frame):
    if on[0]:
        profiler.disable()
        profiler.dump_stats(out)
    else:
        profiler.enable()
    on[0] = not on[0]
signal.signal(signal.SIGUSR1, toggle)
runpy.run_module("meshd", run_name="__main__", alter_sys=True)
"""


# -- the tracker process ---------------------------------------------------------------


@dataclass
class TrackerProcess:
    popen: subprocess.Popen[bytes]
    address: tuple[str, int]
    log: Path
    profile: Path | None = None

    def window(self, started: bool) -> None:
        """Called as the load starts and ends: switches the profiler on and off."""
        if self.profile is None:
            return
        self.popen.send_signal(signal.SIGUSR1)
        if not started:
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while not self.profile.exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    def cpu_seconds(self) -> float:
        """User + system CPU so far of the tracker and its worker processes."""
        return sum(process_cpu_ticks(pid) for pid in process_tree(self.popen.pid)) / CLOCK_TICKS

    def coordinator_cpu_seconds(self) -> float:
        """User + system CPU so far of the tracker's own process (with workers: the
        coordinator, which decides; without: everything)."""
        return process_cpu_ticks(self.popen.pid) / CLOCK_TICKS

    def log_lines(self, pattern: str) -> int:
        text = self.log.read_text(errors="replace")
        return len(re.findall(pattern, text, flags=re.MULTILINE))


def _stat_fields(pid: int) -> list[str]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rindex(")") + 2 :].split()


def process_cpu_ticks(pid: int) -> int:
    """utime + stime of one process (fields 14 and 15 of stat); 0 once it is gone."""
    fields = _stat_fields(pid)
    return int(fields[11]) + int(fields[12]) if fields else 0


def process_tree(root: int) -> list[int]:
    """`root` and its descendants (the tracker's workers)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))):
            parents[int(entry.name)] = int(fields[1])
    tree, frontier = [root], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        tree += children
        frontier += children
    return tree


@contextmanager
def tracker_process(
    workdir: Path,
    name: str,
    *extra: str,
    profile: Path | None = None,
    source: Path | None = None,
) -> Iterator[TrackerProcess]:
    """`meshd tracker` on 127.0.0.1, port 0; stopped with SIGINT (killed if it lingers).

    With `source`, the tracker runs the meshd found there (a --baseline checkout)."""
    env = dict(os.environ)
    if source is not None:  # from there, or `-m meshd` finds this tree's first
        env["PYTHONPATH"] = str(source)
    command = [sys.executable]
    command += ["-m", "meshd"] if profile is None else ["-c", PROFILED_MESHD, str(profile)]
    command += ["tracker", "--listen", "127.0.0.1:0", "--refresh", "180", *extra]
    command += per_network_limits_off(env, source)
    log = workdir / f"{name}.log"
    with log.open("wb") as log_file:
        popen = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=source,
        )
    try:
        assert popen.stdout is not None
        ready, _, _ = select.select([popen.stdout], [], [], STARTUP_TIMEOUT)
        line = popen.stdout.readline().decode() if ready else ""
        match = re.match(r"listening on (127\.0\.0\.1):(\d+)", line)
        if match is None:
            raise RuntimeError(f"tracker did not start: {line!r}\n{log.read_text()[-2000:]}")
        yield TrackerProcess(popen, (match[1], int(match[2])), log, profile)
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGINT)
            try:
                popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        if popen.stdout is not None:
            popen.stdout.close()


PER_NETWORK_LIMITS = (
    "--joins-per-network",
    "--handshakes-per-network",
    "--identities-per-network",
    "--capacity-per-network",
)


def per_network_limits_off(env: dict[str, str], source: Path | None) -> list[str]:
    """Every client is on 127.0.0.1, one network: turn off each per-network limit that
    this tracker (maybe an older --baseline one) has, or it tells the clients to retry."""
    usage = subprocess.run(
        [sys.executable, "-m", "meshd", "tracker", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=source,
        check=True,
    ).stdout
    return [arg for flag in PER_NETWORK_LIMITS if flag in usage for arg in (flag, "0")]


async def _ask(address: tuple[str, int], request: Register | StatusRequest) -> object:
    async with open_quic_endpoint(Ed25519PrivateKey.generate(), "127.0.0.1", 0) as endpoint:
        return await ask_tracker(endpoint, address, request, give_up_after=10.0)


def register_stream(address: tuple[str, int]) -> bytes:
    """REGISTER a new stream, signed by its key; returns the stream id."""
    stream_key = Ed25519PrivateKey.generate()
    stream = key_id(stream_key)
    request = sign_message(Register(stream, ORIGIN_ADDRESS, ORIGIN_CAPACITY, now_ms()), stream_key)
    answer = trio.run(_ask, address, request)
    if not isinstance(answer, Ack):
        raise TypeError(f"REGISTER answered {answer!r}")
    return stream


def stream_status(address: tuple[str, int], stream: bytes) -> StatusReport:
    answer = trio.run(_ask, address, StatusRequest(stream))
    if not isinstance(answer, StatusReport):
        raise TypeError(f"STATUS answered {answer!r}")
    return answer


# -- client processes --------------------------------------------------------------------


class CountingExchange(TrackerExchange):
    """`ask_tracker`'s exchange, unchanged, plus a count of attempts that failed.

    `ask_tracker` builds its exchange from its module's `TrackerExchange`; the clients
    swap in this subclass so the real client code runs and each JOIN's attempts can be
    classified afterwards (`by_request` maps the request to its exchange).
    """

    by_request: dict[Join, CountingExchange] = {}  # noqa: RUF012 (one process, one loop)

    def __init__(self, request: Any, **kwargs: Any) -> None:
        super().__init__(request, **kwargs)
        self.connection_failures = 0
        if isinstance(request, Join):
            CountingExchange.by_request[request] = self

    def attempt_failed(self, now: float) -> None:
        if self.state is ExchangeState.SENT:
            self.connection_failures += 1
        super().attempt_failed(now)


@dataclass(frozen=True)
class ClientSpec:
    address: tuple[str, int]
    stream: bytes
    concurrency: int
    joins: int
    """Pre-signed JOINs; with `seconds`, a pool that should outlast the window."""
    seconds: float | None
    """Stop starting JOINs after this long; None: run all of them."""
    mode: str = "join"
    """join: fresh JOINs; refresh: resumed REFRESHes, each task one node with its own
    endpoint; refused: connections the tracker refuses before the handshake."""


@dataclass
class ClientResult:
    latencies: list[float] = field(default_factory=list)
    completed: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    gave_up: int = 0
    attempts: int = 0
    retry_answers: int = 0
    """Attempts answered RETRY_AFTER (or a retryable GOODBYE)."""
    connection_failures: int = 0
    """Attempts that got no answer (handshake or request timed out, connection lost)."""
    max_attempts: int = 0
    pool_exhausted: bool = False
    elapsed: float = 0.0
    cpu: float = 0.0

    def count(self, exchange: CountingExchange | None, answered: bool) -> None:
        if exchange is None:
            return
        self.attempts += exchange.attempts
        self.connection_failures += exchange.connection_failures
        self.retry_answers += exchange.attempts - exchange.connection_failures - answered
        self.max_attempts = max(self.max_attempts, exchange.attempts)


def make_joins(stream: bytes, count: int) -> list[Join]:
    joins = []
    for _ in range(count):
        key = Ed25519PrivateKey.generate()
        join = Join(stream, key_id(key), NODE_CAPACITY, NODE_ADDRESS, None, now_ms())
        joins.append(sign_message(join, key))
    return joins


async def drive(spec: ClientSpec, joins: list[Join]) -> ClientResult:
    """`spec.concurrency` tasks, each asking for one JOIN after another."""
    result = ClientResult()
    queue = iter(joins)
    deadline = math.inf if spec.seconds is None else trio.current_time() + spec.seconds
    rng = random.Random(os.getpid())
    start = time.perf_counter()
    async with open_quic_endpoint(Ed25519PrivateKey.generate(), "127.0.0.1", 0) as endpoint:

        async def worker() -> None:
            for join in queue:
                if trio.current_time() >= deadline:
                    return
                started = time.perf_counter()
                answered = True
                try:
                    answer = await ask_tracker(
                        endpoint, spec.address, join, rng=rng, give_up_after=GIVE_UP_AFTER
                    )
                except TrackerRefused as exc:
                    name = ErrorCode(exc.code).name
                    result.refused[name] = result.refused.get(name, 0) + 1
                except trio.TooSlowError:
                    result.gave_up += 1
                    answered = False
                else:
                    assert isinstance(answer, Assigned)
                    result.latencies.append(time.perf_counter() - started)
                    result.completed += 1
                result.count(CountingExchange.by_request.pop(join, None), answered)
            if spec.seconds is not None:
                result.pool_exhausted = True

        async with trio.open_nursery() as nursery:
            for _ in range(spec.concurrency):
                nursery.start_soon(worker)
    result.elapsed = time.perf_counter() - start
    return result


def machine_busy() -> float:
    """CPU seconds all processes on this machine have used so far (first line of stat)."""
    with open("/proc/stat") as stat:
        _, user, nice, system, _idle, _iowait, irq, softirq, steal, *_ = stat.readline().split()
    return sum(int(n) for n in (user, nice, system, irq, softirq, steal)) / CLOCK_TICKS


def process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def client_main(pipe: Connection, spec: ClientSpec) -> None:
    """A client process: sign its requests, say ready, wait for "go", run, send the result."""
    tracker_client.TrackerExchange = CountingExchange  # type: ignore[attr-defined]
    joins = make_joins(spec.stream, spec.joins if spec.mode == "join" else 0)
    trio.run(client_run, pipe, spec, joins)


async def client_run(pipe: Connection, spec: ClientSpec, joins: list[Join]) -> None:
    async with contextlib.AsyncExitStack() as stack:
        nodes: list[tuple[Any, Refresh]] = []
        if spec.mode == "refresh":  # untimed: every node joins once, and gets a ticket
            for _ in range(spec.concurrency):
                key = Ed25519PrivateKey.generate()
                endpoint = await stack.enter_async_context(
                    open_quic_endpoint(Ed25519PrivateKey.generate(), "127.0.0.1", 0)
                )
                node = key_id(key)
                join = Join(spec.stream, node, NODE_CAPACITY, NODE_ADDRESS, None, now_ms())
                answer = await ask_tracker(
                    endpoint, spec.address, sign_message(join, key), give_up_after=GIVE_UP_AFTER
                )
                assert isinstance(answer, Assigned)
                refresh = Refresh(
                    spec.stream, node, answer.parent.node, NODE_CAPACITY, NODE_ADDRESS, now_ms()
                )
                nodes.append((endpoint, sign_message(refresh, key)))
        pipe.send("ready")
        if await trio.to_thread.run_sync(pipe.recv) != "go":
            return
        cpu = process_cpu()
        if spec.mode == "refresh":
            result = await drive_refresh(spec, nodes)
        elif spec.mode == "refused":
            result = await drive_refused(spec)
        else:
            result = await drive(spec, joins)
        result.cpu = process_cpu() - cpu
    pipe.send(dataclasses.asdict(result))


async def drive_refresh(spec: ClientSpec, nodes: list[tuple[Any, Refresh]]) -> ClientResult:
    """Each node REFRESHes on a new connection, one after another, until the window ends
    (a real node does so every few minutes: its session ticket is from its last request)."""
    result = ClientResult()
    assert spec.seconds is not None
    deadline = trio.current_time() + spec.seconds
    start = time.perf_counter()

    async def node(endpoint: Any, refresh: Refresh) -> None:
        while trio.current_time() < deadline:
            started = time.perf_counter()
            try:
                answer = await ask_tracker(
                    endpoint, spec.address, refresh, give_up_after=GIVE_UP_AFTER
                )
            except TrackerRefused as exc:
                name = ErrorCode(exc.code).name
                result.refused[name] = result.refused.get(name, 0) + 1
            else:
                assert isinstance(answer, Ack | Assigned)
                result.completed += 1
                result.latencies.append(time.perf_counter() - started)

    async with trio.open_nursery() as nursery:
        for endpoint, refresh in nodes:
            nursery.start_soon(node, endpoint, refresh)
    result.elapsed = time.perf_counter() - start
    return result


async def drive_refused(spec: ClientSpec) -> ClientResult:
    """Open connections against a tracker that refuses every one (no backoff: the load)."""
    result = ClientResult()
    assert spec.seconds is not None
    deadline = trio.current_time() + spec.seconds
    start = time.perf_counter()
    async with open_quic_endpoint(Ed25519PrivateKey.generate(), "127.0.0.1", 0) as endpoint:

        async def worker() -> None:
            while trio.current_time() < deadline:
                try:
                    await endpoint.connect(spec.address)
                except HandshakeFailed:
                    result.completed += 1

        async with trio.open_nursery() as nursery:
            for _ in range(spec.concurrency):
                nursery.start_soon(worker)
    result.elapsed = time.perf_counter() - start
    return result


# -- a load run --------------------------------------------------------------------------


@dataclass
class Load:
    clients: list[ClientResult]
    elapsed: float
    server_cpu: float
    coordinator_cpu: float
    machine_cpu: float
    """All CPU used on the machine during the window, ours and anyone else's."""

    @property
    def completed(self) -> int:
        return sum(c.completed for c in self.clients)

    @property
    def latencies(self) -> list[float]:
        return [s for c in self.clients for s in c.latencies]

    def total(self, name: str) -> int:
        return sum(getattr(c, name) for c in self.clients)

    def refused(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for client in self.clients:
            for name, count in client.refused.items():
                totals[name] = totals.get(name, 0) + count
        return totals


def run_load(tracker: TrackerProcess, specs: list[ClientSpec]) -> Load:
    """Start one process per spec, wait until all are ready, then time them together."""
    context = multiprocessing.get_context("spawn")
    pipes: list[Connection] = []
    processes = []
    try:
        for spec in specs:
            parent, child = context.Pipe()
            process = context.Process(target=client_main, args=(child, spec), daemon=True)
            process.start()
            child.close()
            pipes.append(parent)
            processes.append(process)
        for pipe in pipes:
            if not pipe.poll(STARTUP_TIMEOUT) or pipe.recv() != "ready":
                raise RuntimeError("a client process did not get ready")
        tracker.window(started=True)
        cpu_before, machine_before = tracker.cpu_seconds(), machine_busy()
        coordinator_before = tracker.coordinator_cpu_seconds()
        start = time.perf_counter()
        for pipe in pipes:
            pipe.send("go")
        results = []
        for pipe in pipes:
            if not pipe.poll(RESULT_TIMEOUT):
                raise RuntimeError("a client process did not finish")
            results.append(ClientResult(**pipe.recv()))
        elapsed = time.perf_counter() - start
        server_cpu, coordinator_cpu, machine_cpu = (
            tracker.cpu_seconds() - cpu_before,
            tracker.coordinator_cpu_seconds() - coordinator_before,
            machine_busy() - machine_before,
        )
        tracker.window(started=False)
        return Load(results, elapsed, server_cpu, coordinator_cpu, machine_cpu)
    finally:
        for pipe in pipes:
            pipe.close()
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()


def latency_figures(samples: list[float]) -> str:
    if len(samples) < 2:
        return "n/a"
    cuts = statistics.quantiles(samples, n=100)
    return (
        f"p50 {cuts[49] * 1e3:.1f} ms, p99 {cuts[98] * 1e3:.1f} ms, max {max(samples) * 1e3:.1f} ms"
    )


def report(
    load: Load, status: StatusReport, tracker: TrackerProcess, *, budget: bool = True
) -> None:
    completed = load.completed
    cpu = load.server_cpu
    per_core = completed / cpu if cpu > 0 else math.inf
    client_cpu = sum(c.cpu for c in load.clients)
    verdict = "PASS" if per_core >= BUDGET_PER_CORE else "FAIL"
    verdict = f"   (budget >= {BUDGET_PER_CORE:.0f}/core: {verdict})" if budget else ""
    refused = ", ".join(f"{n} {c}" for n, c in sorted(load.refused().items())) or "0"
    print(
        f"  joins completed        {completed:,} in {load.elapsed:.2f} s"
        f" (tracker: total_joins {status.total_joins:,}, audience {status.audience:,})"
    )
    print(f"  joins/s                {completed / load.elapsed:,.0f}")
    others = max(load.machine_cpu - cpu - client_cpu, 0.0)
    print(
        f"  server CPU             {cpu:.2f} s ({cpu / load.elapsed:.0%} of a core);"
        f" clients {client_cpu:.2f} s in {len(load.clients)} processes;"
        f" other processes {others:.2f} s of the machine's {load.elapsed * CPUS:.1f}"
    )
    print(f"  joins per server CPU-s {per_core:,.0f}{verdict}")
    print(f"  client latency/JOIN    {latency_figures(load.latencies)}")
    print(
        f"  RETRY_AFTER answers    {load.total('retry_answers'):,}"
        f" (tracker: total_shed {status.total_shed:,},"
        f" {tracker.log_lines('shed: overloaded'):,} 'shed' log lines)"
    )
    print(
        f"  attempts               {load.total('attempts'):,}"
        f" (most for one JOIN: {max(c.max_attempts for c in load.clients)});"
        f" attempts without an answer {load.total('connection_failures'):,}"
    )
    print(f"  refused {refused}; gave up {load.total('gave_up')}")
    if any(c.pool_exhausted for c in load.clients):
        print("  WARNING: a client ran out of pre-signed JOINs before the window ended")


# -- the profile -------------------------------------------------------------------------

# (label, file suffix, function): the time under each, as a share of the busy time.
PROFILE_AREAS = [
    ("new server connection: first Initial, ServerHello..", "quic/endpoint.py", "_accept_initial"),
    (
        "aioquic receive_datagram (all packets, handshake incl.)",
        "connection.py",
        "receive_datagram",
    ),
    ("  TLS handshake messages (aioquic.tls)", "aioquic/tls.py", "handle_message"),
    ("aioquic datagrams_to_send (building packets)", "connection.py", "datagrams_to_send"),
    ("TrackerFront._answer (checks and decision)", "tracker/front.py", "_answer"),
    ("  JOIN signature check (verify_message)", "protocol/signing.py", "verify_message"),
    ("  tree decision (StreamTree.join)", "tracker/tree.py", "join"),
    ("logging calls (Logger._log, join lines incl.)", "logging/__init__.py", "_log"),
    ("socket sendto", "quic/transport.py", "send"),
    ("socket recvfrom", "quic/transport.py", "receive_batch"),
]
IDLE = "<method 'poll' of 'select.epoll' objects>"
WRAPPERS = re.compile(
    r"trio/|outcome/|runpy|<built-in method builtins.exec>|"
    r"<method '(send|throw)' of '(generator|coroutine)' objects>|"
    r"<method 'run' of '_contextvars.Context' objects>"
)

StatsKey = tuple[str, int, str]


def _function_name(key: StatsKey) -> str:
    filename, line, function = key
    if not line:
        return function
    short = re.sub(r"^.*/(site-packages|lib/python3\.\d+)/", "", filename)
    short = re.sub(r"^.*?/((meshd|protocol)/)", r"\1", short)
    return f"{short}:{line}({function})"


def profile_summary(path: Path, server_cpu: float, top: int = 10) -> None:
    """Top functions by cumulative and by own time, and time per area, as % of busy time."""
    stats = pstats.Stats(str(path))
    raw: dict[StatsKey, tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    total: float = stats.total_tt  # type: ignore[attr-defined]
    idle = sum(value[2] for key, value in raw.items() if _function_name(key) == IDLE)
    busy = total - idle
    print(
        f"  profiled {total:.2f} s of wall time: {idle:.2f} s waiting in epoll, {busy:.2f} s busy"
        f" (server CPU in the window per /proc: {server_cpu:.2f} s); shares are of busy time"
    )

    def row(seconds: float, calls: int, name: str) -> None:
        print(f"    {seconds:6.2f} s {seconds / busy:4.0%} {calls:>8,} calls  {name}")

    print(f"  top {top} by cumulative time (trio's scheduler and task wrappers left out):")
    ranked = sorted(raw.items(), key=lambda item: item[1][3], reverse=True)
    shown = [(key, value) for key, value in ranked if not WRAPPERS.search(_function_name(key))]
    for key, (_, calls, _, cumulative, _) in shown[:top]:
        row(cumulative, calls, _function_name(key))
    print(f"  top {top} by own time:")
    ranked = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)
    for key, (_, calls, own, _, _) in [item for item in ranked if item[0][2] != IDLE][:top]:
        row(own, calls, _function_name(key))
    print("  by area (cumulative; indented lines are part of the line above):")
    for label, suffix, function in PROFILE_AREAS:
        matches = [v for k, v in raw.items() if k[0].endswith(suffix) and k[2] == function]
        row(sum(v[3] for v in matches), sum(v[1] for v in matches), label)


# -- main --------------------------------------------------------------------------------


def specs_for(
    tracker: TrackerProcess,
    stream: bytes,
    clients: int,
    concurrency: int,
    joins: int,
    seconds: float | None,
    mode: str = "join",
) -> list[ClientSpec]:
    return [ClientSpec(tracker.address, stream, concurrency, joins, seconds, mode)] * clients


@dataclass
class Fresh:
    label: str
    load: Load
    status: StatusReport

    @property
    def per_cpu(self) -> float:
        return self.load.completed / self.load.server_cpu if self.load.server_cpu else math.nan

    @property
    def per_second(self) -> float:
        return self.load.completed / self.load.elapsed


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="each measuring window")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight/client")
    parser.add_argument("--pool", type=int, default=6000, help="pre-signed JOINs per client")
    parser.add_argument("--baseline", metavar="REF", help="also run the tracker of this git ref")
    parser.add_argument("--overload-concurrency", type=int, default=128)
    parser.add_argument("--overload-joins", type=int, default=300, help="per client")
    parser.add_argument("--profile-seconds", type=float, default=5.0)
    args = parser.parse_args()

    print(
        f"meshd tracker server bench: python {sys.version.split()[0]}, {CPUS} CPUs;"
        " `meshd tracker` in its own processes, clients in others, all on 127.0.0.1"
    )
    with tempfile.TemporaryDirectory(prefix="bench-tracker-") as tmp:
        workdir = Path(tmp)
        configs: list[tuple[str, tuple[str, ...], Path | None]] = []
        if args.baseline:
            configs.append((f"{args.baseline} (before)", (), checkout(workdir, args.baseline)))
        configs += [(f"--workers {n}", ("--workers", str(n)), None) for n in (0, 1, 2)]

        print(
            f"\nfresh JOINs: {args.clients} client processes x {args.concurrency} in flight"
            f" for {args.seconds:g} s each; every JOIN a new connection and a full handshake"
        )
        fresh: list[Fresh] = []
        for index, (label, extra, source) in enumerate(configs):
            with tracker_process(workdir, f"fresh{index}", *extra, source=source) as tracker:
                stream = register_stream(tracker.address)
                specs = specs_for(
                    tracker, stream, args.clients, args.concurrency, args.pool, args.seconds
                )
                load = run_load(tracker, specs)
                fresh.append(Fresh(label, load, stream_status(tracker.address, stream)))
        print(
            f"  {'tracker':<16} {'JOINs':>6} {'JOINs/s':>8} {'server CPU':>11} {'per CPU-s':>10}"
            f" {'clients CPU':>12} {'machine busy':>13} {'p50 latency':>12}"
            f" {'coordinator/JOIN':>17}"
        )
        for run in fresh:
            load = run.load
            client_cpu = sum(c.cpu for c in load.clients)
            lat = statistics.median(load.latencies) * 1e3 if load.latencies else math.nan
            print(
                f"  {run.label:<16} {load.completed:>6,} {run.per_second:>8,.0f}"
                f" {load.server_cpu:>9.2f} s {run.per_cpu:>10,.0f} {client_cpu:>10.2f} s"
                f" {load.machine_cpu / (load.elapsed * CPUS):>12.0%} {lat:>9.1f} ms"
                f" {load.coordinator_cpu / max(load.completed, 1) * 1e6:>14,.0f} us"
            )
            if run.status.total_joins != load.completed or load.total("gave_up"):
                print(
                    f"    ! tracker counted {run.status.total_joins} joins; refused"
                    f" {load.refused()}; RETRY_AFTER answers {load.total('retry_answers')};"
                    f" gave up {load.total('gave_up')}"
                )
        print(
            "  (coordinator/JOIN: CPU of the tracker's own process per JOIN; with workers,"
            " the decisions and the link to the workers)"
        )
        one, two = fresh[-2], fresh[-1]
        best = max(run.per_cpu for run in fresh if run.label.startswith("--workers"))
        print(
            f"  fresh JOINs per server CPU-s: {best:,.0f}"
            f" (budget >= {BUDGET_PER_CORE:,.0f}: {verdict(best >= BUDGET_PER_CORE)})"
        )
        scaling = two.per_second / one.per_second
        print(
            f"  2 workers / 1 worker, JOINs/s: {scaling:.2f}x (budget >= {BUDGET_SCALING}x:"
            f" {verdict(scaling >= BUDGET_SCALING)}); per CPU-s"
            f" {two.per_cpu / one.per_cpu:.2f}x. The clients run on the same {CPUS} cores"
            " and need about as much CPU per JOIN as the tracker, so JOINs/s here is"
            " bounded by the machine (see 'machine busy')."
        )
        per_worker = one.per_cpu
        cores = SEED_JOINS_PER_S / per_worker
        print(
            f"  the seed's {SEED_JOINS_PER_S:,.0f} JOINs/s: at {per_worker:,.0f} JOINs per CPU-s"
            f" (--workers 1, coordinator included) that is {SEED_JOINS_PER_S:,.0f} /"
            f" {per_worker:,.0f} = {cores:.1f} cores busy; with workers at 70 % load,"
            f" {math.ceil(cores / 0.7)} workers on as many cores"
        )

        print(
            f"\nresumed: {args.clients} client processes x {args.concurrency} nodes, each"
            f" with its own endpoint, REFRESHing on a new connection for {args.seconds:g} s"
            " (resumed TLS session, REFRESH in 0-RTT); --workers 1"
        )
        with tracker_process(workdir, "resumed", "--workers", "1") as tracker:
            stream = register_stream(tracker.address)
            specs = specs_for(
                tracker, stream, args.clients, args.concurrency, 0, args.seconds, "refresh"
            )
            load = run_load(tracker, specs)
        per_cpu = load.completed / load.server_cpu
        print(
            f"  {load.completed:,} REFRESHes in {load.elapsed:.1f} s, {load.server_cpu:.2f} s"
            f" server CPU: {per_cpu:,.0f} per CPU-s (budget >= {BUDGET_RESUMED:,.0f}:"
            f" {verdict(per_cpu >= BUDGET_RESUMED)}); {per_cpu / one.per_cpu:.2f}x a fresh"
            f" JOIN; refused {load.refused() or 0}; p50 latency"
            f" {statistics.median(load.latencies) * 1e3 if load.latencies else math.nan:.1f} ms"
        )

        print(
            f"\nshed: --max-pending 0 --workers 1, {args.clients} client processes x"
            f" {args.concurrency} connections in flight for {args.seconds:g} s, all refused"
            " before the handshake"
        )
        with tracker_process(workdir, "shed", "--max-pending", "0", "--workers", "1") as tracker:
            stream_key = Ed25519PrivateKey.generate()
            specs = specs_for(
                tracker, key_id(stream_key), args.clients, args.concurrency, 0, args.seconds,
                "refused",
            )  # fmt: skip
            load = run_load(tracker, specs)
        per_refusal = load.server_cpu / max(load.completed, 1)
        share = per_refusal * one.per_cpu
        print(
            f"  {load.completed:,} refusals, {load.server_cpu:.2f} s server CPU:"
            f" {per_refusal * 1e6:.0f} us each = {share:.1%} of a fresh JOIN's"
            f" {1e6 / one.per_cpu:.0f} us (budget <= {BUDGET_SHED_SHARE:.0%}:"
            f" {verdict(share <= BUDGET_SHED_SHARE)})"
        )

        print(
            f"\noverload: --max-pending 8; {args.clients} client processes x"
            f" {args.overload_concurrency} JOINs in flight; {args.overload_joins} JOINs each,"
            " all to complete"
        )
        with tracker_process(workdir, "overload", "--max-pending", "8") as tracker:
            stream = register_stream(tracker.address)
            specs = specs_for(
                tracker,
                stream,
                args.clients,
                args.overload_concurrency,
                args.overload_joins,
                None,
            )
            load = run_load(tracker, specs)
            report(load, stream_status(tracker.address, stream), tracker, budget=False)
            wanted = args.clients * args.overload_joins
            outcome = "all completed" if load.completed == wanted else "NOT ALL COMPLETED"
            print(f"  {load.completed:,} of {wanted:,} JOINs answered ASSIGNED: {outcome}")

        print(
            f"\nprofile: the fresh load for {args.profile_seconds:g} s, a one-process tracker"
            " (--workers 0) under cProfile"
        )
        profile = workdir / "tracker.prof"
        with tracker_process(workdir, "profile", "--workers", "0", profile=profile) as tracker:
            stream = register_stream(tracker.address)
            specs = specs_for(
                tracker, stream, args.clients, args.concurrency, args.pool, args.profile_seconds
            )
            load = run_load(tracker, specs)
            print(
                f"  {load.completed:,} joins, {load.completed / load.elapsed:,.0f}/s under the"
                f" profiler ({load.completed / load.server_cpu:,.0f} per server CPU-s)"
            )
        profile_summary(profile, load.server_cpu)


if __name__ == "__main__":
    main()
