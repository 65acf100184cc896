"""The `meshd` command as users run it: help, errors, and a whole room of real processes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd import __version__
from meshd.keys import load_key, write_new_key
from protocol import issue_token, key_from_text, key_id, key_to_text, token_to_text
from tests.procs import MESHD, cluster
from tests.room import DATA, SAMPLE, assert_gap_free_tail, packets_of

TONE = DATA / "tone12.opus"  # long enough for ten processes to start and join

COMMANDS = ["keygen", "tracker", "origin", "listen", "status", "token", "demo"]


def meshd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MESHD, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(command: str | None) -> None:
    result = meshd(*([command] if command else []), "--help")
    assert result.returncode == 0
    assert "usage: meshd" in result.stdout
    if command is None:
        assert all(name in result.stdout for name in COMMANDS)


def test_version() -> None:
    result = meshd("--version")
    assert result.returncode == 0 and result.stdout == f"meshd {__version__}\n"


def test_keygen_writes_a_private_key_file_and_prints_its_id(tmp_path: Path) -> None:
    key = tmp_path / "origin.key"
    result = meshd("keygen", "--out", str(key))
    assert result.returncode == 0
    assert len(result.stdout.strip()) == 52 and result.stdout.count("\n") == 1
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    again = meshd("keygen", "--out", str(key))
    assert again.returncode == 2 and "--force" in again.stderr


@pytest.fixture(scope="module")
def origin_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "origin.key"
    write_new_key(path)
    return path


@pytest.fixture
def busy_port() -> Iterator[str]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


STREAM = "a" * 52
LISTEN = ["listen", "--tracker", "127.0.0.1:9", "--stream", STREAM]


@pytest.mark.parametrize(
    "args, code, message",
    [
        ([*LISTEN[:2], "nowhere", *LISTEN[3:], "--output", "-"], 2, "HOST:PORT"),
        ([*LISTEN[:-1], "short", "--output", "-"], 2, "52"),
        (
            ["origin", "--tracker", "127.0.0.1:1", "--key", "/nonexistent.key", "--input", "-"],
            2,
            "meshd keygen",
        ),
        (["status", "--tracker", "127.0.0.1:1"], 2, "--stream"),
        (["tracker", "--joins-per-network", "-1"], 2, "not a rate per second"),
        (["tracker", "--join-burst", "0"], 2, "at least 1"),
        (
            [*LISTEN, "--output", os.devnull, "--join-timeout", "1"],
            1,
            "is the tracker at 127.0.0.1:9 up",
        ),
        ([*LISTEN, "--output", "/nonexistent/out.opus"], 2, "the folder /nonexistent does not"),
        ([*LISTEN, "--output", "{tmp}"], 2, "that is a folder"),
        ([*LISTEN, "--output", "-", "--listen", "{busy}"], 2, "cannot listen on {busy}"),
        ([*LISTEN[:2], "no-such-host.invalid:4433", *LISTEN[3:]], 2, "cannot resolve the host"),
        ([*LISTEN, "--output", "-", "--token", "!!"], 2, "--token needs --key"),
        ([*LISTEN, "--output", "-", "--key", "{key}", "--token", "!!"], 2, "--token is not an"),
        (["origin", *LISTEN[1:3], "--key", "{key}", "--input", os.devnull], 2, "it is empty"),
        (["origin", *LISTEN[1:3], "--key", "{key}", "--input", "/nonexistent"], 2, "no such"),
        (["origin", *LISTEN[1:3], "--key", "{key}", "--input", "-", "--capacity", "0"], 2, "1 to"),
        (["origin", *LISTEN[1:3], "--key", str(TONE), "--input", "-"], 2, "is not a key file"),
    ],
)
def test_errors_are_one_clear_line_and_a_nonzero_exit(
    args: list[str],
    code: int,
    message: str,
    origin_key: Path,
    busy_port: str,
    tmp_path: Path,
) -> None:
    def fill(text: str) -> str:
        return text.format(tmp=tmp_path, busy=busy_port, key=origin_key)

    result = meshd(*map(fill, args))
    assert result.returncode == code, result.stderr
    assert fill(message) in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and fill(message) in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "MalformedFraming" not in result.stderr


def _token_for(key_file: Path, host: Ed25519PrivateKey) -> str:
    """A token `host` signed for the listener whose key is `key_file`, in STREAM."""
    node = key_id(load_key(key_file))
    data = issue_token(host, key_from_text(STREAM), node, int((time.time() + 600) * 1000))
    return token_to_text(data)


def test_a_listener_refuses_a_token_its_host_id_did_not_sign(origin_key: Path) -> None:
    host, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    token = _token_for(origin_key, host)
    args = [*LISTEN, "--output", "-", "--key", str(origin_key), "--token", token]
    result = meshd(*args, "--host-id", key_to_text(key_id(other)))
    assert result.returncode == 2, result.stderr
    assert "--token is not signed by any host given with --host-id" in result.stderr


def test_a_relaying_listener_with_a_token_but_no_host_id_warns_it_feeds_anyone(
    origin_key: Path,
) -> None:
    """It holds a token, so the stream is protected; without the host's id it cannot
    check its own children's tokens, and would feed anyone who reaches it."""
    host = Ed25519PrivateKey.generate()
    args = [*LISTEN, "--output", os.devnull, "--key", str(origin_key), "--join-timeout", "1"]
    args += ["--token", _token_for(origin_key, host)]
    warned = "was given no --host-id: it relays to any child"
    relaying = meshd(*args)
    assert relaying.returncode == 1 and warned in relaying.stderr, relaying.stderr
    checking = meshd(*args, "--host-id", key_to_text(key_id(host)))
    assert checking.returncode == 1 and warned not in checking.stderr, checking.stderr
    leaf = meshd(*args, "--max-children", "0")
    assert leaf.returncode == 1 and warned not in leaf.stderr, leaf.stderr


