"""The listener's audio output: a valid Ogg Opus stream to a file or stdout.

Pages are built in the event loop (cheap) and written by a worker thread, so a player
that stops reading our stdout stalls only the output, never relaying to children.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import BinaryIO

import trio

from meshd.ogg import OggOpusMuxer

logger = logging.getLogger(__name__)

MAX_QUEUED_WRITES = 3000  # ten minutes of 200 ms chunks


class AudioSink:
    """Ogg Opus output to an open binary file (stdout for "-"), opened up front so that a
    bad path fails at start-up with a clear error rather than when audio arrives."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._out: BinaryIO = sys.stdout.buffer if path == "-" else open(path, "wb")  # noqa: SIM115
        self._muxer: OggOpusMuxer | None = None
        self._send, self._receive = trio.open_memory_channel[bytes](MAX_QUEUED_WRITES)
        self._dropped = 0
        self.on_broken: Callable[[], None] = lambda: None

    @property
    def started(self) -> bool:
        return self._muxer is not None

    def start(self, head: bytes) -> None:
        """Begin the file with the stream's OpusHead (once; later calls are ignored)."""
        if self._muxer is None:
            self._muxer = OggOpusMuxer(head)
            self._queue(self._muxer.headers)

    def write(self, packets: Sequence[bytes]) -> None:
        if self._muxer is None:
            raise RuntimeError("write() before start()")
        if packets:
            self._queue(self._muxer.encode_packets(packets))

    def close(self) -> None:
        """End the Ogg stream (EOS page); `run` returns once everything is written."""
        if self._muxer is not None:
            self._queue(self._muxer.end())
        self._send.close()

    def _queue(self, data: bytes) -> None:
        try:
            self._send.send_nowait(data)
        except trio.WouldBlock:
            self._dropped += 1
            if self._dropped == 1:
                logger.warning("output %s is not being read; dropping audio", self.path)
        except trio.ClosedResourceError:
            pass  # already closed: the stream ended

    async def run(self) -> None:
        """Write queued pages until close(). If the reader goes away (the player quit),
        `on_broken` is called, so the node can leave gracefully instead of crashing."""
        try:
            async for data in self._receive:
                await trio.to_thread.run_sync(_write_and_flush, self._out, data)
        except OSError as exc:
            logger.warning("cannot write to %s (%s); leaving", self.path, exc.strerror or exc)
            self._send.close()
            self.on_broken()
        finally:
            if self._out is not sys.stdout.buffer:
                self._out.close()


def _write_and_flush(out: BinaryIO, data: bytes) -> None:
    out.write(data)
    out.flush()
