"""Tracker worker processes: many cores do the handshakes, one process decides.

A QUIC handshake in aioquic costs about twenty times a tree decision, so a tracker host
runs N worker processes that share its UDP port (SO_REUSEPORT: the kernel spreads the
clients across them by address). Each worker runs a `TrackerFront`: handshakes, decoding,
and the checks that need no tree (skew, signature, token). A request that passes goes,
decoded and checked, over a Unix socket to the coordinator: the process that called
`serve_tracker`, which owns the `Tracker` and so every stream's tree, and answers it
with `Tracker.decide`. One process holds each tree, so decisions are made one at a time
on one consistent view, exactly as with no workers; nothing is shared or locked.

The link carries length-prefixed msgpack arrays. The coordinator sends INIT (the key,
the config with the per-network limits split among the workers, the log levels) and the
worker answers READY once it serves; then REQUEST (id, encoded request, the sender's
source network) one way and RESPONSE (id, encoded response) back, and SHED (how many
requests were shed) now and then. A worker whose link closes exits; a worker that dies
is started again.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import socket
import struct
import subprocess
import sys
from typing import Any

import msgpack
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from meshd.quic import UdpTransport, open_quic_endpoint, raw_public_key
from meshd.quic.transport import bind_udp
from meshd.tracker.front import TrackerFront, collect_garbage_less_often, endpoint_config
from meshd.tracker.service import Tracker, TrackerConfig
from protocol import decode_message, encode_message
from protocol.messages import TrackerRequest, TrackerResponse

logger = logging.getLogger("meshd.tracker")

INIT, READY, REQUEST, RESPONSE, SHED = range(5)
MAX_FRAME = 1 << 20  # a MOVED of 1,024 moves is well under this
STARTUP_TIMEOUT = 30.0
RESTART_DELAY = 1.0
SHED_REPORT_INTERVAL = 0.5
_LENGTH = struct.Struct("!I")
# Not `-m meshd.tracker.workers`: the package imports this module before running it.
_WORKER_MAIN = "from meshd.tracker.workers import main; main()"


class LinkClosed(Exception):
    """The other process closed the link (or died)."""


class Link:
    """One end of the coordinator <-> worker socket: whole msgpack arrays each way."""

    def __init__(self, sock: socket.socket) -> None:
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._buffer = bytearray()

    async def send(self, message: list[Any]) -> None:
        data = msgpack.packb(message, use_bin_type=True)
        await self._stream.send_all(_LENGTH.pack(len(data)) + data)

    async def receive(self) -> list[Any]:
        while True:
            if len(self._buffer) >= _LENGTH.size:
                (size,) = _LENGTH.unpack_from(self._buffer)
                if size > MAX_FRAME:
                    raise ValueError(f"worker link frame of {size} bytes")
                end = _LENGTH.size + size
                if len(self._buffer) >= end:
                    message = msgpack.unpackb(bytes(self._buffer[_LENGTH.size : end]), raw=False)
                    del self._buffer[:end]
                    if not isinstance(message, list) or not message:
                        raise ValueError("worker link message is not an array")
                    return message
            try:
                data = await self._stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                raise LinkClosed
            self._buffer += data

    async def aclose(self) -> None:
        await self._stream.aclose()


# -- the coordinator -----------------------------------------------------------------------


async def serve_workers(
    tracker: Tracker,
    key: Ed25519PrivateKey,
    host: str,
    port: int,
    count: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start `count` workers on host:port and answer their requests with `tracker`."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError("tracker workers need SO_REUSEPORT (Linux); run without workers")
    first = await bind_udp(host, port, reuse_port=True)
    host, port = first.getsockname()[:2]
    config = worker_share(tracker.config, count)
    async with trio.open_nursery() as nursery:
        for index in range(count):
            sock = first if index == 0 else await bind_udp(host, port, reuse_port=True)
            await nursery.start(_keep_worker, tracker, config, key, host, port, index, sock)
        logger.info("%d tracker workers serve %s:%d", count, host, port)
        task_status.started((host, port))


def worker_share(config: TrackerConfig, workers: int) -> TrackerConfig:
    """What each of `workers` workers enforces per source network. The kernel spreads a
    network's connections over all of them (by source port), so each takes an even share
    of the JOIN and handshake rates and bursts (bursts rounded up): together they allow
    what `config` says, not that many times over. A network whose connections happen to
    land unevenly gets less at once, and its nodes retry after RETRY_AFTER."""
    return dataclasses.replace(
        config,
        joins_per_network_s=config.joins_per_network_s / workers,
        join_burst_per_network=math.ceil(config.join_burst_per_network / workers),
        handshakes_per_network_s=config.handshakes_per_network_s / workers,
        handshake_burst_per_network=math.ceil(config.handshake_burst_per_network / workers),
    )


async def _keep_worker(
    tracker: Tracker,
    config: TrackerConfig,
    key: Ed25519PrivateKey,
    host: str,
    port: int,
    index: int,
    sock: socket.socket,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run worker `index` with `config`, and start it again (on a new socket) whenever it
    dies."""
    while True:
        status = await _run_worker(tracker, config, key, sock, index, task_status)
        task_status = trio.TASK_STATUS_IGNORED
        logger.error(
            "tracker worker %d exited (status %s); starting another in %g s",
            index,
            status,
            RESTART_DELAY,
        )
        await trio.sleep(RESTART_DELAY)
        sock = await bind_udp(host, port, reuse_port=True)


