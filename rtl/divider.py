"""A sequential restoring divider."""

from amaranth.hdl import Cat, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["Divider"]


class Divider(wiring.Component):
    """``num // den`` of unsigned integers, one quotient bit per cycle (restoring division).

    The quotient must fit in ``quo_bits`` bits, that is ``num < den << quo_bits`` (so ``den >
    0``); the routing weights satisfy it by construction (``num <= 2**30``, ``den >= 2**15``,
    16 quotient bits). Then the upper ``num_bits - quo_bits`` bits of ``num`` are a remainder
    below ``den`` to start from, and ``quo_bits`` steps shift in the lower bits, one each.

    An input is accepted in cycle ``c``, the quotient is valid from cycle ``c + quo_bits + 1``
    until it is taken, and the next input is accepted in the cycle the quotient is taken at the
    earliest.

    Parameters
    ----------
    num_bits, den_bits, quo_bits : int
        Widths of the unsigned numerator, denominator and quotient.

    Members
    -------
    i : In(stream.Signature(StructLayout({"num": unsigned(num_bits), "den": unsigned(den_bits)})))
    o : Out(stream.Signature(unsigned(quo_bits)))
    """

    def __init__(self, num_bits, den_bits, quo_bits):
        for name, bits in (("num_bits", num_bits), ("den_bits", den_bits),
                           ("quo_bits", quo_bits)):
            if not isinstance(bits, int) or bits < 1:
                raise TypeError(f"{name} must be a positive integer, not {bits!r}")
        self.num_bits = num_bits
        self.den_bits = den_bits
        self.quo_bits = quo_bits
        super().__init__({
            "i": In(stream.Signature(data.StructLayout({
                "num": unsigned(num_bits),
                "den": unsigned(den_bits),
            }))),
            "o": Out(stream.Signature(unsigned(quo_bits))),
        })

    def elaborate(self, platform):
        m = Module()

        den   = Signal(self.den_bits)
        rem   = Signal(self.den_bits)           # always below den
        low   = Signal(self.quo_bits)           # numerator bits still to come, then quotient bits
        steps = Signal(range(self.quo_bits + 1))

        trial = Cat(low[-1], rem)
        fits  = trial >= den
        m.d.comb += self.o.payload.eq(low)

        m.d.comb += self.i.ready.eq((steps == 0) & (~self.o.valid | self.o.ready))
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [
                den.eq(self.i.payload.den),
                rem.eq(self.i.payload.num[self.quo_bits:]),
                low.eq(self.i.payload.num[:self.quo_bits]),
                steps.eq(self.quo_bits),
            ]
        with m.Elif(steps != 0):
            m.d.sync += [
                rem.eq(Mux(fits, trial - den, trial)),
                low.eq(Cat(fits, low[:-1])),
                steps.eq(steps - 1),
                self.o.valid.eq(steps == 1),
            ]
        return m
