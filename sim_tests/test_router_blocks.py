"""Amaranth-simulator tests of the router's blocks against the integer model, bit for bit:
the requantizer and its saturation, the restoring divider, the exp unit and the top-k insertion."""

import numpy as np
import pytest
from amaranth import Module, Signal, signed
from amaranth.sim import Simulator

from moefpga.hls_models.fixedpoint import requantize
from moefpga.hls_models.intmodel import LOGIT_BITS, exp_neg
from moefpga.rtl.divider import Divider
from moefpga.rtl.requant import Requantizer, saturated
from moefpga.rtl.router import ExpUnit, TopK


def _simulate(dut, *benches):
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    for bench in benches:
        sim.add_testbench(bench)
    sim.run()


def _stream_through(dut, inputs, *, seed, stall):
    """Send ``inputs`` (payload values) into ``dut.i`` and collect as many payloads from
    ``dut.o``, withholding ``valid`` and ``ready`` in a random fraction ``stall`` of the cycles."""
    rng = np.random.default_rng(seed)
    outputs = []

    async def source(ctx):
        for payload in inputs:
            while rng.random() < stall:
                await ctx.tick()
            ctx.set(dut.i.payload, payload)
            ctx.set(dut.i.valid, 1)
            await ctx.tick().until(dut.i.ready)
            ctx.set(dut.i.valid, 0)

    async def sink(ctx):
        while len(outputs) < len(inputs):
            ready = rng.random() >= stall
            ctx.set(dut.o.ready, ready)
            await ctx.delay(1e-7)                    # o.valid after this cycle's inputs settle
            if ready and ctx.get(dut.o.valid):
                outputs.append(ctx.get(dut.o.payload))
            await ctx.tick()

    _simulate(dut, source, sink)
    return outputs


@pytest.mark.parametrize("pipelined", [False, True], ids=["2stages", "4stages"])
@pytest.mark.parametrize("value_bits", [44, 48])
def test_requantizer(value_bits, pipelined):
    """Every shift regime: left shifts that saturate, right shifts up to and past the clamp at
    62 (with 48-bit values the product is 64 bits wide), round half up at exact halves; both
    pipeline depths."""
    rng = np.random.default_rng(value_bits)
    lo, hi = -(1 << (value_bits - 1)), (1 << (value_bits - 1)) - 1
    values = [lo, hi, 0, 1, -1, 3 << 20, -(3 << 20), 5, -5]
    mults = [1 << 15, (1 << 16) - 1, 40000]
    shifts = [-256, -40, -21, -20, -19, -1, 0, 1, 2, 20, 40, 59, 60, 61, 62, 63, 64, 255]
    cases = [(v, mu, s) for v in values for mu in mults for s in shifts]
    for _ in range(400):
        cases.append((int(rng.integers(lo, hi + 1)) >> int(rng.integers(0, value_bits)),
                      int(rng.integers(1 << 15, 1 << 16)), int(rng.integers(-30, 70))))
    dut = Requantizer(value_bits, LOGIT_BITS, 9, pipelined=pipelined)
    got = _stream_through(dut, [{"value": v, "mult": mu, "shift": s} for v, mu, s in cases],
                          seed=1, stall=0.3)
    expected = [requantize(v, mu, s, LOGIT_BITS) for v, mu, s in cases]
    mismatches = [(case, g, e) for case, g, e in zip(cases, got, expected, strict=True) if g != e]
    assert not mismatches, mismatches[:5]


@pytest.mark.parametrize(("width", "bits"), [(8, 4), (6, 5), (9, 2), (4, 6)])
def test_saturated(width, bits):
    """``saturated`` equals a clamp on every signed ``width``-bit value."""
    value, out = Signal(signed(width)), Signal(signed(bits))
    m = Module()
    m.d.comb += out.eq(saturated(value, bits))
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    wrong = []

    async def bench(ctx):
        for v in range(-(1 << (width - 1)), 1 << (width - 1)):
            ctx.set(value, v)
            if ctx.get(out) != max(lo, min(hi, v)):
                wrong.append((v, ctx.get(out)))

    sim = Simulator(m)               # combinational: no clock
    sim.add_testbench(bench)
    sim.run()
    assert not wrong, wrong[:5]

