"""The fault scenarios' choices and tree checks, on hand-made stats files."""

from __future__ import annotations

import random

from tests.scenarios import (
    Stats,
    by_id,
    mid_tree_relay,
    origin_children,
    parent_and_first_backup,
    path_problem,
    random_relays,
)

S = "stream"
NAMES = {"a": "A", "b": "B", "c": "C", "d": "D", "e": "E", S: "origin"}


def tree() -> list[Stats]:
    """origin -> a -> b -> c and e, and origin -> d; backups as a tracker might give them."""
    return [
        {"node": "a", "parent": S, "depth": 1, "children": 1, "backups": [S]},
        {"node": "b", "parent": "a", "depth": 2, "children": 2, "backups": ["d"]},
        {"node": "c", "parent": "b", "depth": 3, "children": 0, "backups": [S, "d"]},
        {"node": "d", "parent": S, "depth": 1, "children": 0, "backups": ["c"]},
        {"node": "e", "parent": "b", "depth": 3, "children": 0, "backups": ["d", "c"]},
    ]


def test_the_choices() -> None:
    stats = tree()
    assert sorted(origin_children(stats, S)) == ["a", "d"]
    # c's first backup is the origin; b qualifies too, but e is deeper.
    assert parent_and_first_backup(stats) == ("e", "b", "d")
    assert mid_tree_relay(stats) == "b"
    assert sorted(random_relays(stats, 0.4, random.Random(1))) in (["a"], ["b"])
    assert random_relays([s for s in stats if not s["children"]], 0.4, random.Random(1)) == []


def test_paths_by_parent_fields() -> None:
    stats = by_id(tree())
    alive = {"a", "b", "c", "d", "e", S}
    assert all(path_problem(n, stats, S, alive, NAMES) is None for n in alive - {S})
    assert path_problem("c", stats, S, alive - {"a"}, NAMES) == "C < B < A, gone"
    assert path_problem("c", stats, S, alive - {S}, NAMES) == "the origin is gone"
    stats["a"]["parent"] = "c"
    assert path_problem("c", stats, S, alive, NAMES) == "loop: C < B < A < C"
    stats["a"]["parent"] = None
    assert path_problem("b", stats, S, alive, NAMES) == "A has no parent (chain B < A)"


def test_paths_by_path_field() -> None:
    stats = by_id(tree())
    stats["c"]["path"] = [S, "a", "b", "c"]
    alive = {"a", "b", "c", S}
    assert path_problem("c", stats, S, alive, NAMES) is None
    assert "runs through A, gone" in str(path_problem("c", stats, S, alive - {"a"}, NAMES))
    stats["c"]["path"] = [S, "b", "a", "b", "c"]
    assert "has a loop" in str(path_problem("c", stats, S, alive, NAMES))
    stats["c"]["path"] = ["a", "b", "c"]
    assert "does not run from the origin" in str(path_problem("c", stats, S, alive, NAMES))
