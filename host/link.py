"""The host side of the serial link protocol (docs/link.md).

Frames are COBS-encoded between 0x00 delimiters; a decoded frame is ``type, seq, length (u16
LE), payload, CRC-32 (zlib, LE)``. :class:`Link` runs the protocol over a
:class:`.transport.Transport`: stop-and-wait with an acknowledgement per frame, retransmission
on a NAK or a missing ACK with a bounded number of tries, duplicate suppression by sequence
number, and a :class:`MoefpgaError` naming the problem when the peer is gone. The same class
serves as the device's side in tests, so both directions follow one implementation.
"""

import enum
import struct
import time
import zlib
from collections import deque
from dataclasses import astuple, dataclass, fields
from typing import NamedTuple

from ..hls_models.errors import MoefpgaError

__all__ = [
    "LINK_VERSION", "MAX_PAYLOAD", "HEADER_BYTES", "CRC_BYTES", "MORE", "Type",
    "cobs_encode", "cobs_decode", "FrameError", "Frame", "encode_frame", "decode_frame",
    "Identity", "Message", "Link",
]

LINK_VERSION = 1
#: Largest payload of one frame; longer messages are split over frames (the ``MORE`` flag).
MAX_PAYLOAD = 1024
HEADER_BYTES = 4
CRC_BYTES = 4
#: Bit 7 of the type byte: another frame of the same message follows.
MORE = 0x80
_SEQ = 0x100
#: The longest COBS encoding of a frame; more bytes without a delimiter are garbage.
_MAX_ENCODED = HEADER_BYTES + MAX_PAYLOAD + CRC_BYTES + 1 + (HEADER_BYTES + MAX_PAYLOAD
                                                             + CRC_BYTES) // 254


class Type(enum.IntEnum):
    """Message types (bits 0-6 of the type byte); docs/link.md gives their payloads."""
    HELLO           = 0x01
    IDENTIFY        = 0x02
    LOAD_EXPERT     = 0x03
    PREFETCH_EXPERT = 0x04
    ROUTER          = 0x05
    RUN_TOKENS      = 0x06
    RESULTS         = 0x07
    REQUEST         = 0x08
    READ_COUNTERS   = 0x09
    COUNTERS        = 0x0A
    RESET           = 0x0B
    ACK             = 0x10
    NAK             = 0x11


#: Types that start a session: always accepted, whatever their sequence number (docs/link.md).
_SESSION_START = (Type.HELLO, Type.IDENTIFY)


def cobs_encode(data):
    """COBS encoding of ``data`` (no zero byte in the result, no delimiter added).

    Blocks of 254 nonzero bytes take the code 0xFF; data ending with such a block ends there,
    without an empty block after it: 254 nonzero bytes encode to 255 bytes.
    """
    out, block = bytearray(), bytearray()
    full = False
    for byte in data:
        full = False
        if byte == 0:
            out += bytes([len(block) + 1]) + block
            block.clear()
        else:
            block.append(byte)
            if len(block) == 254:
                out += b"\xff" + block
                block.clear()
                full = True
    if not full:
        out += bytes([len(block) + 1]) + block
    return bytes(out)


class FrameError(ValueError):
    """A received frame that must be dropped: bad COBS, length or CRC."""


def cobs_decode(data):
    """The bytes whose :func:`cobs_encode` is ``data``; :class:`FrameError` if malformed."""
    out, i = bytearray(), 0
    while i < len(data):
        code = data[i]
        if code == 0:
            raise FrameError("zero byte inside a COBS frame")
        block = data[i + 1:i + code]
        if len(block) != code - 1 or 0 in block:
            raise FrameError("COBS block cut short")
        out += block
        i += code
        if code != 0xFF and i < len(data):
            out.append(0)
    return bytes(out)


class Frame(NamedTuple):
    """One decoded frame: ``type`` (a :class:`Type` or, if unknown, an int), ``seq``, ``more``
    (another frame of the message follows) and ``payload``."""
    type: int
    seq: int
    payload: bytes
    more: bool = False


def encode_frame(frame):
    """The bytes on the wire for ``frame``: ``00 | COBS(header, payload, CRC) | 00``."""
    if len(frame.payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(frame.payload)} bytes > {MAX_PAYLOAD}")
    body = struct.pack("<BBH", int(frame.type) | (MORE if frame.more else 0), frame.seq,
                       len(frame.payload)) + bytes(frame.payload)
    return b"\0" + cobs_encode(body + zlib.crc32(body).to_bytes(CRC_BYTES, "little")) + b"\0"