@pytest.mark.parametrize(("pipelined", "cycles"), [(False, 2), (True, 4)])
def test_requantizer_latency(pipelined, cycles):
    """An input taken in cycle c is on ``o`` in cycle c + 2, or c + 4 pipelined."""
    dut = Requantizer(40, LOGIT_BITS, 9, pipelined=pipelined)
    seen = []

    async def bench(ctx):
        ctx.set(dut.o.ready, 1)
        ctx.set(dut.i.payload, {"value": -12345, "mult": 40000, "shift": 20})
        ctx.set(dut.i.valid, 1)
        await ctx.tick()
        ctx.set(dut.i.valid, 0)
        for cycle in range(1, 8):
            if ctx.get(dut.o.valid):
                seen.append((cycle, ctx.get(dut.o.payload)))
            await ctx.tick()

    _simulate(dut, bench)
    assert seen == [(cycles, requantize(-12345, 40000, 20, LOGIT_BITS))]
    assert dut.latency == cycles

def test_divider():
    """Quotients of the routing weights and the sigmoid: 16 bits, ``num < den << 16``."""
    rng = np.random.default_rng(3)
    den_bits = 22
    cases = [(1 << 30, 1 << 15), (0, 1), (((1 << 15) << 16) - 1, 1 << 15),
             (1 << 30, (1 << den_bits) - 1), ((1 << 31) - 1, (1 << den_bits) - 1), (1, 1)]
    for _ in range(300):
        den = int(rng.integers(1, 1 << den_bits))
        cases.append((int(rng.integers(0, min(1 << 31, den << 16))), den))
    dut = Divider(31, den_bits, 16)
    got = _stream_through(dut, [{"num": n, "den": d} for n, d in cases], seed=4, stall=0.4)
    assert got == [n // d for n, d in cases]


def test_exp_unit():
    """``exp_neg`` on every ``a`` below 4096 and on random and extreme ones up to 2**20 - 1,
    where the shift reaches 16 and the result 0."""
    rng = np.random.default_rng(5)
    inputs = [*range(4096), *rng.integers(0, 1 << LOGIT_BITS, 2000).tolist(),
              (1 << LOGIT_BITS) - 1, 1 << (LOGIT_BITS - 1)]
    dut = ExpUnit()
    got = []

    async def bench(ctx):
        pending = list(inputs)
        while len(got) < len(inputs):
            valid = bool(pending) and rng.random() < 0.8
            ctx.set(dut.i.valid, valid)
            if valid:
                ctx.set(dut.i.payload, pending.pop(0))
            await ctx.delay(1e-7)
            if ctx.get(dut.o.valid):
                got.append(ctx.get(dut.o.payload))
            await ctx.tick()

    _simulate(dut, bench)
    assert got == exp_neg(np.array(inputs)).tolist()


@pytest.mark.parametrize("k", [1, 2, 8])
def test_topk(k):
    """Sequences of 8, 16 and 64 logits with many ties (few distinct values), extremes of the
    20-bit range, inserted with gaps and cleared between sequences; ties to the lower index."""
    rng = np.random.default_rng(k)
    limit = 1 << (LOGIT_BITS - 1)
    sequences = [np.full(16, 7), np.full(8, -limit), np.arange(64) % 3 - limit,
                 np.array([limit - 1] * 4 + [-limit] * 4)]
    for n in (8, 16, 64):
        sequences.append(rng.integers(-3, 3, n))
        sequences.append(rng.integers(-limit, limit, n))
    dut = TopK(k, 6)

    async def bench(ctx):
        for logits in sequences:
            ctx.set(dut.clear, 1)
            await ctx.tick()
            ctx.set(dut.clear, 0)
            for index, value in enumerate(logits.tolist()):
                while rng.random() < 0.3:
                    await ctx.tick()
                ctx.set(dut.i.payload, {"value": value, "index": index})
                ctx.set(dut.i.valid, 1)
                await ctx.tick()
                ctx.set(dut.i.valid, 0)
            order = np.argsort(-logits, kind="stable")[:k]
            picks = [ctx.get(dut.picks[j]) for j in range(k)]
            assert [p.index for p in picks] == order.tolist()
            assert [p.value for p in picks] == logits[order].tolist()

    _simulate(dut, bench)
