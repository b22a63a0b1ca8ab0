"""A transport that keeps what is written to it, for driving the protocol classes without sockets."""
from __future__ import annotations

import asyncio


class FakeTransport(asyncio.Transport):
    def __init__(self):
        super().__init__()
        self.written = bytearray()
        self.reading = True
        self.closed = self.aborted = False

    def write(self, data):
        self.written += data

    def writelines(self, parts):
        for part in parts:
            self.write(part)

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def is_closing(self):
        return self.closed

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_extra_info(self, name, default=None):
        return ("192.0.2.7", 50000) if name == "peername" else default

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = self.aborted = True
