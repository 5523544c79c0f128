"""Requantization of an accumulator: ``fixedpoint.requantize`` in gateware."""

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for

from moefpga.hls_models.fixedpoint import MAX_SHIFT
from moefpga.hls_models.fixedpoint import Multiplier as _ModelMultiplier

__all__ = ["SHIFT_BITS", "Multiplier", "saturated", "Requantizer"]

#: Width of a multiplier's signed shift on the ports.
SHIFT_BITS = 8


class Multiplier(data.Struct):
    """A static scale factor ``mult * 2**-shift`` (``fixedpoint.Multiplier``), as ports carry it.

    The shift is signed 8-bit: factors from ``2**-127`` to ``2**128`` (``multiplier_for`` gives
    shifts near 16 for the factors of a real layer).
    """
    mult:  unsigned(_ModelMultiplier.BITS)
    shift: signed(SHIFT_BITS)


def saturated(value, bits):
    """``value`` clamped to the signed range of ``bits`` bits (an expression of that width)."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return Mux(value > hi, hi, Mux(value < lo, lo, value))[:bits].as_signed()


class Requantizer(wiring.Component):
    """``sat(rshift(value * mult, shift), out_bits)``, bit for bit ``fixedpoint.requantize``.

    A right shift (``shift >= 0``) rounds half up: ``((2 * v) >> shift) + 1) >> 1`` with ``v =
    value * mult``, which is ``floor((v + 2**(shift - 1)) / 2**shift)`` (and ``v`` for
    ``shift = 0``). The amount is clamped to ``min(62, width of v)``: the model clamps at 62, and
    a shift by the width of ``v`` or more gives 0 either way. A left shift (``shift < 0``)
    saturates like an infinitely wide one: ``v`` is first clipped to ``[-2**out_bits,
    2**out_bits]`` and the amount to ``out_bits``, as the model does.

    A pipeline of :attr:`latency` stages: an input accepted in cycle ``c`` is presented on
    ``o`` in cycle ``c + latency`` when ``o`` is not back-pressured; every stage holds while
    ``o`` is valid and not ready. Two stages (product, then shift, rounding and saturation), or
    with ``pipelined`` four (product; shift and clip; rounding and left shift; saturation),
    which takes the variable shift, the rounding adder and the saturation off one path.

    Parameters
    ----------
    value_bits : int
        Width of the signed input value (an accumulator).
    out_bits : int
        Width of the signed result.
    shift_bits : int
        Width of the signed shift amount.
    pipelined : bool
        Four stages instead of two.

    Attributes
    ----------
    latency : int
        Cycles from input to output: 2, or 4 with ``pipelined``.

    Members
    -------
    i : In(stream.Signature(StructLayout({"value", "mult", "shift"})))
        ``value``: signed ``value_bits``; ``mult``: unsigned 16; ``shift``: signed ``shift_bits``.
    o : Out(stream.Signature(signed(out_bits)))
    """

    def __init__(self, value_bits, out_bits, shift_bits, *, pipelined=False):
        for name, bits in (("value_bits", value_bits), ("out_bits", out_bits),
                           ("shift_bits", shift_bits)):
            if not isinstance(bits, int) or bits < 2:
                raise TypeError(f"{name} must be an integer of at least 2, not {bits!r}")
        self.value_bits = value_bits
        self.out_bits   = out_bits
        self.shift_bits = shift_bits
        self.pipelined  = pipelined
        self.latency    = 4 if pipelined else 2
        super().__init__({
            "i": In(stream.Signature(data.StructLayout({
                "value": signed(value_bits),
                "mult":  unsigned(_ModelMultiplier.BITS),
                "shift": signed(shift_bits),
            }))),
            "o": Out(stream.Signature(signed(out_bits))),
        })

    def elaborate(self, platform):
        m = Module()

        product_bits = self.value_bits + _ModelMultiplier.BITS
        right_max    = min(MAX_SHIFT, product_bits)
        shift        = self.i.payload.shift
        product      = Signal(signed(product_bits))
        right        = Signal()
        amount       = Signal(range(max(right_max, self.out_bits) + 1))
        staged       = Signal()

        advance = ~self.o.valid | self.o.ready
        m.d.comb += self.i.ready.eq(advance)

        def stage(name, value):
            """``value`` through a pipeline register when ``pipelined``."""
            if not self.pipelined:
                return value
            reg = Signal(value.shape(), name=name)
            m.d.sync += reg.eq(value)
            return reg

        with m.If(advance):
            m.d.sync += [
                staged.eq(self.i.valid),
                product.eq(self.i.payload.value * self.i.payload.mult),
                right.eq(shift >= 0),
                amount.eq(Mux(shift >= 0, Mux(shift > right_max, right_max, shift),
                              Mux(-shift > self.out_bits, self.out_bits, -shift))),
            ]

            bound   = 1 << self.out_bits
            halved  = stage("halved", (product << 1) >> amount)
            clipped = stage("clipped", Mux(product > bound, bound,
                                           Mux(product < -bound, -bound, product)))
            left    = stage("left", amount[:bits_for(self.out_bits)])
            right_2 = stage("right_2", right)
            rounded = stage("rounded", (halved + 1) >> 1)
            widened = stage("widened", clipped[:self.out_bits + 2].as_signed() << left)
            right_3 = stage("right_3", right_2)
            valid = staged
            for n in range(self.latency - 2):
                valid = stage(f"staged_{n + 2}", valid)
            m.d.sync += [
                self.o.valid.eq(valid),
                self.o.payload.eq(saturated(Mux(right_3, rounded, widened), self.out_bits)),
            ]
        return m
