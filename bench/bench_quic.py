"""meshd QUIC endpoint figures for this machine.

Run: .venv/bin/python bench/bench_quic.py

The server runs in a child process and the client in this one, so each side
has its own interpreter (and core, on a multi-core machine). Prints echo round
trip p50/p99 for 160-byte datagrams and 160-byte stream messages, handshakes/s
the server completes, UDP packets/s per core of server CPU during a bulk
stream echo, and what the bare system calls (sendto and recvfrom, no QUIC) cost per
datagram: the most that batching sends (sendmmsg, GSO) could save.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import socket
import statistics
import sys
import time
from multiprocessing.connection import Connection

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.quic import QuicConn, QuicStream, open_quic_endpoint

MESSAGE = 160
ROUND_TRIPS = 3000
HANDSHAKE_SECONDS = 5.0
HANDSHAKE_CONCURRENCY = 16
BULK_BYTES = 32 * 1024 * 1024
RAW_DATAGRAMS = 50_000


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# Server (child process)


async def _echo_stream(stream: QuicStream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


async def _serve_conn(conn: QuicConn) -> None:
    async def datagrams() -> None:
        while True:
            conn.send_datagram(await conn.receive_datagram())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(datagrams)
        while True:
            nursery.start_soon(_echo_stream, await conn.accept_stream())


async def _server(pipe: Connection) -> None:
    async with (
        open_quic_endpoint(Ed25519PrivateKey.generate(), max_connections=4096) as endpoint,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(endpoint.serve, _serve_conn)
        pipe.send(endpoint.address)
        while (await trio.to_thread.run_sync(pipe.recv)) == "snapshot":
            stats = endpoint.stats
            pipe.send(
                {
                    "cpu": cpu_seconds(),
                    "packets": stats.datagrams_received + stats.datagrams_sent,
                }
            )
        nursery.cancel_scope.cancel()


def _server_main(pipe: Connection) -> None:
    trio.run(_server, pipe)


# Client (this process)


def percentiles(samples: list[float]) -> str:
    cuts = statistics.quantiles(samples, n=100)
    return f"p50 {cuts[49] * 1e3:.3f} ms   p99 {cuts[98] * 1e3:.3f} ms"


async def snapshot(pipe: Connection) -> dict[str, float]:
    pipe.send("snapshot")
    result: dict[str, float] = await trio.to_thread.run_sync(pipe.recv)
    return result


async def bench(pipe: Connection, address: tuple[str, int]) -> None:
    async with open_quic_endpoint(Ed25519PrivateKey.generate()) as client:
        async with client.connect(address) as conn:
            payload = os.urandom(MESSAGE)
            samples = []
            for _ in range(ROUND_TRIPS):
                start = time.perf_counter()
                conn.send_datagram(payload)
                await conn.receive_datagram()
                samples.append(time.perf_counter() - start)
            print(f"datagram echo RTT, {MESSAGE} B, {ROUND_TRIPS} trips: {percentiles(samples)}")

            stream = await conn.open_stream()
            samples = []
            for _ in range(ROUND_TRIPS):
                start = time.perf_counter()
                await stream.send_all(payload)
                received = 0
                while received < MESSAGE:
                    received += len(await stream.receive_some())
                samples.append(time.perf_counter() - start)
            print(f"stream echo RTT,   {MESSAGE} B, {ROUND_TRIPS} trips: {percentiles(samples)}")
            await stream.send_eof()

            # Bulk echo: packets/s per core of server CPU.
            before = await snapshot(pipe)
            bulk = await conn.open_stream()
            chunk = os.urandom(64 * 1024)
            start = time.perf_counter()
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    for _ in range(BULK_BYTES // len(chunk)):
                        await bulk.send_all(chunk)
                    await bulk.send_eof()

                nursery.start_soon(send)
                echoed = 0
                while data := await bulk.receive_some():
                    echoed += len(data)
            elapsed = time.perf_counter() - start
            after = await snapshot(pipe)
            assert echoed == BULK_BYTES
            packets = after["packets"] - before["packets"]
            cpu = after["cpu"] - before["cpu"]
            rate = 2 * BULK_BYTES / elapsed / 1e6
            print(
                f"bulk stream echo {BULK_BYTES >> 20} MiB: {rate:.1f} MB/s both ways;"
                f" server {packets / elapsed:,.0f} packets/s,"
                f" {packets / cpu:,.0f} packets/s per core (server CPU {cpu:.2f} s)"
            )

        # Handshakes: as many as the server completes in HANDSHAKE_SECONDS.
        before = await snapshot(pipe)
        done = 0
        start = time.perf_counter()
        deadline = trio.current_time() + HANDSHAKE_SECONDS

        async def dial() -> None:
            nonlocal done
            while trio.current_time() < deadline:
                conn = await client.connect(address)
                done += 1
                await conn.aclose()

        async with trio.open_nursery() as nursery:
            for _ in range(HANDSHAKE_CONCURRENCY):
                nursery.start_soon(dial)
        elapsed = time.perf_counter() - start
        after = await snapshot(pipe)
        cpu = after["cpu"] - before["cpu"]
        print(
            f"handshakes: {done / elapsed:,.0f}/s with {HANDSHAKE_CONCURRENCY} concurrent dialers"
            f" (client in this process, server in another); server CPU {cpu / elapsed:.0%}"
            f" of a core, {done / cpu:,.0f} handshakes per server CPU second"
        )


def raw_udp_cost() -> float:
    """CPU seconds per 1,100-byte datagram for a bare sendto plus the recvfrom that
    drains it, both on loopback in this process (the kernel's delivery included)."""
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
    ):
        receiver.bind(("127.0.0.1", 0))
        receiver.setblocking(False)
        address = receiver.getsockname()
        data = os.urandom(1100)
        start = cpu_seconds()
        for i in range(RAW_DATAGRAMS):
            sender.sendto(data, address)
            if i % 32 == 31:
                while True:
                    try:
                        receiver.recvfrom(2048)
                    except BlockingIOError:
                        break
        return (cpu_seconds() - start) / RAW_DATAGRAMS


def main() -> None:
    raw = raw_udp_cost()
    parent, child = multiprocessing.get_context("spawn").Pipe()
    server = multiprocessing.get_context("spawn").Process(target=_server_main, args=(child,))
    server.start()
    try:
        address = parent.recv()
        print(f"meshd QUIC bench: python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
        trio.run(bench, parent, address)
        print(
            f"bare UDP, no QUIC: sendto + recvfrom of a 1,100 B datagram {raw * 1e6:.1f} us"
            " of CPU (the bound on what batched sends can save per datagram)"
        )
        parent.send("stop")
    finally:
        server.join(timeout=10)
        if server.is_alive():
            server.kill()


if __name__ == "__main__":
    main()
