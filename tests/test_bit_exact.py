"""A listener's output is the origin's input: every packet, its granule positions and its
end trim, checked by packet and by ffprobe; and the room's metrics scraped over HTTP."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshd.ogg import read_ogg_opus
from tests.procs import Proc, cluster, wait_until
from tests.room import TONE

METRICS = r"metrics on http://(\S+)/metrics"


def granules(path: Path) -> list[tuple[bytes, int]]:
    with path.open("rb") as file:
        return [(packet.data, packet.granule) for packet in read_ogg_opus(file)[1]]


def duration(path: Path) -> float:
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", path],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return float(result.stdout)


def scrape(proc: Proc) -> dict[str, float]:
    """`name{labels}` (labels sorted, stream and node left out) -> value."""
    address = proc.wait_for_output(METRICS).group(1)
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(
                f"{k}={v}" for k, v in sorted(sample.labels.items()) if k not in ("stream", "node")
            )
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="needs ffprobe (.ci/run installs it)")
def test_listeners_that_wait_for_the_stream_get_all_of_it_bit_exact(tmp_path: Path) -> None:
    source = granules(TONE)
    with cluster(tmp_path) as room:
        tracker_proc, tracker = room.tracker("--metrics", "127.0.0.1:0", "--log-format", "json")
        key, stream = room.keygen("origin")
        first = room.listener("first", tracker, stream, "--metrics", "127.0.0.1:0")
        second = room.listener("second", tracker, stream, "--max-children", "0")
        for listener in (first, second):  # both are waiting for the stream
            listener.wait_for_output("does not know stream", timeout=30)
        origin = room.start(
            "origin", "origin", "--tracker", tracker, "--key", str(key), "--input", str(TONE),
            "--metrics", "127.0.0.1:0",
        )  # fmt: skip
        first.wait_for_output("receiving from", timeout=20)
        second.wait_for_output("receiving from", timeout=20)
        tracker_metrics = scrape(tracker_proc)
        # "receiving from" is logged at the parent's acceptance, before any chunk.
        wait_until(
            lambda: scrape(first)["meshd_node_bytes_received_total"] > 0,
            "the first listener counts the bytes it receives",
            timeout=5,
        )
        node_metrics = scrape(first)
        origin_metrics = scrape(origin)
        for listener in (first, second):
            assert listener.wait(30) == 0, listener.tail()
        assert origin.wait(30) == 0, origin.tail()
        tracker_log = tracker_proc.log.read_text().splitlines()
    for name in ("first", "second"):
        output = tmp_path / f"{name}.opus"
        assert granules(output) == source, f"{name}: not the origin's packets and granules"
        assert duration(output) == duration(TONE) == 6.0065
        assert room.stats(name)["lost"] == 0
    assert tracker_metrics["meshd_tracker_audience"] == 2
    assert tracker_metrics["meshd_tracker_joins_total"] >= 2
    assert tracker_metrics["meshd_tracker_origin_children"] >= 1
    assert tracker_metrics["meshd_tracker_nodes_at_depth{depth=1}"] >= 1
    assert node_metrics["meshd_node_info{role=relay}"] == 1
    assert node_metrics["meshd_node_bytes_received_total"] > 0
    assert node_metrics["meshd_node_chunks_played_total"] > 0
    assert node_metrics["meshd_node_chunks_lost_total"] == 0
    assert node_metrics["meshd_node_depth"] >= 1
    assert "meshd_node_parent_rtt_seconds" in node_metrics
    assert origin_metrics["meshd_node_info{role=origin}"] == 1
    assert origin_metrics["meshd_node_bytes_sent_total"] > 0
    entries = [json.loads(line) for line in tracker_log]  # --log-format json: every line
    assert {entry["role"] for entry in entries} == {"tracker"}
    assert any("metrics on http://" in entry["message"] for entry in entries)
