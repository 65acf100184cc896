"""The lossy UDP proxy the fault scenarios put between parents and children."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.udp_proxy import Address, UdpProxy, bound_udp_port


@contextmanager
def udp_socket() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    try:
        yield sock
    finally:
        sock.close()


def drain(sock: socket.socket, quiet: float = 0.2) -> list[tuple[bytes, Address]]:
    """Every datagram that arrives until none has for `quiet` seconds."""
    got = []
    sock.settimeout(quiet)
    try:
        while True:
            got.append(sock.recvfrom(65535))
    except TimeoutError:
        return got


def test_drops_about_the_asked_share_each_way_and_counts_what_it_did() -> None:
    with UdpProxy(loss=0.1, seed=1) as proxy, udp_socket() as node, udp_socket() as client:
        front = proxy.add_front(node.getsockname())
        arrived, echoed = [], []
        for batch in range(20):  # in batches, so no socket buffer overflows
            for i in range(100):
                client.sendto(b"%d" % (batch * 100 + i), front)
            for payload, source in drain(node, 0.05):
                arrived.append(payload)
                node.sendto(payload, source)  # back through the proxy
            echoed += [payload for payload, _ in drain(client, 0.05)]
        echoed += [payload for payload, _ in drain(client)]
    assert proxy.forwarded["to_node"] + proxy.dropped["to_node"] == 2000
    assert proxy.forwarded["to_node"] == len(arrived)
    assert proxy.forwarded["to_client"] + proxy.dropped["to_client"] == len(arrived)
    assert proxy.forwarded["to_client"] == len(echoed)
    # The standard deviation of the rate over 2000 datagrams at 10 % is 0.7 %.
    assert 0.08 < proxy.loss_rate("to_node") < 0.12
    assert 0.08 < proxy.loss_rate("to_client") < 0.12
    assert echoed == sorted(echoed, key=int)  # no jitter: never reordered


def test_each_client_gets_its_own_upstream_and_only_its_own_replies() -> None:
    with (
        UdpProxy() as proxy,
        udp_socket() as node,
        udp_socket() as first,
        udp_socket() as second,
    ):
        front = proxy.add_front(node.getsockname())
        first.sendto(b"first", front)
        second.sendto(b"second", front)
        sources = {}
        for _ in range(2):
            payload, source = node.recvfrom(100)
            sources[payload] = source
            node.sendto(b"re " + payload, source)
        assert sources[b"first"] != sources[b"second"]
        assert first.recvfrom(100) == (b"re first", front)
        assert second.recvfrom(100) == (b"re second", front)
        assert proxy.clients == 2


def test_a_front_without_a_backend_drops_until_it_has_one() -> None:
    with UdpProxy() as proxy, udp_socket() as node, udp_socket() as client:
        front = proxy.add_front()
        client.sendto(b"early", front)
        assert drain(node) == []
        proxy.set_backend(front, node.getsockname())
        client.sendto(b"late", front)
        assert node.recvfrom(100)[0] == b"late"
    assert proxy.unrouted == 1


@pytest.mark.parametrize("jitter", [0.0, 0.05])
def test_delay_is_honoured_and_only_jitter_reorders(jitter: float) -> None:
    delay = 0.1
    with (
        UdpProxy(delay=delay, jitter=jitter, seed=3) as proxy,
        udp_socket() as node,
        udp_socket() as client,
    ):
        front = proxy.add_front(node.getsockname())
        sent = {}
        for i in range(30):
            sent[i] = time.monotonic()
            client.sendto(b"%d" % i, front)
            time.sleep(0.002)
        arrivals = []
        for _ in range(30):
            payload, _ = node.recvfrom(100)
            arrivals.append((int(payload), time.monotonic()))
    held = [at - sent[i] for i, at in arrivals]
    assert min(held) >= delay
    assert max(held) < delay + jitter + 0.2  # a loaded machine's scheduling slack
    order = [i for i, _ in arrivals]
    assert (order == sorted(order)) == (jitter == 0)  # seed 3 does reorder with jitter


def test_stop_joins_the_thread_even_with_datagrams_still_held() -> None:
    proxy = UdpProxy(delay=30.0).start()
    with udp_socket() as node, udp_socket() as client:
        client.sendto(b"held", proxy.add_front(node.getsockname()))
        time.sleep(0.1)
        started = time.monotonic()
        proxy.stop()
        assert time.monotonic() - started < 1.0
        assert not proxy.running
        assert drain(node) == []


def test_bound_udp_port_reads_another_process_s_port_from_proc() -> None:
    script = (
        "import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
        " s.bind(('127.0.0.1', 0)); print(s.getsockname()[1], flush=True); time.sleep(30)"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        assert bound_udp_port(child.pid) == port
    finally:
        child.kill()
        child.wait()
