"""Byte transports under the host link (docs/link.md): a serial port, or an in-process pipe.

A :class:`Transport` moves raw bytes; it knows nothing of frames. :class:`SerialTransport` opens
a board's serial port (or the Verilator twin's pseudo-terminal) with pyserial;
:func:`pipe_pair` gives two connected in-process ends for tests and simulations.
"""

import errno
import queue
import threading
import time
from typing import Protocol

from ..hls_models.errors import MoefpgaError

__all__ = ["Transport", "SerialTransport", "PipeTransport", "pipe_pair"]


class Transport(Protocol):
    """A full-duplex byte stream.

    ``read`` returns at least one byte and at most ``limit``, or ``b""`` once ``timeout``
    seconds have passed with nothing to read; it never blocks longer than ``timeout``.
    ``write`` sends all of ``data``. Both raise :class:`MoefpgaError` when the transport is
    closed or broken.
    """

    def read(self, limit: int, timeout: float) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class SerialTransport:
    """A serial port through pyserial, 8N1 at ``baud``, no flow control.

    Raises :class:`MoefpgaError` naming the port when it does not exist, is busy (opened
    exclusively by another process) or cannot be configured.
    """

    def __init__(self, port, baud=115200):
        import serial

        self.port = port
        try:
            self._serial = serial.Serial(port, baud, timeout=0, write_timeout=5.0,
                                         exclusive=True)
        except (serial.SerialException, OSError, ValueError) as error:
            code = getattr(error, "errno", None)
            if code == errno.ENOENT:
                raise MoefpgaError(f"serial port {port} does not exist") from None
            if code in (errno.EAGAIN, errno.EBUSY):
                raise MoefpgaError(f"serial port {port} is busy (opened by another "
                                   f"program)") from None
            raise MoefpgaError(f"cannot open serial port {port}: {error}") from None

    def read(self, limit, timeout):
        import serial

        self._serial.timeout = max(timeout, 0.0)
        try:
            first = self._serial.read(1)
            if not first:
                return b""
            self._serial.timeout = 0
            return first + self._serial.read(min(limit - 1, self._serial.in_waiting))
        except (serial.SerialException, OSError) as error:
            raise MoefpgaError(f"serial port {self.port} failed: {error}") from None

    def write(self, data):
        import serial

        try:
            self._serial.write(data)
            self._serial.flush()
        except (serial.SerialException, OSError) as error:
            raise MoefpgaError(f"serial port {self.port} failed: {error}") from None

    def close(self):
        self._serial.close()


class PipeTransport:
    """One end of an in-process byte pipe (see :func:`pipe_pair`); thread-safe.

    ``fault``, if given, is called with every chunk written and returns what the other end
    receives instead: tests use it to flip, drop or insert bytes.
    """

    def __init__(self, incoming, outgoing, fault=None):
        self._incoming, self._outgoing = incoming, outgoing
        self._pending = b""
        self._closed = threading.Event()
        self.fault = fault

    def read(self, limit, timeout):
        deadline = time.monotonic() + max(timeout, 0.0)
        while not self._pending:
            if self._closed.is_set():
                raise MoefpgaError("the pipe transport is closed")
            try:
                self._pending = self._incoming.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return b""
        data, self._pending = self._pending[:limit], self._pending[limit:]
        return data

    def write(self, data):
        if self._closed.is_set():
            raise MoefpgaError("the pipe transport is closed")
        data = bytes(data)
        if self.fault is not None:
            data = bytes(self.fault(data))
        if data:
            self._outgoing.put(data)

    def close(self):
        self._closed.set()


def pipe_pair():
    """Two connected :class:`PipeTransport` ends: what one writes, the other reads."""
    a_to_b, b_to_a = queue.Queue(), queue.Queue()
    return PipeTransport(b_to_a, a_to_b), PipeTransport(a_to_b, b_to_a)
