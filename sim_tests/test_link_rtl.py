"""The device's link (rtl/link.py: UART, COBS, frame receiver and transmitter) on Verilator,
against the host side's encoder and decoder (host/link.py) bit for bit.

A cocotb "host" drives ``rx`` bit by bit with frames from ``host.link.encode_frame`` and
samples ``tx`` at the middle of every bit, cutting what it reads at the delimiters and decoding
each frame with ``host.link.decode_frame``. ``o`` is taken with random stalls, ``i`` is fed
with random stalls.
"""

import random
import struct
import zlib

import cocotb
from amaranth.lib import data
from cocotb.triggers import ClockCycles, FallingEdge
from harness import beat, report, run, start, stream_sink, stream_source

from moefpga.host.link import (
    MAX_PAYLOAD,
    Frame,
    FrameError,
    Identity,
    Type,
    cobs_encode,
    decode_frame,
    encode_frame,
)
from moefpga.rtl.link import LINK_STATS as STATS
from moefpga.rtl.link import Link, MessageByte, SendByte

DIVISOR = 4
# Longer than the encoder's backlog (a block of 254 bytes) on the wire plus an ACK's round trip.
ACK_TIMEOUT = 12_000
RETRIES = 2
IDENTITY = Identity(link_version=1, record_version=1, lanes=2, m=4, n=2, weight_bits=4,
                    group_size=16, hidden=32, ffn=32, experts=4, top_k=2, shared=2, slots=3,
                    layers=1, max_tokens=4, clock_hz=12_000_000, max_payload=MAX_PAYLOAD)


def _top():
    return Link(divisor=DIVISOR, identity=IDENTITY.to_bytes(), ack_timeout=ACK_TIMEOUT,
                retries=RETRIES)


def test_link_rtl(sim_report):
    records = run(_top(), name="link_top", config=f"link{DIVISOR}", test_module=__name__,
                  parameters={})
    sim_report.extend(record["text"] for record in records)
    assert {record["test"] for record in records} == {"receive", "faults", "stalled", "transmit"}


