"""A stream register slice that registers the payload, ``valid`` and ``ready``."""

from amaranth import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["SkidBuffer"]


class SkidBuffer(wiring.Component):
    """Passes a stream on through registers: no combinational path from ``i`` to ``o`` nor from
    ``o.ready`` to ``i.ready``, so it cuts a long path (a wide memory's read multiplexer, a
    ready that fans out to many enables) in two.

    One beat a cycle when ``o`` is always ready; a beat taken on ``i`` appears on ``o`` in the
    next cycle. When ``o`` stalls, the beat taken in that cycle waits in a second register (the
    skid) and ``i`` is not ready until it has gone on. Beats are neither lost nor repeated, in
    order, with any pattern of ``i.valid`` and ``o.ready``.

    Parameters
    ----------
    shape : shape-like
        The payload.

    Members
    -------
    i : In(stream.Signature(shape))
    o : Out(stream.Signature(shape))
    """

    def __init__(self, shape):
        super().__init__({"i": In(stream.Signature(shape)), "o": Out(stream.Signature(shape))})

    def elaborate(self, platform):
        m = Module()
        skid_valid = Signal()
        skid = Signal.like(self.i.payload)
        m.d.comb += self.i.ready.eq(~skid_valid)
        with m.If(~self.o.valid | self.o.ready):
            with m.If(skid_valid):
                m.d.sync += [self.o.valid.eq(1), self.o.payload.eq(skid), skid_valid.eq(0)]
            with m.Else():
                m.d.sync += [self.o.valid.eq(self.i.valid), self.o.payload.eq(self.i.payload)]
        with m.Elif(self.i.valid & ~skid_valid):
            m.d.sync += [skid_valid.eq(1), skid.eq(self.i.payload)]
        return m
