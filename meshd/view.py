"""A stream's tree and figures as text for a terminal, or as JSON: `meshd status`, the demo."""

from __future__ import annotations

from collections import defaultdict

from protocol import StatusReport, TreeNode, TreeReport, key_to_text, short_id


def status_dict(report: StatusReport, tree: TreeReport) -> dict[str, object]:
    return {
        "stream": key_to_text(report.stream),
        "audience": report.audience,
        "origin_children": report.origin_children,
        "origin_capacity": report.origin_capacity,
        "depth_histogram": list(report.depth_histogram),
        "joins_per_s": report.joins_per_s,
        "rejoins_per_s": report.rejoins_per_s,
        "total_joins": report.total_joins,
        "total_rejoins": report.total_rejoins,
        "total_leaves": report.total_leaves,
        "total_failures": report.total_failures,
        "total_shed": report.total_shed,
        "nodes": [
            {
                "node": key_to_text(node.node),
                "parent": None if node.parent is None else key_to_text(node.parent),
                "address": node.address,
                "capacity": node.capacity,
                "children": node.children,
                "depth": node.depth,
                "uptime_s": node.uptime_s,
            }
            for node in tree.nodes
        ],
    }


def format_status(report: StatusReport, tree: TreeReport, max_lines: int) -> str:
    depths = ", ".join(f"{d}: {n}" for d, n in enumerate(report.depth_histogram) if d and n)
    header = [
        f"stream {key_to_text(report.stream)}",
        f"  audience  {_count(report.audience, 'listener')}"
        + (f" (at depth {depths})" if depths else ""),
        f"  origin    feeds {report.origin_children} of {report.origin_capacity} children",
        f"  activity  {report.joins_per_s:.1f} joins/s, {report.rejoins_per_s:.1f} rejoins/s; "
        f"in all {report.total_joins} joins, {report.total_rejoins} rejoins, "
        f"{report.total_leaves} leaves, {report.total_failures} failures, "
        f"{report.total_shed} shed",
        "",
    ]
    return "\n".join(header + render_tree(tree, max_lines))


def render_tree(tree: TreeReport, max_lines: int) -> list[str]:
    """The tree drawn from the origin down, in at most `max_lines` lines (the last one
    says how many nodes are left out)."""
    children: dict[bytes, list[TreeNode]] = defaultdict(list)
    for node in tree.nodes[1:]:
        children[node.parent or b""].append(node)
    lines: list[str] = []
    budget = max(max_lines, 2) - 1  # one line is kept for "… more"

    def walk(node: TreeNode, prefix: str, branch: str, extension: str) -> None:
        if len(lines) >= budget:
            return
        lines.append(prefix + branch + _describe(node))
        below = children.get(node.node, [])
        for index, child in enumerate(below):
            last = index == len(below) - 1
            walk(child, prefix + extension, "└─ " if last else "├─ ", "   " if last else "│  ")

    if tree.nodes:
        walk(tree.nodes[0], "", "", "")
    hidden = tree.audience + 1 - len(lines)
    if hidden > 0:
        lines.append(f"… {_count(hidden, 'more node')} not shown")
    return lines


def _describe(node: TreeNode) -> str:
    if node.parent is None:
        name = f"origin {short_id(node.node)}"
    elif node.capacity == 0:
        name = f"listener {short_id(node.node)}"
    else:
        name = f"relay {short_id(node.node)}"
    load = "leaf" if node.capacity == 0 else f"{node.children}/{node.capacity} children"
    address = node.address or "(accepts no children)"
    return f"{name}  {load}  depth {node.depth}  {address}  up {format_duration(node.uptime_s)}"


def format_duration(seconds: int) -> str:
    """45s, 12m05s, 3h02m, 2d04h: two units at most."""
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