def test_an_origin_whose_tracker_does_not_answer_says_so_and_fails(
    origin_key: Path, tmp_path: Path
) -> None:
    stats = tmp_path / "origin.json"
    args = ["--key", str(origin_key), "--input", str(TONE), "--stats-file", str(stats)]
    result = meshd("origin", "--tracker", "127.0.0.1:9", *args, "--register-timeout", "4")
    assert result.returncode == 1, result.stderr
    assert "no answer from the tracker at 127.0.0.1:9 yet" in result.stderr  # the early warning
    assert "the tracker at 127.0.0.1:9 did not answer in 4 s" in result.stderr
    assert "nothing was streamed" in result.stderr and "Traceback" not in result.stderr


def test_a_listener_warns_early_and_leaves_no_file_when_nothing_comes(tmp_path: Path) -> None:
    """A wrong tracker, or a stream the tracker does not know: a warning within seconds,
    exit 1 at --join-timeout, and no empty output file left behind."""
    with cluster(tmp_path) as room:
        _, tracker = room.tracker()
        unknown = room.start(
            "unknown", "listen", "--tracker", tracker, "--stream", STREAM,
            "--output", str(tmp_path / "unknown.opus"), "--join-timeout", "8",
        )  # fmt: skip
        nobody = room.start(
            "nobody", "listen", "--tracker", "127.0.0.1:9", "--stream", STREAM,
            "--output", str(tmp_path / "nobody.opus"), "--join-timeout", "8",
        )  # fmt: skip
        unknown.wait_for_output(r"does not know stream aaaaaaaa.*--stream is wrong", timeout=4)
        nobody.wait_for_output(r"no answer from the tracker at 127\.0\.0\.1:9 yet", timeout=6)
        assert unknown.wait(30) == 1 and nobody.wait(30) == 1
    assert not (tmp_path / "unknown.opus").exists() and not (tmp_path / "nobody.opus").exists()
    for proc in (unknown, nobody):
        assert "Traceback" not in proc.log.read_text()
        assert re.search(r" relay [a-z2-7]{8}: ", proc.log.read_text())  # names the node