def decode_frame(raw):
    """The :class:`Frame` of ``raw``, the bytes between two delimiters; :class:`FrameError` if
    its COBS, length or CRC is wrong (the type is not checked)."""
    body = cobs_decode(raw)
    if len(body) < HEADER_BYTES + CRC_BYTES:
        raise FrameError(f"frame of {len(body)} bytes is shorter than header and CRC")
    kind, seq, length = struct.unpack_from("<BBH", body)
    if length > MAX_PAYLOAD or length != len(body) - HEADER_BYTES - CRC_BYTES:
        raise FrameError(f"length field {length} disagrees with the frame")
    if zlib.crc32(body[:-CRC_BYTES]) != int.from_bytes(body[-CRC_BYTES:], "little"):
        raise FrameError("bad CRC")
    kind_bits = kind & ~MORE
    known = kind_bits in Type._value2member_map_
    return Frame(Type(kind_bits) if known else kind_bits, seq,
                 body[HEADER_BYTES:-CRC_BYTES], bool(kind & MORE))


@dataclass(frozen=True)
class Identity:
    """What a bitstream reports in IDENTIFY: its build parameters (docs/link.md).

    ``shared``: 0 no shared expert, 1 a shared expert without gate, 2 with a sigmoid gate.
    ``fmax_khz``: the clock frequency place and route achieved, in kHz; 0 when unknown (a
    simulation, or a build that did not report it).
    """
    link_version: int
    record_version: int
    lanes: int
    m: int
    n: int
    weight_bits: int
    group_size: int
    hidden: int
    ffn: int
    experts: int
    top_k: int
    shared: int
    slots: int
    layers: int
    max_tokens: int
    clock_hz: int
    max_payload: int
    fmax_khz: int = 0

    _STRUCT = struct.Struct("<BBHBBBHHHHBBBHHIHI")

    def to_bytes(self):
        return self._STRUCT.pack(*astuple(self))

    @classmethod
    def from_bytes(cls, data):
        """The identity in an IDENTIFY payload; :class:`MoefpgaError` if it is not one."""
        if len(data) != cls._STRUCT.size:
            raise MoefpgaError(f"the device's IDENTIFY has {len(data)} bytes, not "
                               f"{cls._STRUCT.size}: not a moefpga bitstream of link version "
                               f"{LINK_VERSION}")
        return cls(*cls._STRUCT.unpack(data))

    def mismatches(self, **required):
        """``"name: device X, needed Y"`` for every field of ``required`` that differs."""
        names = {f.name for f in fields(self)}
        unknown = set(required) - names
        if unknown:
            raise ValueError(f"not identity fields: {sorted(unknown)}")
        return [f"{key}: device {getattr(self, key)}, needed {value}"
                for key, value in required.items() if getattr(self, key) != value]


class Message(NamedTuple):
    """A whole received message: its type and the payloads of its frames joined."""
    type: int
    payload: bytes


