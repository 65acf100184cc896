"""`meshd conformance --child` both ways: the reference node (`meshd listen` processes)
passes every MUST, and nodes with one child-side rule switched off fail the cases that
should catch them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from meshd.conformance.report import Level, Report, Verdict
from meshd.conformance.runner import check_child
from tests.procs import MESHD

NODE_ARGS = [
    "listen", "--tracker", "{tracker}", "--tracker-id", "{tracker_id}", "--stream", "{stream}",
    "--output", "{output}", "-q",
]  # fmt: skip
VARIANTS = Path(__file__).parent / "child_variants.py"


def _verdicts(report: Report, verdict: Verdict) -> set[str]:
    return {r.id for r in report.results if r.verdict is verdict}


async def test_the_reference_node_passes_every_must() -> None:
    report = await check_child([*MESHD, *NODE_ARGS], concurrency=3)
    assert not _verdicts(report, Verdict.FAIL), report.format()
    assert not _verdicts(report, Verdict.NON_STRICT), report.format()
    assert not _verdicts(report, Verdict.SKIPPED), report.format()
    assert sum(r.level is Level.MUST for r in report.results) >= 35


async def _check_variant(variant: str, only: list[str]) -> Report:
    command = [sys.executable, str(VARIANTS), variant, *NODE_ARGS]
    return await check_child(command, only=only, concurrency=3)


async def test_a_node_that_accepts_a_path_through_itself_fails() -> None:
    report = await _check_variant("accepts-path-through-itself", ["6.5-path"])
    assert _verdicts(report, Verdict.FAIL) == {
        "6.5-path-contains-child",
        "6.5-path-update-contains-child",
    }, report.format()
    assert not report.ok


async def test_a_node_that_skips_chunk_signatures_fails() -> None:
    only = ["6.2-chunk-signature", "6.2-stream-info-signature"]
    report = await _check_variant("skips-chunk-signatures", only)
    assert _verdicts(report, Verdict.FAIL) == {
        "6.2-chunk-signature-stream",
        "6.2-chunk-signature-datagram",
    }, report.format()
    assert report.by_id("6.2-stream-info-signature").verdict is Verdict.PASS


async def test_a_node_that_waits_out_the_stall_timeout_for_a_first_chunk_fails() -> None:
    report = await _check_variant("trusts-a-first-parent", ["6.3-first-chunk"])
    assert _verdicts(report, Verdict.NON_STRICT) == {"6.3-first-chunk"}, report.format()
    assert report.by_id("6.3-first-chunk-stalled").verdict is Verdict.PASS


async def test_a_node_that_starts_wherever_its_first_parent_is_fails() -> None:
    report = await _check_variant("starts-in-the-past", ["6.3-start-lag"])
    assert _verdicts(report, Verdict.NON_STRICT) == {"6.3-start-lag"}, report.format()


def test_the_command_runs_the_child_target(tmp_path: Path) -> None:
    node = " ".join([*MESHD, *NODE_ARGS])
    result = subprocess.run(
        [*MESHD, "conformance", "--child", "--child-command", node, "--case", "6.8",
         "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    cases = json.loads((tmp_path / "r.json").read_text())["cases"]
    assert [(c["id"], c["verdict"]) for c in cases] == [("6.8-end", "pass")]


def test_without_a_command_it_says_what_to_run() -> None:
    result = subprocess.run(
        [*MESHD, "conformance", "--child"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "--child-command" in result.stderr and "{tracker}" in result.stderr
