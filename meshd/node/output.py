"""The listener's audio output: a valid Ogg Opus stream to a file or stdout.

Pages are built in the event loop (cheap). To a regular file they are written there too
(a write to the page cache does not block); to stdout, a pipe or a device they are
written by a worker thread, so a player that stops reading stalls only the output, never
relaying to children.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import trio

from meshd.errors import UsageError
from meshd.ogg import OggOpusMuxer
from protocol import Chunk

logger = logging.getLogger(__name__)

MAX_QUEUED_WRITES = 3000  # ten minutes of 200 ms chunks


class AudioSink:
    """Ogg Opus output to a file (stdout for "-"). The path is checked up front, so a bad
    one fails at start-up with a clear error, but the file is only created once the
    stream's header arrives: a node that never gets audio leaves no empty file behind."""

    def __init__(self, path: str) -> None:
        if path != "-":
            check_output_path(path, "--output")
        self.path = path
        self._out: BinaryIO | None = None
        self._muxer: OggOpusMuxer | None = None
        self._send, self._receive = trio.open_memory_channel[bytes](MAX_QUEUED_WRITES)
        self._dropped = 0
        self._inline = False
        self._error: OSError | None = None
        self.on_broken: Callable[[], None] = lambda: None

    @property
    def started(self) -> bool:
        return self._muxer is not None

    def start(self, head: bytes) -> None:
        """Begin the file with the stream's OpusHead (once; later calls are ignored)."""
        if self._muxer is None:
            self._muxer = OggOpusMuxer(head)
            # A thread hop per chunk cost a relay about as much as forwarding it to a child.
            self._inline = self.path != "-" and _regular_or_new(self.path)
            self._queue(self._muxer.headers)

    def write(self, chunk: Chunk) -> None:
        """The chunk's packets, on pages that carry the origin's granule positions (the
        END chunk's on the last page, so its end trim holds)."""
        if self._muxer is None:
            raise RuntimeError("write() before start()")
        if chunk.packets:
            self._queue(self._muxer.encode_packets(chunk.packets, chunk.granule, last=chunk.is_end))

    def close(self) -> None:
        """End the Ogg stream (EOS page); `run` returns once everything is written."""
        if self._muxer is not None:
            self._queue(self._muxer.end())
        self._send.close()

    def _queue(self, data: bytes) -> None:
        if self._inline and self._error is None:
            try:
                self._write_and_flush(data)
            except OSError as exc:
                self._error = exc  # `run` reports it, outside the caller's pump
                self._send.close()
            return
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
                await trio.to_thread.run_sync(self._write_and_flush, data)
            if self._error is not None:
                raise self._error
        except OSError as exc:
            logger.warning("cannot write to %s (%s); leaving", self.path, exc.strerror or exc)
            self._send.close()
            self.on_broken()
        finally:
            if self._out is not None and self._out is not sys.stdout.buffer:
                self._out.close()

    def _write_and_flush(self, data: bytes) -> None:
        if self._out is None:
            self._out = sys.stdout.buffer if self.path == "-" else open(self.path, "wb")  # noqa: SIM115
        self._out.write(data)
        self._out.flush()


def _regular_or_new(path: str) -> bool:
    """Whether opening `path` for writing gives a regular file (not a FIFO or device)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return True
    except OSError:
        return False


def check_output_path(path: str, option: str) -> None:
    """Raise UsageError, saying why, unless `path` names a file we may create or replace."""
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise UsageError(f"{option} {path}: that is a folder; name a file in it")
    if not folder.is_dir():
        raise UsageError(f"{option} {path}: the folder {folder} does not exist")
    if target.exists():
        if not os.access(target, os.W_OK):
            raise UsageError(f"{option} {path}: not allowed to write to it")
    elif not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: not allowed to create files in {folder}")
