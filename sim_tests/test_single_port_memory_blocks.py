"""The single-port memory on the Amaranth simulator: random writes and read requests in the
same cycles against a dictionary model: writes always taken, reads accepted only without a
write, read data one cycle later and held until the next accepted read. Both builds: the
Amaranth memory, and the SPRAM tiles with a behavioural model of SB_SPRAM256KA in place of
the primitive (whose output is garbage after a write, so the hold register is exercised)."""

import random

import pytest
from amaranth.sim import Simulator

from moefpga.rtl.single_port_memory import SinglePortMemory, SpramModel

DEPTH, WIDTH, CYCLES = 16, 20, 600


def _traffic(dut, seed):
    rng = random.Random(seed)
    model = {}
    checked = {"reads": 0, "refused": 0}

    async def bench(ctx):
        expected = None             # what r_data holds after the last accepted read
        for _ in range(CYCLES):
            w_en, r_en = rng.random() < 0.4, rng.random() < 0.6
            w_addr, r_addr = rng.randrange(DEPTH), rng.randrange(DEPTH)
            w_data = rng.randrange(1 << WIDTH)
            ctx.set(dut.w_en, w_en)
            ctx.set(dut.w_addr, w_addr)
            ctx.set(dut.w_data, w_data)
            ctx.set(dut.r_en, r_en)
            ctx.set(dut.r_addr, r_addr)
            assert ctx.get(dut.r_ready) == (not w_en)
            accepted = r_en and not w_en
            if accepted:
                read_value = model.get(r_addr, 0)
            checked["refused"] += r_en and w_en
            await ctx.tick()
            if w_en:
                model[w_addr] = w_data
            if accepted:
                expected = read_value
                checked["reads"] += 1
            if expected is not None:
                assert ctx.get(dut.r_data) == expected

    return bench, checked


@pytest.mark.parametrize("spram", [False, True], ids=["memory", "spram"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_single_port_memory_random_traffic(seed, spram):
    dut = SinglePortMemory(WIDTH, DEPTH, spram=spram, spram_model=SpramModel)
    bench, checked = _traffic(dut, seed)
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    # The traffic exercised both accepted and refused reads.
    assert checked["reads"] > 100 and checked["refused"] > 50


def test_depth_must_fit():
    with pytest.raises(TypeError, match="depth must be a positive integer"):
        SinglePortMemory(8, 0)
    with pytest.raises(ValueError, match="an SPRAM holds 16384 words, not 16385"):
        SinglePortMemory(8, 16385, spram=True)
