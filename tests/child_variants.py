"""Broken nodes for tests/test_conformance_child.py: the reference `meshd` with one rule
of the child side switched off. Run as `python tests/child_variants.py VARIANT listen …`
(the suite starts it through --child-command)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from meshd.node.core import NodeCore, Upstream
from protocol.link import ChildLink
from protocol.media import StreamVerifier, VerifiedChunk
from protocol.messages import Chunk


def accepts_path_through_itself() -> None:
    """Checks every PATH rule but the one that refuses a cycle (§6.5)."""
    check = ChildLink._check_path

    def without_cycle_check(self: ChildLink, nodes: tuple[bytes, ...]) -> None:
        node, self._node = self._node, bytes(32)  # an id no PATH here holds
        try:
            check(self, nodes)
        finally:
            self._node = node

    setattr(ChildLink, "_check_path", without_cycle_check)  # noqa: B010


def skips_chunk_signatures() -> None:
    """Plays and forwards chunks without checking their signature (§4.3, §6.2)."""

    def unchecked(self: StreamVerifier, chunk: Chunk, raw: bytes) -> VerifiedChunk:
        return VerifiedChunk(chunk, raw)

    setattr(StreamVerifier, "verify_chunk", unchecked)  # noqa: B010


def trusts_a_first_parent() -> None:
    """Judges a parent that never delivered as one that did: the stall timeout, not the
    first-chunk timeout (§6.3)."""
    for name in ("_stall_limits", "_parent_stalled_too"):
        method = getattr(NodeCore, name)

        def as_if_delivered(self: NodeCore, up: Upstream, *args: Any, method: Any = method) -> Any:
            delivered, up.delivered = up.delivered, True
            try:
                return method(self, up, *args)
            finally:
                up.delivered = delivered

        setattr(NodeCore, name, as_if_delivered)


def starts_in_the_past() -> None:
    """Plays the first chunk a parent sends however far behind the live edge it is: no
    start lag (§6.3)."""
    setattr(NodeCore, "_too_old_to_start", lambda self, item: False)  # noqa: B010


VARIANTS: dict[str, Callable[[], None]] = {
    "accepts-path-through-itself": accepts_path_through_itself,
    "skips-chunk-signatures": skips_chunk_signatures,
    "trusts-a-first-parent": trusts_a_first_parent,
    "starts-in-the-past": starts_in_the_past,
}

if __name__ == "__main__":
    VARIANTS[sys.argv[1]]()
    from meshd.cli import main

    main(sys.argv[2:])