def test_a_tracker_warns_of_a_peer_ttl_that_one_missed_refresh_outlasts(tmp_path: Path) -> None:
    """A longer --refresh lengthens the default --peer-ttl with it (3 x), so that live
    nodes are not forgotten; a --peer-ttl given under twice --refresh gets a warning."""
    warning = r"--peer-ttl 600 s is under twice --refresh \(600 s\)"
    with cluster(tmp_path) as room:
        short, _ = room.tracker("--refresh", "600", "--peer-ttl", "600")
        default, _ = room.tracker("--refresh", "600")
        assert short.find_output(warning) is not None
        assert default.find_output("is under twice") is None


def test_a_room_of_processes_delivers_every_packet(tmp_path: Path) -> None:
    """Tracker, origin and 10 listeners as real processes; every output is complete. The
    listeners start first (ten processes starting take a while on a busy machine)."""
    source = packets_of(TONE)
    with cluster(tmp_path) as room:
        _, tracker = room.tracker()
        key, stream = room.keygen("origin")
        listeners = [
            room.listener(f"listener{i}", tracker, stream, "--max-children", "2") for i in range(10)
        ]
        for listener in listeners:
            listener.wait_for_output("does not know stream", timeout=30)
        origin = room.start(
            "origin", "origin", "--tracker", tracker, "--key", str(key),
            "--input", str(TONE), "--capacity", "2",
        )  # fmt: skip
        for listener in listeners:
            assert listener.wait(30) == 0, listener.tail()
        assert origin.wait(30) == 0, origin.tail()
        status_after = meshd("status", "--tracker", tracker, "--stream", stream)
    for index in range(10):
        assert_gap_free_tail(tmp_path / f"listener{index}.opus", source)
        stats = room.stats(f"listener{index}")
        assert stats["ended"] and stats["lost"] == 0
    assert status_after.returncode == 1 and "STREAM_ENDED" in status_after.stderr


def test_a_listener_started_before_the_stream_plays_it_from_its_first_chunk(
    tmp_path: Path,
) -> None:
    """Someone waiting for the show to start hears it from the beginning: the listener
    is told the tracker does not know the stream yet, and once the origin starts it
    subscribes from chunk 0, not at the live edge (and not refusing chunk 0 as the past,
    which the start lag would for a newcomer)."""
    source = packets_of(TONE)
    with cluster(tmp_path) as room:
        _, tracker = room.tracker()
        key, stream = room.keygen("origin")
        listener = room.listener("listener", tracker, stream)
        listener.wait_for_output("does not know stream", timeout=30)
        origin = room.start(
            "origin", "origin", "--tracker", tracker, "--key", str(key), "--input", str(TONE),
        )  # fmt: skip
        assert listener.wait(30) == 0, listener.tail()
        assert origin.wait(30) == 0, origin.tail()
    assert_gap_free_tail(tmp_path / "listener.opus", source)
    stats = room.stats("listener")
    assert stats["first_seq"] == 0 and stats["lost"] == 0 and stats["too_old"] == 0


