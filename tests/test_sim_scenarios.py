"""`meshd sim`: the named scenarios at small sizes, at both levels, asserting what must
hold of every run (nothing lost, nobody cut off, the origin's egress flat), and the
targets the sim shows are not met yet as strict expected failures."""

from __future__ import annotations

import json
import logging
import random
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshd.cli import main
from meshd.sim.flow import FlowOptions, FlowRoom
from meshd.sim.population import Audience, draw
from meshd.sim.report import figures
from meshd.sim.run import RunSpec, run
from meshd.sim.scenarios import QUIET, SCENARIOS, ShockKind


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    logger = logging.getLogger("meshd")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def sim(scenario: str, level: str, listeners: int, duration: float, seed: int = 1) -> Any:
    spec = RunSpec(scenario, level=level, listeners=listeners, seed=seed, duration=duration)
    return figures(run(spec))


def assert_sound(f: dict[str, Any]) -> None:
    """What every run must show: everyone still there played, nobody lost a chunk, nobody
    is cut off or in a cycle at the end, and the origin sent only what its capacity allows."""
    assert f["never_played"] == 0
    assert f["players"] > 0.95 * f["listeners"]  # the rest left before their first audio
    assert f["chunks_lost"] == 0, f
    assert f["problems"] == {}, f["problems"]
    assert f["origin_egress_peak"] <= f["origin_egress_budget"], f["origin_egress_peak"]
    assert sum(f["depth_histogram"][1:]) > 0


# -- the audience and the plans ------------------------------------------------------------


def test_the_audience_is_mostly_leaves_with_heavy_tailed_sessions() -> None:
    rng = random.Random(0)
    listeners = [draw(rng, i, 0.0, Audience()) for i in range(5000)]
    relays = [listener for listener in listeners if listener.capacity]
    assert 0.3 <= len(relays) / len(listeners) <= 0.5
    assert all(1 <= r.capacity <= 4 for r in relays)
    assert all(listener.capacity == 0 for listener in listeners if not listener.reachable)
    sessions = [listener.session for listener in listeners]
    assert max(sessions) > 20 * statistics.median(sessions)


def test_a_plan_is_the_same_for_the_same_seed_and_differs_for_another() -> None:
    launch = SCENARIOS["launch"]
    assert launch.plan(300, 4) == launch.plan(300, 4)
    assert launch.plan(300, 4) != launch.plan(300, 5)


def test_the_scenarios_plans() -> None:
    launch = SCENARIOS["launch"].plan(1000, 1, 360)
    assert launch.initial == 0
    assert max(listener.arrive_at for listener in launch.listeners) <= 300
    melt = SCENARIOS["melt"].plan(1000, 1)
    assert melt.initial == 1000 and len(melt.listeners) == 1250
    assert [shock.kind for shock in melt.shocks] == [ShockKind.MELT]
    churn = SCENARIOS["churn"].plan(1000, 1, 300)
    departures = [churn.departure(listener) for listener in churn.listeners]
    assert all(left is None or left <= 300 - QUIET for left in departures)
    arrivals = len(churn.listeners) - churn.initial
    assert 300 < arrivals < 700  # 1000 listeners staying 10 min on average: ~475 in 285 s
    top_kill = SCENARIOS["top-kill"].plan(1000, 1)
    assert [shock.kind for shock in top_kill.shocks] == [ShockKind.TOP_KILL]
    restart = SCENARIOS["restart"].plan(1000, 1)
    assert restart.initial == 1000 and len(restart.listeners) == 1100
    assert [shock.kind for shock in restart.shocks] == [ShockKind.TRACKER_RESTART]
    assert all(listener.arrive_at >= 30 for listener in restart.listeners[1000:])
    with pytest.raises(ValueError, match="at least"):
        SCENARIOS["melt"].plan(1000, 1, 20)


# -- the chunk level: the real node and origin cores ---------------------------------------


def test_launch_chunk_level() -> None:
    f = sim("launch", "chunk", 40, 40)
    assert_sound(f)
    assert f["joins"] == 40


def test_churn_chunk_level() -> None:
    f = sim("churn", "chunk", 50, 40)
    assert_sound(f)
    assert f["listeners"] > 50  # newcomers replaced leavers
    assert f["tracker_totals"]["leave"] > 0


def test_top_kill_chunk_level_every_survivor_is_back_and_lost_nothing() -> None:
    f = sim("top-kill", "chunk", 100, 50)
    assert f["survivors"] > 80
    assert f["survivors_losing"] == 0
    assert f["unrecovered"] == 0
    assert f["recovered"] > 0
    assert f["chunks_lost"] == 0
    assert f["problems"] == {}


def test_melt_chunk_level_ends_without_a_cycle_and_with_the_origin_in_budget() -> None:
    """Half the room vanishing at once used to leave a node core asking to be woken at the
    very instant its stall check found nothing to do: the virtual clock stood still."""
    f = sim("melt", "chunk", 100, 60)
    assert f["survivors"] == 50
    assert "cycle" not in f["problems"]
    assert f["origin_egress_peak"] <= f["origin_egress_budget"]