class Link:
    """Stop-and-wait framing over ``transport`` (docs/link.md, "Reliability").

    :meth:`send` splits a message into frames of at most ``max_payload`` bytes and returns
    when every frame is acknowledged; a frame is sent again on a NAK for it or when no ACK
    came within ``timeout`` seconds, at most ``retries`` times more, then :meth:`send` raises
    :class:`MoefpgaError`. Received data frames are acknowledged, duplicates (a sequence number
    other than the one expected) acknowledged again and dropped, broken frames NAKed; whole
    messages queue for :meth:`receive`. ``stats`` counts frames sent, retransmissions, bad
    frames, duplicates and unknown types. Not thread-safe: one thread drives a link.
    """

    def __init__(self, transport, *, timeout=0.5, retries=8, max_payload=MAX_PAYLOAD):
        if not 1 <= max_payload <= MAX_PAYLOAD:
            raise ValueError(f"max_payload must be 1..{MAX_PAYLOAD}, not {max_payload}")
        self.transport = transport
        self.timeout, self.retries, self.max_payload = timeout, retries, max_payload
        self.stats = dict.fromkeys(["sent", "retransmitted", "bad", "duplicates", "unknown"], 0)
        self._tx_seq = 0
        self._rx_expect = 0
        self._raw = bytearray()
        self._inbox = deque()
        self._fragments = None          # (type, bytearray) of a message cut over frames
        self._acked = self._naked = None

    # -- sending -------------------------------------------------------------------------------

    def send(self, kind, payload=b""):
        """Send message ``kind`` with ``payload``; return when all its frames are acknowledged."""
        payload = bytes(payload)
        chunks = [payload[i:i + self.max_payload]
                  for i in range(0, len(payload), self.max_payload)] or [b""]
        for k, chunk in enumerate(chunks):
            self._send_frame(Frame(kind, self._tx_seq, chunk, k < len(chunks) - 1))

    def _send_frame(self, frame, answered=lambda: False):
        """Send ``frame`` until its ACK comes, or ``answered()`` holds (an answer that implies
        the peer took it)."""
        wire = encode_frame(frame)
        for attempt in range(self.retries + 1):
            self._acked = self._naked = None
            self.transport.write(wire)
            self.stats["sent"] += 1
            self.stats["retransmitted"] += attempt > 0
            deadline = time.monotonic() + self.timeout
            while self._acked != frame.seq and self._naked != frame.seq and not answered():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._pump(remaining)
            if self._acked == frame.seq or answered():
                self._tx_seq = (frame.seq + 1) % _SEQ
                return
        raise MoefpgaError(f"link: {Type(frame.type).name} frame {frame.seq} was not "
                           f"acknowledged after {self.retries + 1} tries of {self.timeout} s: "
                           f"the device does not answer")

    def _send_control(self, kind, seq):
        self.transport.write(encode_frame(Frame(kind, seq, b"")))

    # -- receiving -----------------------------------------------------------------------------

    def receive(self, timeout=None):
        """The next received :class:`Message` (IDENTIFY excepted, see :meth:`hello`); raises
        :class:`MoefpgaError` if none comes within ``timeout`` seconds (default: the link's)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            while self._inbox:
                message = self._inbox.popleft()
                if message.type != Type.IDENTIFY:
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MoefpgaError(f"link: no message from the device within {timeout} s")
            self._pump(remaining)

    def hello(self, timeout=None):
        """Start a session: send HELLO, return the device's :class:`Identity`.

        Messages received before the answer are stale and dropped.
        """
        self._rx_expect = 0
        self._inbox.clear()
        self._fragments = None
        self.transport.write(b"\0")            # ends any partial frame at the device
        # An IDENTIFY shows the device took the HELLO, even if its ACK was lost: saying HELLO
        # again would restart the device a second time.
        self._send_frame(Frame(Type.HELLO, self._tx_seq, b""), answered=lambda: any(
            message.type == Type.IDENTIFY for message in self._inbox))
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            while self._inbox:
                message = self._inbox.popleft()
                if message.type == Type.IDENTIFY:
                    return Identity.from_bytes(message.payload)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MoefpgaError("link: the device acknowledged HELLO but sent no IDENTIFY")
            self._pump(remaining)

    def poll(self, timeout=0.0):
        """Process what arrives within ``timeout`` seconds (acknowledging data frames); for a
        peer that only answers."""
        self._pump(timeout)

    def _pump(self, timeout):
        data = self.transport.read(4096, timeout)
        for byte in data:
            if byte:
                if len(self._raw) <= _MAX_ENCODED:     # beyond: garbage, kept bounded
                    self._raw.append(byte)
            elif self._raw:
                raw, self._raw = bytes(self._raw), bytearray()
                self._on_raw(raw)

    def _on_raw(self, raw):
        try:
            frame = decode_frame(raw)
        except FrameError:
            self.stats["bad"] += 1
            self._send_control(Type.NAK, self._rx_expect)
            return
        if frame.type == Type.ACK:
            self._acked = frame.seq
        elif frame.type == Type.NAK:
            self._naked = frame.seq
        elif frame.seq != self._rx_expect and frame.type not in _SESSION_START:
            self.stats["duplicates"] += 1
            self._send_control(Type.ACK, frame.seq)
        else:
            if frame.type in _SESSION_START:
                self._fragments = None          # a message cut by the restart: dropped
            if frame.type == Type.HELLO:
                self._tx_seq = 0
            self._rx_expect = (frame.seq + 1) % _SEQ
            self._send_control(Type.ACK, frame.seq)
            self._take(frame)

    def _take(self, frame):
        """Queue ``frame``'s message when complete; unknown types are counted and dropped."""
        if not isinstance(frame.type, Type):
            self.stats["unknown"] += 1
            return
        if self._fragments is not None and self._fragments[0] != frame.type:
            self._fragments = None              # a message cut off by another: dropped
        if self._fragments is None:
            self._fragments = (frame.type, bytearray())
        self._fragments[1].extend(frame.payload)
        if not frame.more:
            self._inbox.append(Message(frame.type, bytes(self._fragments[1])))
            self._fragments = None