def test_status_shows_the_tree(tmp_path: Path) -> None:
    with cluster(tmp_path) as room:
        _, tracker = room.tracker()
        key, stream = room.keygen("origin")
        origin = room.start(
            "origin", "origin", "--tracker", tracker, "--key", str(key), "--input", str(TONE),
            "--capacity", "1",
        )  # fmt: skip
        origin.wait_for_output("registered")
        relay = room.listener("relay", tracker, stream)
        relay.wait_for_output("receiving from")
        leaf = room.listener("leaf", tracker, stream, "--max-children", "0")
        leaf.wait_for_output("receiving from")
        result = meshd("status", "--tracker", tracker, "--stream", stream)
        as_json = meshd("status", "--tracker", tracker, "--stream", stream, "--json")
        cut = meshd("status", "--tracker", tracker, "--stream", stream, "--limit", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "audience  2 listeners (at depth 1: 1, 2: 1)" in result.stdout
    assert "origin    feeds 1 of 1 children" in result.stdout
    tree = lines[lines.index("") + 1 :]
    assert re.fullmatch(
        rf"origin {stream[:8]}  1/1 children  depth 0  127\.0\.0\.1:\d+  up \d+s", tree[0]
    )
    assert re.fullmatch(
        r"└─ relay \w{8}  1/4 children  depth 1  127\.0\.0\.1:\d+  up \d+s", tree[1]
    )
    assert re.fullmatch(r"   └─ listener \w{8}  leaf  depth 2  127\.0\.0\.1:\d+  up \d+s", tree[2])
    nodes = json.loads(as_json.stdout)["nodes"]
    assert [(n["depth"], n["capacity"], n["children"]) for n in nodes] == [
        (0, 1, 1),
        (1, 4, 1),
        (2, 0, 0),
    ]
    assert nodes[1]["parent"] == stream and nodes[2]["parent"] == nodes[1]["node"]
    assert cut.stdout.splitlines()[-1] == "… 2 more nodes not shown"


def test_the_slot_of_a_dead_child_of_the_origin_is_free_again_within_seconds(
    tmp_path: Path,
) -> None:
    """A leaf under the origin dies: nobody below it can report it, so the origin tells
    the tracker (CHILD_GONE) once it lets the child go, and the next leaf gets the slot.
    Without that the tracker holds it for the peer TTL (600 s), and keeps the origin's
    other slot, its last free one, for a relay."""
    with cluster(tmp_path) as room:
        _, tracker = room.tracker()
        key, stream = room.keygen("origin")
        room.start(
            "origin", "origin", "--tracker", tracker, "--key", str(key),
            "--input", str(SAMPLE), "--capacity", "2",
        ).wait_for_output("registered")  # fmt: skip
        dead = room.listener("dead", tracker, stream, "--max-children", "0")
        dead.wait_for_output("receiving from")
        dead.signal(signal.SIGKILL)
        newcomer = room.listener("newcomer", tracker, stream, "--max-children", "0")
        newcomer.wait_for_output("receiving from", timeout=15)
        result = meshd("status", "--tracker", tracker, "--stream", stream)
    assert "audience  1 listener (at depth 1: 1)" in result.stdout, result.stdout


def test_demo_runs_a_room_and_sums_it_up(tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    result = meshd("demo", "--listeners", "5", "--duration", "4", "--log", str(log), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # the room's log lines go to the file
    summary = result.stdout[result.stdout.index("summary") :]
    assert "origin egress" in summary
    assert "listeners that got the end of the stream: 5/5" in summary
    assert "lost chunks: 0" in summary
    assert summary.rstrip().endswith(f"the room's log: {log}")
    assert " origin " in log.read_text() and " tracker " in log.read_text()


def test_ctrl_c_ends_the_demo_early_with_its_summary_and_no_traceback(tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    demo = subprocess.Popen(
        [*MESHD, "demo", "--listeners", "3", "--duration", "60", "--log", str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while "receiving from" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline and demo.poll() is None, "the demo did not start"
            time.sleep(0.1)
        demo.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        out, err = demo.communicate(timeout=30)
        # The stream ends at once and relays whose children have left exit, rather than
        # serve nobody for a ring buffer's span (10 s).
        assert time.monotonic() - stopped < 8
    finally:
        demo.kill()
    assert demo.returncode == 0, err
    assert "Traceback" not in err and "Traceback" not in log.read_text()
    assert "summary (ended early with Ctrl-C)" in out
    assert out.rstrip().endswith(f"the room's log: {log}")
