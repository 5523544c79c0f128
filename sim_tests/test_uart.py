"""The UART (rtl/uart.py) on Verilator: the receiver against bytes driven bit by bit from
Python at rates 3 % off the divisor, with glitches, framing errors and a break; the
transmitter's line checked cycle by cycle against 8N1 at exactly ``divisor`` cycles a bit."""

import random

import cocotb
from amaranth import Module
from amaranth.lib import wiring
from cocotb.triggers import ClockCycles, Timer
from harness import CLOCK_NS, beat, report, run, start, stream_sink, stream_source

from moefpga.rtl.uart import UartRx, UartTx

DIVISOR = 16


class Top(wiring.Component):
    """A :class:`UartRx` and a :class:`UartTx`, side by side."""

    def __init__(self, divisor):
        self.rx_unit, self.tx_unit = UartRx(divisor), UartTx(divisor)
        super().__init__({**self.rx_unit.signature.members, **self.tx_unit.signature.members})

    def elaborate(self, platform):
        m = Module()
        m.submodules.rx, m.submodules.tx = self.rx_unit, self.tx_unit
        m.d.comb += [self.rx_unit.rx.eq(self.rx), self.tx.eq(self.tx_unit.tx),
                     self.framing_error.eq(self.rx_unit.framing_error),
                     self.overrun.eq(self.rx_unit.overrun)]
        wiring.connect(m, wiring.flipped(self.o), self.rx_unit.o)
        wiring.connect(m, wiring.flipped(self.i), self.tx_unit.i)
        return m


def test_uart(sim_report):
    records = run(Top(DIVISOR), name="uart_top", config=f"uart{DIVISOR}", test_module=__name__,
                  parameters={"divisor": DIVISOR})
    sim_report.extend(record["text"] for record in records)
    assert {record["test"] for record in records} == {"rx", "tx"}


async def drive(dut, bits, bit_ps):
    """Put ``bits`` (0/1) on ``rx``, each ``bit_ps`` picoseconds."""
    for bit in bits:
        dut.rx.value = bit
        await Timer(bit_ps, unit="ps")


def frame_bits(byte, stop=1):
    return [0, *((byte >> k) & 1 for k in range(8)), stop]


@cocotb.test()
async def rx(dut):
    """Random bytes at 3 % slow and 3 % fast, with idle gaps; a one-cycle glitch on the idle
    line; a byte with its stop bit low; a break of 30 bit times. Every good byte arrives in
    order, the glitch gives nothing, the bad stop bit and the break one framing error each."""
    dut.rx.value = 1
    await start(dut)
    sink = stream_sink(dut, "o", seed=1, stall=0.0)
    errors = []

    async def count_errors():
        while True:
            await ClockCycles(dut.clk, 1)
            if dut.framing_error.value == 1:
                errors.append(1)

    cocotb.start_soon(count_errors())
    rng = random.Random(2)
    expected = []
    bit_ps = DIVISOR * CLOCK_NS * 1000
    for rate in (1.03, 0.97, 1.0):
        data = [0x00, 0xFF, 0x55, 0xAA, *rng.randbytes(20)]
        for byte in data:
            await drive(dut, frame_bits(byte), round(bit_ps * rate))
            if rng.random() < 0.3:
                await Timer(rng.randrange(1, 3 * bit_ps), unit="ps")
        expected += data
    await drive(dut, [0], CLOCK_NS * 1000)                  # a glitch
    await drive(dut, [1], 3 * bit_ps)
    await drive(dut, frame_bits(0x42, stop=0), bit_ps)      # framing error
    await drive(dut, [1], 2 * bit_ps)
    await drive(dut, frame_bits(0x43), bit_ps)
    await drive(dut, [0], 30 * bit_ps)                      # a break
    await drive(dut, [1], 2 * bit_ps)
    await drive(dut, frame_bits(0x44), bit_ps)
    await ClockCycles(dut.clk, 2 * DIVISOR)
    expected += [0x43, 0x44]
    got = []
    while not sink.empty():
        got.append(int((await sink.recv()).payload))
    assert got == expected
    assert len(errors) == 2
    report(f"uart rx, divisor {DIVISOR}: {len(expected)} bytes at -3 %, +3 % and exact rate, "
           f"a glitch ignored, 2 framing errors (a low stop bit, a break)", test="rx")


@cocotb.test()
async def tx(dut):
    """Random bytes offered back to back: the line, sampled every cycle, is idle high before
    and after, and each byte is a start bit, 8 data bits LSB first and a stop bit of exactly
    ``divisor`` cycles each, the next start bit right after the stop bit."""
    await start(dut)
    source = stream_source(dut, "i", seed=3, stall=0.0)
    data = [0x00, 0xFF, *random.Random(4).randbytes(14)]
    for byte in data:
        source.send_nowait(beat(byte))
    line = []
    while not (source.empty() and source.idle()) or len(line) < 2:
        await ClockCycles(dut.clk, 1)
        line.append(int(dut.tx.value))
    for _ in range(11 * DIVISOR):
        await ClockCycles(dut.clk, 1)
        line.append(int(dut.tx.value))

    got, k, gaps = [], 0, []
    while k < len(line):
        if line[k] == 1:
            k += 1
            if got:
                gaps.append(len(got))
            continue
        bits = line[k:k + 10 * DIVISOR]
        assert len(bits) == 10 * DIVISOR
        runs = [bits[b * DIVISOR:(b + 1) * DIVISOR] for b in range(10)]
        assert all(len(set(r)) == 1 for r in runs), "a bit changes inside its time"
        values = [r[0] for r in runs]
        assert values[0] == 0 and values[9] == 1
        got.append(sum(v << i for i, v in enumerate(values[1:9])))
        k += 10 * DIVISOR
    assert got == data
    assert set(gaps) == {len(data)}, "idle cycles between bytes"
    report(f"uart tx, divisor {DIVISOR}: {len(data)} bytes, every bit exactly {DIVISOR} "
           f"cycles", test="tx")