class Host:
    """The host's end of the line, built on host.link's encoder and decoder; with
    ``streams``, also the link's ``o`` and ``i`` with 30 % stalls."""

    def __init__(self, dut, streams=True):
        self.dut, self.clk = dut, dut.clk
        self.segments = []          # raw bytes between delimiters, as read on ``tx``
        self.frames = []            # decode_frame of each segment, or "bad"
        self._raw = bytearray()
        self.delivered = []         # (type, data, last, empty) of every beat on ``o``
        dut.rx.value = 1
        cocotb.start_soon(self._listen())
        if streams:
            self.sink = stream_sink(dut, "o", seed=11, stall=0.3)
            self.source = stream_source(dut, "i", seed=12, stall=0.3)
            cocotb.start_soon(self._take())

    async def _listen(self):
        while True:
            await FallingEdge(self.dut.tx)
            await ClockCycles(self.clk, DIVISOR // 2)
            bits = []
            for _ in range(9):
                await ClockCycles(self.clk, DIVISOR)
                bits.append(int(self.dut.tx.value))
            assert bits[8] == 1, "stop bit low on tx"
            byte = sum(b << k for k, b in enumerate(bits[:8]))
            if byte:
                self._raw.append(byte)
            elif self._raw:
                raw, self._raw = bytes(self._raw), bytearray()
                self.segments.append(raw)
                try:
                    self.frames.append(decode_frame(raw))
                except FrameError:
                    self.frames.append("bad")

    async def _take(self):
        while True:
            view = data.Const(MessageByte, int((await self.sink.recv()).payload))
            self.delivered.append((int(view.type), int(view.data), int(view.last),
                                   int(view.empty)))

    async def send_bytes(self, wire, bad_stop_at=None):
        """Drive ``wire`` on ``rx``; the byte at index ``bad_stop_at`` gets a low stop bit."""
        for k, byte in enumerate(wire):
            stop = 0 if k == bad_stop_at else 1
            for bit in [0, *((byte >> i) & 1 for i in range(8)), stop]:
                self.dut.rx.value = bit
                await ClockCycles(self.clk, DIVISOR)
            self.dut.rx.value = 1

    async def send(self, kind, seq, payload=b"", more=False):
        await self.send_bytes(encode_frame(Frame(kind, seq, payload, more)))

    async def expect(self, count, limit=200_000):
        """The next ``count`` frames read on ``tx`` (waiting at most ``limit`` cycles)."""
        waited = 0
        while len(self.frames) < count:
            assert waited < limit, f"only {len(self.frames)} of {count} frames came"
            await ClockCycles(self.clk, 100)
            waited += 100
        frames, self.frames = self.frames[:count], self.frames[count:]
        self.last_segments, self.segments = self.segments[:count], self.segments[count:]
        return frames

    async def quiet(self, cycles):
        """Wait ``cycles``; nothing may be sent meanwhile."""
        await ClockCycles(self.clk, cycles)
        assert self.frames == [], self.frames

    def taken(self):
        """The beats delivered on ``o`` so far, cleared."""
        beats, self.delivered = self.delivered, []
        return beats

    async def hello(self, seq):
        """HELLO: its ACK and IDENTIFY with sequence 0, equal to host.link's bytes, ACKed."""
        await self.send(Type.HELLO, seq)
        frames = await self.expect(2)
        assert frames[0] == Frame(Type.ACK, seq, b"", False)
        assert frames[1] == Frame(Type.IDENTIFY, 0, IDENTITY.to_bytes(), False)
        assert b"\0" + self.last_segments[1] + b"\0" == encode_frame(frames[1])
        assert Identity.from_bytes(frames[1].payload) == IDENTITY
        await self.send(Type.ACK, 0)


def _stats(dut):
    return data.Const(STATS, int(dut.stats.value))


def _message(beats, kind):
    """The payload of beats of one message of ``kind``; ``last`` only on the final beat."""
    assert all(t == kind for t, _, _, _ in beats)
    assert [last for _, _, last, _ in beats] == [0] * (len(beats) - 1) + [1]
    return bytes(b for _, b, _, _ in beats)


@cocotb.test()
async def receive(dut):
    """HELLO gives ACK and IDENTIFY; a 300-byte ROUTER, a 2100-byte LOAD EXPERT over three
    frames (MORE), and an empty READ COUNTERS are each ACKed and come out on ``o`` whole."""
    await start(dut)
    host = Host(dut)
    await host.hello(seq=5)
    rng = random.Random(1)
    router = rng.randbytes(300)
    await host.send(Type.ROUTER, 6, router)
    assert await host.expect(1) == [Frame(Type.ACK, 6, b"", False)]
    assert _message(host.taken(), Type.ROUTER) == router

    record = rng.randbytes(2100)
    for k, seq in enumerate([7, 8, 9]):
        await host.send(Type.LOAD_EXPERT, seq, record[k * MAX_PAYLOAD:(k + 1) * MAX_PAYLOAD],
                        more=k < 2)
        assert await host.expect(1) == [Frame(Type.ACK, seq, b"", False)]
    assert _message(host.taken(), Type.LOAD_EXPERT) == record

    await host.send(Type.READ_COUNTERS, 10)
    assert await host.expect(1) == [Frame(Type.ACK, 10, b"", False)]
    assert host.taken() == [(Type.READ_COUNTERS, 0, 1, 1)]
    stats = _stats(dut)
    assert all(int(stats[name]) == 0 for name in STATS.members)
    report("link receive: HELLO -> ACK + IDENTIFY (bytes equal host.link's); 300-byte ROUTER, "
           "2100-byte LOAD EXPERT in 3 frames, empty READ COUNTERS delivered whole, each ACKed",
           test="receive")


def _send_beat(kind, byte, last):
    return beat(SendByte.const({"type": int(kind), "data": byte, "last": last}).as_bits())


def _frame_body(kind, seq, payload, length=None):
    body = struct.pack("<BBH", kind, seq, len(payload) if length is None else length) + payload
    return body + zlib.crc32(body).to_bytes(4, "little")


def _wire(body):
    return b"\0" + cobs_encode(body) + b"\0"


@cocotb.test()
async def faults(dut):
    """Broken frames (bad CRC, cut, garbage, too long, wrong length field, a UART framing
    error inside) are NAKed with the expected sequence number and deliver nothing; an unknown
    type is ACKed and dropped; a duplicate is ACKed and delivered once; the good frames in
    between arrive whole."""
    await start(dut)
    host = Host(dut)
    await host.hello(seq=0)
    good = random.Random(2).randbytes(200)
    body = bytearray(_frame_body(Type.ROUTER, 1, good))
    body[-1] ^= 0x10
    broken = [
        ("bad CRC", _wire(bytes(body))),
        ("cut", encode_frame(Frame(Type.ROUTER, 1, good))[:-7] + b"\0"),
        ("garbage", b"\x13\x37garbage\x01\0"),
        ("too long", _wire(_frame_body(Type.ROUTER, 1, bytes(MAX_PAYLOAD + 1)))),
        ("length field", _wire(_frame_body(Type.ROUTER, 1, good, length=199))),
        ("CRC only", _wire(zlib.crc32(b"").to_bytes(4, "little"))),
    ]
    for name, wire in broken:
        await host.send_bytes(wire)
        assert await host.expect(1) == [Frame(Type.NAK, 1, b"", False)], name
    await host.send_bytes(encode_frame(Frame(Type.ROUTER, 1, good)), bad_stop_at=50)
    assert await host.expect(1) == [Frame(Type.NAK, 1, b"", False)]
    assert host.taken() == []

    await host.send(Type.RESULTS, 1, b"from the host?")
    assert await host.expect(1) == [Frame(Type.ACK, 1, b"", False)]
    await host.send(Type.ROUTER, 2, good)
    assert await host.expect(1) == [Frame(Type.ACK, 2, b"", False)]
    await host.send(Type.ROUTER, 2, good)
    assert await host.expect(1) == [Frame(Type.ACK, 2, b"", False)]
    await host.send(Type.RUN_TOKENS, 3, b"\x00\x01\x02")
    assert await host.expect(1) == [Frame(Type.ACK, 3, b"", False)]
    beats = host.taken()
    assert _message(beats[:200], Type.ROUTER) == good
    assert _message(beats[200:], Type.RUN_TOKENS) == b"\x00\x01\x02"
    stats = _stats(dut)
    assert (int(stats.bad), int(stats.unknown), int(stats.duplicates), int(stats.busy)) == (
        len(broken) + 1, 1, 1, 0)
    # The bytes after the bad stop bit are misframed until an idle line: at least one error.
    assert int(stats.framing) >= 1
    report(f"link faults: {len(broken) + 1} broken frames NAKed (bad CRC, cut, garbage, too "
           f"long, length field, CRC only, UART framing error), unknown type ACKed and "
           f"dropped, a duplicate ACKed and delivered once", test="faults")


@cocotb.test()
async def stalled(dut):
    """``o`` stalls: a frame is held unacknowledged while it cannot be delivered; the host's
    retransmission of it is dropped unanswered (``busy``); a HELLO drops the stuck delivery and
    is answered; after it the next frame is delivered alone."""
    await start(dut)
    host = Host(dut)
    await host.hello(seq=0)
    host.sink.clear_pause_generator()
    host.sink.pause = True
    stuck, fresh = b"stuck" * 20, b"fresh" * 20
    await host.send(Type.ROUTER, 1, stuck)
    await host.quiet(5000)
    await host.send(Type.ROUTER, 1, stuck)
    await host.quiet(5000)
    await host.hello(seq=7)
    host.sink.pause = False
    await host.send(Type.ROUTER, 8, fresh)
    assert await host.expect(1) == [Frame(Type.ACK, 8, b"", False)]
    assert _message(host.taken(), Type.ROUTER) == fresh
    stats = _stats(dut)
    assert (int(stats.busy), int(stats.bad), int(stats.duplicates)) == (1, 0, 0)
    report("link stalled: a frame held unACKed while o stalls, its resend dropped (busy), "
           "HELLO drops the stuck delivery and answers, the next frame delivered alone",
           test="stalled")


@cocotb.test()
async def transmit(dut):
    """A 1500-byte RESULTS message from ``i`` goes out as a 1024-byte frame with MORE and a
    476-byte frame, each equal to host.link's encoding; the first is sent again after the ACK
    timeout and again at once on a NAK, the second only after the first is ACKed. A message
    never ACKed is sent 1 + ``retries`` times, then ``gave_up`` rises."""
    await start(dut)
    host = Host(dut)
    await host.hello(seq=9)
    results = random.Random(3).randbytes(1500)
    for k, byte in enumerate(results):
        host.source.send_nowait(_send_beat(Type.RESULTS, byte, k == len(results) - 1))
    first = Frame(Type.RESULTS, 1, results[:MAX_PAYLOAD], True)
    second = Frame(Type.RESULTS, 2, results[MAX_PAYLOAD:], False)

    async def one(frame):
        [got] = await host.expect(1)
        assert got == frame
        assert b"\0" + host.last_segments[0] + b"\0" == encode_frame(frame)

    await one(first)                        # not ACKed: sent again after the timeout
    await one(first)
    await host.send(Type.NAK, 1)            # NAKed: sent again at once
    await one(first)
    await host.send(Type.ACK, 1)
    await one(second)
    await host.send(Type.ACK, 2)
    await host.quiet(ACK_TIMEOUT + 3000)
    assert int(_stats(dut).resent) == 2 and dut.gave_up.value == 0

    host.source.send_nowait(_send_beat(Type.REQUEST, 7, True))
    for _ in range(1 + RETRIES):
        await one(Frame(Type.REQUEST, 3, b"\x07", False))
    await host.quiet(ACK_TIMEOUT + 3000)
    assert dut.gave_up.value == 1
    await host.send(Type.ACK, 3)            # a late ACK still frees it
    await ClockCycles(dut.clk, 20 * DIVISOR * 10)
    assert dut.gave_up.value == 0
    report(f"link transmit: 1500 bytes as 1024 (MORE) + 476-byte frames equal to host.link's; "
           f"resent after {ACK_TIMEOUT} cycles without ACK and at once on NAK; "
           f"{1 + RETRIES} tries then gave_up, cleared by a late ACK", test="transmit")

