"""`host:port` text <-> (host, port) tuples, as used on the command line and the wire."""

from __future__ import annotations


def parse_address(text: str) -> tuple[str, int]:
    """Parse `host:port` or `[v6]:port`; ValueError with a hint otherwise."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (for example 127.0.0.1:4433)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


def format_address(address: tuple[str, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
