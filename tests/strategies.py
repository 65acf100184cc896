"""Hypothesis strategies that build every valid meshd message."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from protocol import limits, messages

keys = st.binary(min_size=32, max_size=32)
sigs = st.binary(min_size=64, max_size=64)
seqs = st.integers(0, limits.MAX_UINT64)
u64 = st.integers(0, limits.MAX_UINT64)
capacities = st.integers(0, limits.MAX_CAPACITY)
reasons = st.text(max_size=60)
served_addresses = st.sampled_from(["127.0.0.1:4433", "[::1]:9", "relay.example:65535"])
addresses = st.just("") | served_addresses
tokens = st.none() | st.binary(max_size=limits.MAX_TOKEN_SIZE)
peers = st.builds(messages.Peer, keys, addresses)
backups = st.lists(peers, max_size=limits.MAX_BACKUPS).map(tuple)
seq_lists = st.lists(seqs, min_size=1, max_size=limits.MAX_SEQS_PER_MESSAGE).map(tuple)
packets = st.lists(st.binary(max_size=200), max_size=20).map(tuple)


def serving(messages: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Only a sender that takes no children may leave its address empty."""
    return messages.filter(lambda m: m.capacity == 0 or m.address)


MESSAGES: dict[type[Any], st.SearchStrategy[Any]] = {
    messages.Subscribe: st.builds(messages.Subscribe, keys, st.none() | seqs, keys),
    messages.Admit: st.builds(messages.Admit, st.binary(max_size=limits.MAX_TOKEN_SIZE)),
    messages.StreamInfo: st.builds(
        messages.StreamInfo, st.just("opus"), st.binary(max_size=limits.MAX_HEAD_SIZE), sigs
    ),
    messages.Chunk: st.builds(messages.Chunk, seqs, u64, st.integers(0, 255), packets, sigs),
    messages.Heartbeat: st.builds(
        messages.Heartbeat, st.none() | seqs, st.integers(0, limits.MAX_STALLED_MS)
    ),
    messages.PathUpdate: st.builds(
        messages.PathUpdate, st.lists(keys, min_size=1, max_size=limits.MAX_PATH).map(tuple)
    ),
    messages.Repair: st.builds(messages.Repair, seq_lists),
    messages.Missing: st.builds(messages.Missing, seq_lists),
    messages.Redirect: st.builds(messages.Redirect, peers, backups),
    messages.Goodbye: st.builds(messages.Goodbye, st.integers(0, 0xFFFF), reasons),
    messages.Register: serving(
        st.builds(messages.Register, keys, addresses, capacities, u64, st.none() | u64, sigs)
    ),
    messages.Join: serving(
        st.builds(messages.Join, keys, keys, capacities, addresses, tokens, u64, sigs)
    ),
    messages.Rejoin: serving(
        st.builds(
            messages.Rejoin,
            keys,
            keys,
            keys,
            st.none() | keys,
            capacities,
            addresses,
            tokens,
            u64,
            sigs,
        )
    ),
    messages.Leave: st.builds(messages.Leave, keys, keys, u64, sigs),
    messages.Refresh: serving(
        st.builds(messages.Refresh, keys, keys, st.none() | keys, capacities, addresses, u64, sigs)
    ),
    messages.StatusRequest: st.builds(messages.StatusRequest, keys),
    messages.ChildGone: st.builds(messages.ChildGone, keys, keys, keys, u64, sigs),
    messages.Assigned: st.builds(
        messages.Assigned,
        peers,
        backups,
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFFFFFF),
        st.none() | u64,
    ),
    messages.Moved: st.builds(
        messages.Moved,
        st.lists(st.builds(messages.Move, keys, peers, backups), max_size=10).map(tuple),
    ),
    messages.Ack: st.builds(messages.Ack, st.integers(0, 0xFFFFFFFF)),
    messages.RetryAfter: st.builds(messages.RetryAfter, st.integers(0, 0xFFFFFFFF), reasons),
    messages.StatusReport: st.builds(
        messages.StatusReport,
        keys,
        u64,
        capacities,
        capacities,
        st.lists(u64, max_size=20).map(tuple),
        st.floats(0, 1e9),
        st.floats(0, 1e9),
        u64,
        u64,
        u64,
        u64,
        u64,
    ),
    messages.TreeRequest: st.builds(
        messages.TreeRequest, keys, st.integers(0, limits.MAX_TREE_NODES)
    ),
    messages.TreeReport: st.builds(
        messages.TreeReport,
        keys,
        u64,
        st.lists(
            st.builds(
                messages.TreeNode,
                keys,
                st.none() | keys,
                addresses,
                capacities,
                capacities,
                st.integers(0, 0xFFFF),
                st.integers(0, 0xFFFFFFFF),
            ),
            max_size=10,
        ).map(tuple),
    ),
    messages.Token: st.builds(messages.Token, keys, keys, u64, sigs),
}
any_message = st.one_of(*MESSAGES.values())