def test_restart_chunk_level_loses_nothing_and_the_tracker_knows_the_tree_again() -> None:
    """The real origin core's ANNOUNCE and the real node cores' REFRESHes: within
    seconds the restarted tracker knows where everyone is, and newcomers play."""
    f = sim("restart", "chunk", 60, 60)
    assert_sound(f)
    assert f["survivors"] == 60 and f["survivors_losing"] == 0
    assert f["joins"] == 6
    assert f["rebuilt_after"] is not None and f["rebuilt_after"] <= 10  # virtual seconds


# -- the flow level: the real tracker, modelled nodes --------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_launch_flow_level(seed: int) -> None:
    f = sim("launch", "flow", 2000, 60, seed)
    assert_sound(f)
    assert f["tracker_totals"]["join"] >= 2000


def test_churn_flow_level() -> None:
    f = sim("churn", "flow", 1000, 120)
    assert_sound(f)
    assert f["listeners"] > 1100


@pytest.mark.parametrize("seed", [1, 2])
def test_top_kill_flow_level_every_survivor_is_back_and_lost_nothing(seed: int) -> None:
    f = sim("top-kill", "flow", 1000, 60, seed)
    assert f["survivors"] > 990
    assert f["survivors_losing"] == 0 and f["unrecovered"] == 0
    assert f["recovery_p99"] <= 2.0  # issue 9's target, in virtual time
    assert f["problems"] == {}


def test_restart_flow_level_loses_nothing_and_the_tracker_knows_the_tree_again() -> None:
    f = sim("restart", "flow", 2000, 60)
    assert_sound(f)
    assert f["survivors"] == 2000 and f["survivors_losing"] == 0
    assert f["rebuilt_after"] is not None and f["rebuilt_after"] <= 15  # virtual seconds


def test_the_levels_agree_on_a_small_launch() -> None:
    """The same plan at both levels: the same tracker places the same joins."""
    chunk = sim("launch", "chunk", 40, 40)
    flow = sim("launch", "flow", 40, 40)
    for f in (chunk, flow):
        assert_sound(f)
    assert abs(chunk["depth_mean"] - flow["depth_mean"]) < 1.0


def test_a_flow_node_that_moves_while_playing_counts_its_new_parent_as_delivering() -> None:
    """A lit node that moves (make before break) plays on from its new parent, so that
    parent has delivered: a stall then gets the stall rules' grace, not the first-chunk
    timeout (as `NodeCore`, where the first chunk played from a parent proves it)."""
    plan = SCENARIOS["churn"].plan(400, 1, 60)
    room = FlowRoom(plan, FlowOptions())
    room.run()
    playing = [node for node in room.listeners if node.alive and node.lit]
    moved = [node for node in playing if node.up_at > (node.first_audio_at or 0.0)]
    assert len(moved) > 20
    assert all(node.delivered for node in playing)


def test_a_run_is_the_same_for_the_same_seed() -> None:
    first, second = (sim("melt", "flow", 400, 60) for _ in range(2))
    for f in (first, second):
        for cost in ("wall_s", "rss_mb"):
            del f[cost]
    assert first == second


# -- targets the sim shows unmet (docs/performance.md) -------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="a fast launch of a mostly-leaf audience deepens the tree (12, bound 9): leaves "
    "move down only at their REFRESH every refresh_s",
)
def test_a_fast_launch_stays_within_the_depth_bound() -> None:
    f = sim("launch", "flow", 2000, 60)
    assert f["depth_max_seen"] <= f["depth_bound"]


def test_after_a_melt_every_survivor_is_back_and_lost_nothing() -> None:
    f = sim("melt", "flow", 1000, 120)
    assert f["survivors_losing"] == 0 and f["unrecovered"] == 0


# -- the command ---------------------------------------------------------------------------


def test_meshd_sim_prints_the_table_and_writes_json_and_a_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "figures.json"
    files = ["--json", str(out), "--plot", str(tmp_path / "plots")]
    with pytest.raises(SystemExit) as exit_:
        main(["sim", "top-kill", "--listeners", "300", "--level", "flow", "--seed", "3", *files])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "top-kill (seed 3, flow level, 300 listeners)" in printed
    for row in ("origin egress", "depth at the end", "recovery after the shock", "tracker"):
        assert row in printed
    assert "hint" not in printed, "the tracker kept up"
    f = json.loads(out.read_text())
    assert f["scenario"] == "top-kill" and f["listeners"] == 300 and f["survivors"] > 0
    png = tmp_path / "plots" / "top-kill-flow-300-seed3.png"
    assert png.read_bytes().startswith(b"\x89PNG")


def test_meshd_sim_says_when_its_tracker_was_overloaded(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["--listeners", "300", "--level", "flow", "--duration", "30", "--tracker-rate", "5"]
    with pytest.raises(SystemExit) as exit_:
        main(["sim", "launch", *args])
    assert exit_.value.code == 0
    hint = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("hint"))
    assert "give it more capacity (--tracker-rate) or less to do (--refresh" in hint


def test_meshd_sim_refuses_a_run_too_short_for_its_scenario(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["sim", "melt", "--listeners", "50", "--duration", "10"])
    assert exit_.value.code == 2
    assert "melt needs a run of at least" in capsys.readouterr().err
