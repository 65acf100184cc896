"""meshd: the audience carries the audience — live audio relayed peer to peer over QUIC."""

__version__ = "0.1.0"
