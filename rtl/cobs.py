"""Streaming COBS: :class:`CobsDecoder` and :class:`CobsEncoder`, the framing of the host link.

Both equal ``host.link.cobs_decode`` / ``cobs_encode`` (docs/link.md, "Frames"): a block is a
code byte ``k`` and ``k - 1`` nonzero bytes, followed by an implied zero unless ``k`` is 0xFF or
the block ends the frame; 0x00 delimits frames.
"""

from amaranth import Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

__all__ = ["FrameByte", "DecodedByte", "CobsDecoder", "CobsEncoder"]

#: A byte of a frame; ``last`` on its last byte.
FrameByte = data.StructLayout({"data": unsigned(8), "last": 1})

#: A decoder output beat: a decoded byte (``end`` = 0, ``ok`` = 0), or the end of a frame
#: (``end`` = 1, ``data`` = 0) with ``ok`` = 1 if its COBS was intact, 0 if a delimiter came
#: inside a block.
DecodedByte = data.StructLayout({"data": unsigned(8), "end": 1, "ok": 1})

_BLOCK = 254


class CobsDecoder(wiring.Component):
    """Decodes a COBS byte stream (``i``, the raw bytes between and including delimiters) into
    frames on ``o``: each decoded byte, then one ``end`` beat at the frame's closing delimiter.
    Delimiters with no frame before them (between frames, or doubled) give nothing.

    ``o`` is combinational from ``i``: a byte passes in the cycle it arrives, except the
    implied zero before a block, which takes a cycle of its own (``i.ready`` low). No buffer.

    Members
    -------
    i : In(stream.Signature(8))
    o : Out(stream.Signature(DecodedByte))
    """
    i: In(stream.Signature(8))
    o: Out(stream.Signature(DecodedByte))

    def elaborate(self, platform):
        m = Module()
        remaining = Signal(range(_BLOCK + 1))   # data bytes left in the block; 0: a code next
        zero = Signal()                         # the block ends with an implied zero
        started = Signal()                      # bytes since the last delimiter
        byte = self.i.payload
        moved = self.o.valid & self.o.ready

        with m.If(self.i.valid):
            with m.If(byte == 0):
                with m.If(started):
                    m.d.comb += [self.o.valid.eq(1), self.o.payload.end.eq(1),
                                 self.o.payload.ok.eq(remaining == 0),
                                 self.i.ready.eq(self.o.ready)]
                    with m.If(moved):
                        m.d.sync += [remaining.eq(0), zero.eq(0), started.eq(0)]
                with m.Else():
                    m.d.comb += self.i.ready.eq(1)
            with m.Elif(remaining == 0):
                with m.If(zero):
                    m.d.comb += self.o.valid.eq(1)
                    with m.If(moved):
                        m.d.sync += zero.eq(0)
                with m.Else():
                    m.d.comb += self.i.ready.eq(1)
                    m.d.sync += [remaining.eq(byte - 1), zero.eq(byte != 0xFF), started.eq(1)]
            with m.Else():
                m.d.comb += [self.o.valid.eq(1), self.o.payload.data.eq(byte),
                             self.i.ready.eq(self.o.ready)]
                with m.If(moved):
                    m.d.sync += remaining.eq(remaining - 1)
        return m


class CobsEncoder(wiring.Component):
    """Encodes each frame of ``i`` (``last`` on its last byte) as ``00 | COBS(frame) | 00`` on
    ``o``, bit for bit ``b"\\0" + host.link.cobs_encode(frame) + b"\\0"``.

    A block is gathered in a 254-byte memory, then sent: its code, its bytes. ``i`` is ready
    while a block is gathered (a byte per cycle) and not while one is sent, so a frame of n
    bytes takes about 2 n cycles plus one per block and three at the ends; far faster than a
    UART.

    Members
    -------
    i : In(stream.Signature(FrameByte))
    o : Out(stream.Signature(8))
    """
    i: In(stream.Signature(FrameByte))
    o: Out(stream.Signature(8))

    def elaborate(self, platform):
        m = Module()
        m.submodules.block = block = Memory(shape=8, depth=_BLOCK, init=[])
        wr, rd = block.write_port(), block.read_port()
        count = Signal(range(_BLOCK + 1))       # bytes in the block
        code = Signal(8)
        final = Signal()                        # the frame ends with this block (or its tail)
        tail = Signal()                         # an empty block 01 follows (the frame ended
                                                # with a zero byte)
        index = Signal(range(_BLOCK))
        next_index = Signal.like(index)
        moved = self.o.valid & self.o.ready
        byte, last = self.i.payload.data, self.i.payload.last
        m.d.comb += [rd.addr.eq(next_index), wr.addr.eq(count), wr.data.eq(byte)]
        m.d.sync += index.eq(next_index)

        def after_block():
            with m.If(tail):
                m.next = "TAIL"
            with m.Elif(final):
                m.next = "CLOSE"
            with m.Else():
                m.d.sync += count.eq(0)
                m.next = "GATHER"

        with m.FSM():
            with m.State("OPEN"):
                m.d.comb += [self.o.valid.eq(self.i.valid), self.o.payload.eq(0)]
                with m.If(moved):
                    m.d.sync += count.eq(0)
                    m.next = "GATHER"
            with m.State("GATHER"):
                m.d.comb += self.i.ready.eq(1)
                with m.If(self.i.valid):
                    m.d.sync += [final.eq(last), tail.eq(0)]
                    with m.If(byte == 0):
                        m.d.sync += [code.eq(count + 1), tail.eq(last)]
                        m.next = "CODE"
                    with m.Else():
                        m.d.comb += wr.en.eq(1)
                        m.d.sync += count.eq(count + 1)
                        with m.If(count == _BLOCK - 1):
                            m.d.sync += code.eq(0xFF)
                            m.next = "CODE"
                        with m.Elif(last):
                            m.d.sync += code.eq(count + 2)
                            m.next = "CODE"
            with m.State("CODE"):
                m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(code), next_index.eq(0)]
                with m.If(moved):
                    with m.If(count == 0):
                        after_block()
                    with m.Else():
                        m.next = "DATA"
            with m.State("DATA"):
                m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(rd.data),
                             next_index.eq(Mux(moved, index + 1, index))]
                with m.If(moved & (index == count - 1)):
                    after_block()
            with m.State("TAIL"):
                m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(0x01)]
                with m.If(moved):
                    m.next = "CLOSE"
            with m.State("CLOSE"):
                m.d.comb += [self.o.valid.eq(1), self.o.payload.eq(0)]
                with m.If(moved):
                    m.next = "OPEN"
        return m
