"""A development harness for place and route of a unit on a board, NOT the board top.

The real units have far more ports than a board has pins. :class:`DevelopmentHarness` gives a
unit exactly two pins: every input of the unit comes from one long shift register fed from
``rx``, and ``tx`` carries the registered parity of every output. Synthesis can then remove
nothing of the unit, so place and route measures its real resources and Fmax. The harness
computes nothing useful: it exists to bring up and measure the board build flow before the
real board top (UART, framing, MoE layer) exists.
"""

from amaranth import Cat, Module, Signal, Value
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["DevelopmentHarness"]


class DevelopmentHarness(wiring.Component):
    """Drives all of ``core``'s inputs from a shift register on ``rx``; ``tx`` is the parity of
    all of its outputs, registered.

    Parameters
    ----------
    core : wiring.Component
        The unit to measure; its clock domain is ``sync``.

    Members
    -------
    rx : In(1)
        Serial input, shifted one bit per cycle into the register that holds every input.
    tx : Out(1)
        XOR of every output bit of ``core``, one cycle late.
    """

    rx: In(1)
    tx: Out(1)

    def __init__(self, core):
        self.core = core
        super().__init__()

    @property
    def input_bits(self):
        """Width of the shift register: the sum of the core's input widths."""
        return sum(len(Value.cast(value)) for _, member, value in self._ports()
                   if member.flow == wiring.In)

    def _ports(self):
        return self.core.signature.flatten(self.core)

    def elaborate(self, platform):
        m = Module()
        m.submodules.core = self.core
        shift = Signal(self.input_bits)
        m.d.sync += shift.eq(Cat(self.rx, shift[:-1]))
        offset, outputs = 0, []
        for _, member, value in self._ports():
            value = Value.cast(value)
            if member.flow == wiring.In:
                m.d.comb += value.eq(shift[offset:offset + len(value)])
                offset += len(value)
            else:
                outputs.append(value)
        m.d.sync += self.tx.eq(Cat(*outputs).xor())
        return m
