"""An 8N1 UART: :class:`UartRx` and :class:`UartTx`, ``divisor`` clock cycles per bit.

The host link (docs/link.md) runs over them: at 12 MHz, ``divisor = 104`` is 115384 baud, 0.16 %
from 115200.
"""

from amaranth import Cat, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["UartRx", "UartTx"]

_MIN_DIVISOR = 4


def _check(divisor):
    if not isinstance(divisor, int) or divisor < _MIN_DIVISOR:
        raise ValueError(f"divisor must be an integer >= {_MIN_DIVISOR}, not {divisor!r}")


class UartRx(wiring.Component):
    """Receives 8N1 bytes from the line ``rx`` (idle high), LSB first.

    ``rx`` passes two flip-flops (it may be asynchronous). A falling edge starts a byte; each
    bit is read as the majority of three samples around its middle: the start bit (still low,
    else the edge was a glitch and is ignored), the 8 data bits, the stop bit. A stop bit read
    low is a framing error: the byte is dropped, ``framing_error`` is high for a cycle, and the
    receiver waits for the line to be high before it looks for the next start bit (so a break
    gives one error, not a stream of bytes). A byte that completes while the previous one is
    still waiting on ``o`` is dropped and ``overrun`` is high for a cycle.

    Members
    -------
    rx : In(1)
        The line.
    o : Out(stream.Signature(8))
        The bytes received; ``valid`` from the cycle after the stop bit's middle.
    framing_error, overrun : Out(1)
        One-cycle strobes.
    """
    rx:            In(1, init=1)
    o:             Out(stream.Signature(8))
    framing_error: Out(1)
    overrun:       Out(1)

    def __init__(self, divisor):
        _check(divisor)
        self.divisor = divisor
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        sync = Signal(2, init=0b11)
        samples = Signal(3, init=0b111)
        m.d.sync += [sync.eq(Cat(self.rx, sync[0])), samples.eq(Cat(sync[1], samples[:2]))]
        bit = ((samples[0] & samples[1]) | (samples[0] & samples[2])
               | (samples[1] & samples[2]))
        line = sync[1]

        timer = Signal(range(self.divisor))
        count = Signal(range(8))
        shift = Signal(8)
        expired = timer == 0
        with m.If(~expired):
            m.d.sync += timer.eq(timer - 1)
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(~line):
                    # ``bit`` is centred on ``line`` two cycles back, so it reads the start
                    # bit's middle when the timer expires, divisor // 2 + 1 cycles from here.
                    m.d.sync += timer.eq(self.divisor // 2)
                    m.next = "START"
            with m.State("START"):
                with m.If(expired):
                    m.d.sync += timer.eq(self.divisor - 1)
                    with m.If(bit):
                        m.next = "IDLE"
                    with m.Else():
                        m.next = "DATA"
            with m.State("DATA"):
                with m.If(expired):
                    m.d.sync += [timer.eq(self.divisor - 1), shift.eq(Cat(shift[1:], bit)),
                                 count.eq(count + 1)]
                    with m.If(count == 7):
                        m.next = "STOP"
            with m.State("STOP"):
                with m.If(expired):
                    with m.If(~bit):
                        m.d.comb += self.framing_error.eq(1)
                        m.next = "BREAK"
                    with m.Elif(self.o.valid & ~self.o.ready):
                        m.d.comb += self.overrun.eq(1)
                        m.next = "IDLE"
                    with m.Else():
                        m.d.sync += [self.o.payload.eq(shift), self.o.valid.eq(1)]
                        m.next = "IDLE"
            with m.State("BREAK"):
                with m.If(line):
                    m.next = "IDLE"
        return m


class UartTx(wiring.Component):
    """Sends each byte of ``i`` as 8N1 on ``tx``: a start bit (low), 8 data bits LSB first, a
    stop bit (high), each ``divisor`` cycles; ``tx`` comes straight from a flip-flop and is
    high when idle. ``i`` is ready when idle and in the last cycle of a stop bit, so bytes
    offered back to back go out without a gap.

    Members
    -------
    i : In(stream.Signature(8))
    tx : Out(1)
    """
    i:  In(stream.Signature(8))
    tx: Out(1, init=1)

    def __init__(self, divisor):
        _check(divisor)
        self.divisor = divisor
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        shift = Signal(10, init=0x3FF)
        bits = Signal(range(11))
        timer = Signal(range(self.divisor))
        last_cycle = (bits == 1) & (timer == 0)     # of the stop bit
        m.d.comb += [self.tx.eq(shift[0]), self.i.ready.eq((bits == 0) | last_cycle)]
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [shift.eq(Cat(0, self.i.payload, 1)), bits.eq(10),
                         timer.eq(self.divisor - 1)]
        with m.Elif(bits != 0):
            with m.If(timer == 0):
                m.d.sync += [shift.eq(Cat(shift[1:], 1)), bits.eq(bits - 1),
                             timer.eq(self.divisor - 1)]
            with m.Else():
                m.d.sync += timer.eq(timer - 1)
        return m
