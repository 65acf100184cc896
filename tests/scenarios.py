"""What the fault scenarios break, chosen from the nodes' stats files, and how to tell the
tree has healed. Shared by tests/test_fault_scenarios.py and bench/bench_node.py --faults,
so both run the same scenarios. Nodes are named by their text ids (stats "node").
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Mapping
from typing import Any

Stats = dict[str, Any]  # one node's stats file


def by_id(stats: Collection[Stats]) -> dict[str, Stats]:
    return {s["node"]: s for s in stats if "node" in s}


def origin_children(stats: Collection[Stats], stream: str) -> list[str]:
    """Listeners fed by the origin itself."""
    return [s["node"] for s in stats if s.get("depth") == 1 or s.get("parent") == stream]


def relays(stats: Collection[Stats]) -> list[str]:
    """Listeners that feed others."""
    return [s["node"] for s in stats if s.get("children", 0) > 0]


def random_relays(stats: Collection[Stats], fraction: float, rng: random.Random) -> list[str]:
    """`fraction` of the relays (at least one), drawn with `rng`."""
    feeding = relays(stats)
    return rng.sample(feeding, max(1, round(fraction * len(feeding)))) if feeding else []


def parent_and_first_backup(stats: Collection[Stats]) -> tuple[str, str, str] | None:
    """(L, P, B): a listener L whose parent P is a listener and whose first backup parent
    B (the tracker's order) is a listener too, not the origin. The deepest such L: near
    the top, P and B tend to be the origin's two children, which is another scenario."""
    listeners = by_id(stats)
    deepest_first = sorted(listeners.items(), key=lambda item: -(item[1].get("depth") or 0))
    for node, s in deepest_first:
        backups = s.get("backups") or []
        if s.get("parent") in listeners and backups and backups[0] in listeners:
            return node, s["parent"], backups[0]
    return None


def mid_tree_relay(stats: Collection[Stats]) -> str | None:
    """A listener fed by a listener (not the origin) that feeds others."""
    listeners = by_id(stats)
    return next(
        (n for n, s in listeners.items() if s.get("parent") in listeners and s.get("children")),
        None,
    )


def path_problem(
    node: str,
    stats: Mapping[str, Stats],
    stream: str,
    alive: Collection[str],
    names: Mapping[str, str],
) -> str | None:
    """Why `node` is not on a complete, loop-free path from the origin through nodes that
    are still there, or None if it is. `stats` and `alive` are by node id (`alive` holds
    the stream id while the origin counts as there); `names` makes ids readable.

    Uses the node's stats "path" when it has one; else follows the "parent" fields.
    """

    def name(node_id: str) -> str:
        return names.get(node_id, node_id[:8])

    mine = stats.get(node, {})
    if "path" in mine:
        path: list[str] = mine["path"]
        shown = " > ".join(map(name, path))
        if not path or path[0] != stream or path[-1] != node:
            return f"path {shown} does not run from the origin to {name(node)}"
        if len(set(path)) < len(path):
            return f"path {shown} has a loop"
        dead = [hop for hop in path[:-1] if hop not in alive]
        return f"path {shown} runs through {', '.join(map(name, dead))}, gone" if dead else None
    chain = [node]
    while (parent := stats.get(chain[-1], {}).get("parent")) != stream:
        if parent is None:
            return f"{name(chain[-1])} has no parent (chain {_chain(chain, name)})"
        if parent not in alive:
            return f"{_chain([*chain, parent], name)}, gone"
        if parent in chain:
            return f"loop: {_chain([*chain, parent], name)}"
        chain.append(parent)
    return None if stream in alive else "the origin is gone"


def _chain(chain: list[str], name: Callable[[str], str]) -> str:
    return " < ".join(map(name, chain))
