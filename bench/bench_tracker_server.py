"""Tracker server JOINs/s over real QUIC on loopback: throughput, latency, CPU, overload.

Run: .venv/bin/python bench/bench_tracker_server.py [--seconds 10] [--clients 2]

Budget (the issue): the tracker server answers >= 300 JOINs per second per core of its CPU.

The tracker is the real `meshd tracker` command in its own process, with its default
logging (one INFO line per join, to a log file). Client processes each own one QUIC
endpoint and run many JOINs at once through `ask_tracker`: every JOIN is a fresh
connection, a full handshake and one request/response, as a node does it. Node keys and
signed JOINs (time_ms = now) are made before the clock starts. Server CPU is read from
/proc/<pid>/stat; "per core" is JOINs per second of server CPU.

Three runs, each against a fresh tracker with one registered stream:
  throughput  default --max-pending, a fixed window, few enough JOINs in flight that
              nothing is shed (then one JOIN at a time, for the latency without queueing);
  overload    --max-pending 8 and many more JOINs in flight; a fixed number of JOINs
              that must all complete by backing off after RETRY_AFTER;
  profile     the throughput load against a tracker under cProfile: where its CPU goes.
(bench_tracker_core.py measures the tree decisions alone, in process.)
"""

from __future__ import annotations

import argparse
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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd import tracker_client
from meshd.quic import open_quic_endpoint
from meshd.tracker_client import TrackerRefused, ask_tracker, now_ms
from protocol import (
    Ack,
    Assigned,
    ErrorCode,
    ExchangeState,
    Join,
    Register,
    StatusReport,
    StatusRequest,
    TrackerExchange,
    key_id,
    sign_message,
)

BUDGET_PER_CORE = 300.0
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
        """User + system CPU of the tracker process so far (fields 14 and 15 of stat)."""
        stat = Path(f"/proc/{self.popen.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def log_lines(self, pattern: str) -> int:
        text = self.log.read_text(errors="replace")
        return len(re.findall(pattern, text, flags=re.MULTILINE))


@contextmanager
def tracker_process(
    workdir: Path, name: str, *extra: str, profile: Path | None = None
) -> Iterator[TrackerProcess]:
    """`meshd tracker` on 127.0.0.1, port 0; stopped with SIGINT (killed if it lingers)."""
    command = [sys.executable]
    command += ["-m", "meshd"] if profile is None else ["-c", PROFILED_MESHD, str(profile)]
    command += ["tracker", "--listen", "127.0.0.1:0", "--refresh", "180", *extra]
    log = workdir / f"{name}.log"
    with log.open("wb") as log_file:
        popen = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=log_file, stdin=subprocess.DEVNULL
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
    """A client process: sign its JOINs, say ready, wait for "go", run, send the result."""
    tracker_client.TrackerExchange = CountingExchange  # type: ignore[attr-defined]
    joins = make_joins(spec.stream, spec.joins)
    pipe.send("ready")
    if pipe.recv() != "go":
        return
    cpu = process_cpu()
    result = trio.run(drive, spec, joins)
    result.cpu = process_cpu() - cpu
    pipe.send(dataclasses.asdict(result))


# -- a load run --------------------------------------------------------------------------


@dataclass
class Load:
    clients: list[ClientResult]
    elapsed: float
    server_cpu: float
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
        start = time.perf_counter()
        for pipe in pipes:
            pipe.send("go")
        results = []
        for pipe in pipes:
            if not pipe.poll(RESULT_TIMEOUT):
                raise RuntimeError("a client process did not finish")
            results.append(ClientResult(**pipe.recv()))
        elapsed = time.perf_counter() - start
        server_cpu, machine_cpu = (
            tracker.cpu_seconds() - cpu_before,
            machine_busy() - machine_before,
        )
        tracker.window(started=False)
        return Load(results, elapsed, server_cpu, machine_cpu)
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
    ("Tracker.handle (all requests)", "tracker/service.py", "handle"),
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
) -> list[ClientSpec]:
    return [ClientSpec(tracker.address, stream, concurrency, joins, seconds)] * clients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="throughput window")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--concurrency", type=int, default=32, help="JOINs in flight/client")
    parser.add_argument("--pool", type=int, default=8000, help="pre-signed JOINs per client")
    parser.add_argument("--overload-concurrency", type=int, default=128)
    parser.add_argument("--overload-joins", type=int, default=500, help="per client")
    parser.add_argument("--profile-seconds", type=float, default=6.0)
    args = parser.parse_args()

    print(
        f"meshd tracker server bench: python {sys.version.split()[0]}, {os.cpu_count()} CPUs;"
        " `meshd tracker` in its own process, clients in others, all on 127.0.0.1"
    )
    with tempfile.TemporaryDirectory(prefix="bench-tracker-") as tmp:
        workdir = Path(tmp)

        print(
            f"\nthroughput: {args.clients} client processes x {args.concurrency} JOINs in flight"
            f" for {args.seconds:g} s; default --max-pending (256)"
        )
        with tracker_process(workdir, "throughput") as tracker:
            stream = register_stream(tracker.address)
            specs = specs_for(
                tracker, stream, args.clients, args.concurrency, args.pool, args.seconds
            )
            load = run_load(tracker, specs)
            report(load, stream_status(tracker.address, stream), tracker)
            idle = run_load(tracker, specs_for(tracker, stream, 1, 1, args.pool, IDLE_SECONDS))
            print(
                f"  one JOIN at a time     {latency_figures(idle.latencies)}"
                f" ({idle.completed} JOINs in {IDLE_SECONDS:g} s, no queueing)"
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
            f"\nprofile: the throughput load for {args.profile_seconds:g} s, tracker under cProfile"
        )
        profile = workdir / "tracker.prof"
        with tracker_process(workdir, "profile", profile=profile) as tracker:
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
