"""TLS session tickets: a server's store of those it issued, a client's of those it got.

A resumed handshake skips the certificate and its signature on both sides (docs/spec.md
§2). aioquic's tickets are opaque labels for state the server keeps, so the server side
is a bounded store; every ticket is good for one handshake, which is also what keeps a
replayed 0-RTT flight from being accepted twice (RFC 8446 §8.1).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections import OrderedDict
from typing import NamedTuple

from aioquic.tls import CipherSuite, SessionTicket

from meshd.quic.transport import Address

CLIENT_TICKETS = 16
"""Servers a client keeps a ticket for; a node talks to one tracker."""


class _Issued(NamedTuple):
    """The part of a ticket the server needs to resume it (no extensions, no label)."""

    age_add: int
    cipher_suite: CipherSuite
    not_valid_after: datetime.datetime
    not_valid_before: datetime.datetime
    resumption_secret: bytes
    max_early_data_size: int | None


class ServerTickets:
    """Tickets this server issued, at most ``capacity``, the oldest forgotten first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._issued: OrderedDict[bytes, _Issued] = OrderedDict()

    def __len__(self) -> int:
        return len(self._issued)

    def add(self, ticket: SessionTicket) -> None:
        self._issued[ticket.ticket] = _Issued(
            ticket.age_add,
            ticket.cipher_suite,
            ticket.not_valid_after,
            ticket.not_valid_before,
            ticket.resumption_secret,
            ticket.max_early_data_size,
        )
        while len(self._issued) > self.capacity:
            self._issued.popitem(last=False)

    def take(self, label: bytes) -> SessionTicket | None:
        """The ticket with this label, which is then gone: each resumes one handshake."""
        issued = self._issued.pop(label, None)
        if issued is None:
            return None
        return SessionTicket(
            age_add=issued.age_add,
            cipher_suite=issued.cipher_suite,
            not_valid_after=issued.not_valid_after,
            not_valid_before=issued.not_valid_before,
            resumption_secret=issued.resumption_secret,
            server_name="",
            ticket=label,
            max_early_data_size=issued.max_early_data_size,
        )


class ClientTickets:
    """The newest ticket from each of the last few servers, with the key it proved."""

    def __init__(self, capacity: int = CLIENT_TICKETS) -> None:
        self._tickets: OrderedDict[Address, tuple[SessionTicket, bytes | None]] = OrderedDict()
        self._capacity = capacity

    def put(self, address: Address, ticket: SessionTicket, peer_key: bytes | None) -> None:
        self._tickets[address] = (ticket, peer_key)
        self._tickets.move_to_end(address)
        while len(self._tickets) > self._capacity:
            self._tickets.popitem(last=False)

    def take(
        self, address: Address, expected_peer_key: bytes | None, *, early_data: bool
    ) -> tuple[SessionTicket, bytes | None] | None:
        """A valid ticket for ``address`` whose server proved ``expected_peer_key``.

        Without ``early_data`` the ticket no longer offers 0-RTT: the handshake resumes,
        but nothing is sent that an attacker could replay.
        """
        found = self._tickets.pop(address, None)
        if found is None:
            return None
        ticket, peer_key = found
        if not ticket.is_valid or expected_peer_key not in (None, peer_key):
            return None
        if not early_data:
            ticket = dataclasses.replace(ticket, max_early_data_size=None)
        return ticket, peer_key
