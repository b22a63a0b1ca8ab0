"""Read-side flow control: a transport reads only while nothing asks it to wait."""
from __future__ import annotations

import asyncio

# Reasons a client connection stops reading; each is set and cleared independently.
PEER_FULL = 1        # the other side's write buffer is above its high-water mark
PIPELINED = 2        # a further request is queued behind the one being answered
AWAITING_PEER = 4    # body or tunnel bytes are buffered until the upstream is attached

WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
PENDING_LIMIT = 64 * 1024   # bytes held for a peer that is not attached yet


class ReadGate:
    """Pauses a transport's reading while any reason is set, resumes when none is."""

    __slots__ = ("transport", "reasons")

    def __init__(self, transport: asyncio.Transport):
        self.transport = transport
        self.reasons = 0

    def close(self, reason: int) -> None:
        if not self.reasons and not self.transport.is_closing():
            self.transport.pause_reading()
        self.reasons |= reason

    def open(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons and not self.transport.is_closing():
                self.transport.resume_reading()