async def _run_worker(
    tracker: Tracker,
    config: TrackerConfig,
    key: Ed25519PrivateKey,
    sock: socket.socket,
    index: int,
    task_status: trio.TaskStatus[None],
) -> int | None:
    """One worker process, until it exits; returns its exit status."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = (sock.fileno(), theirs.fileno())
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", _WORKER_MAIN, *map(str, fds)],
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
        )
    finally:
        # The worker holds them now: an open copy here would keep a socket in the
        # port's group that nobody reads, and the link open after the worker died.
        sock.close()
        theirs.close()
    link = Link(ours)
    try:
        with trio.fail_after(STARTUP_TIMEOUT):
            levels = [logging.getLogger(name).getEffectiveLevel() for name in ("meshd", "quic")]
            await link.send([INIT, _private_bytes(key), _config_fields(config), levels])
            if (await link.receive())[0] != READY:
                raise RuntimeError(f"tracker worker {index} did not start")
        task_status.started()
        await _answer(tracker, link)
    except LinkClosed:
        pass
    finally:
        with trio.CancelScope(shield=True):
            await link.aclose()  # the worker exits when its link closes
            with trio.move_on_after(5.0):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
    return process.returncode


async def _answer(tracker: Tracker, link: Link) -> None:
    while True:
        message = await link.receive()
        now = trio.current_time()
        if message[0] == REQUEST:
            _, request_id, data, network = message
            response = tracker.decide(decode_message(data), now, network)  # type: ignore[arg-type]
            await link.send([RESPONSE, request_id, encode_message(response)])
        elif message[0] == SHED:
            tracker.shed(now, message[1])


def _private_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def _config_fields(config: TrackerConfig) -> dict[str, Any]:
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    fields["host_keys"] = [raw_public_key(k) for k in config.host_keys]
    return fields


# -- a worker ------------------------------------------------------------------------------


class Coordinator:
    """The worker's view of the coordinator: `decide` sends a request and waits."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self._ids = itertools.count()
        self._waiting: dict[int, tuple[trio.Event, list[TrackerResponse]]] = {}
        self._send_lock = trio.Lock()
        self._shed = 0

    async def decide(self, request: TrackerRequest, network: str) -> TrackerResponse:
        request_id = next(self._ids)
        done, answer = self._waiting[request_id] = (trio.Event(), [])
        try:
            async with self._send_lock:
                await self._link.send([REQUEST, request_id, encode_message(request), network])
            await done.wait()
        finally:
            del self._waiting[request_id]
        return answer[0]

    def count_shed(self) -> None:
        self._shed += 1

    async def run(self) -> None:
        """Hand each RESPONSE to its request; return when the coordinator goes away."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._report_shed)
            try:
                while True:
                    _, request_id, data = await self._link.receive()
                    waiting = self._waiting.get(request_id)
                    if waiting is not None:  # else its connection gave up waiting
                        waiting[1].append(decode_message(data))  # type: ignore[arg-type]
                        waiting[0].set()
            except LinkClosed:
                nursery.cancel_scope.cancel()

    async def _report_shed(self) -> None:
        while True:
            await trio.sleep(SHED_REPORT_INTERVAL)
            if self._shed:
                count, self._shed = self._shed, 0
                async with self._send_lock:
                    await self._link.send([SHED, count])


async def worker(udp_fd: int, link_fd: int) -> None:
    """A worker process: serve the port until the coordinator's link closes."""
    link = Link(socket.socket(fileno=link_fd))
    kind, private, fields, (level, quic_level) = await link.receive()
    if kind != INIT:
        raise RuntimeError("the coordinator did not start with INIT")
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s.%(msecs)03d meshd worker {os.getpid()}: %(message)s",
        datefmt="%H:%M:%S",
    )
    # As in the coordinator: `meshd tracker` keeps aioquic's per-connection lines (three
    # for every request) out of the log unless --verbose.
    logging.getLogger("quic").setLevel(quic_level)
    fields["host_keys"] = tuple(Ed25519PublicKey.from_public_bytes(k) for k in fields["host_keys"])
    config = TrackerConfig(**fields)
    key = Ed25519PrivateKey.from_private_bytes(private)
    transport = UdpTransport(socket.socket(fileno=udp_fd))
    coordinator = Coordinator(link)
    async with (
        open_quic_endpoint(key, config=endpoint_config(config), transport=transport) as endpoint,
        trio.open_nursery() as nursery,
    ):
        front = TrackerFront(config, endpoint, coordinator.decide, coordinator.count_shed)
        await nursery.start(front.serve)
        await link.send([READY])
        await coordinator.run()
        nursery.cancel_scope.cancel()


def main() -> None:
    """The worker process's entry point: its arguments are the two inherited fds."""
    udp_fd, link_fd = (int(arg) for arg in sys.argv[1:3])
    collect_garbage_less_often()
    trio.run(worker, udp_fd, link_fd)
