"""The skid buffer on the Amaranth simulator: random ``valid`` on its input and ``ready`` on its
output; every beat comes out once, in order; ``i.ready`` never follows ``o.ready`` within a
cycle; and with ``o`` always ready it passes a beat a cycle, one cycle late."""

import random

import pytest
from amaranth.sim import Simulator

from moefpga.rtl.skid_buffer import SkidBuffer

WIDTH = 12


def _run(send_p, take_p, beats, seed):
    """Offer ``beats`` with probability ``send_p`` a cycle, take with ``take_p``; returns what
    came out, the cycle of each input and output transfer, and whether ``i.ready`` ever changed
    with ``o.ready`` in one cycle."""
    rng = random.Random(seed)
    dut = SkidBuffer(WIDTH)
    got, sent_at, got_at = [], [], []
    combinational = False

    async def bench(ctx):
        nonlocal combinational
        index, cycle = 0, 0
        while len(got) < len(beats):
            assert cycle < 50 * len(beats), "the buffer stopped passing beats"
            offer = index < len(beats) and rng.random() < send_p
            ctx.set(dut.i.valid, offer)
            ctx.set(dut.i.payload, beats[index] if offer else 0)
            readies = []
            for ready in (0, 1):
                ctx.set(dut.o.ready, ready)
                readies.append(ctx.get(dut.i.ready))
            combinational |= readies[0] != readies[1]
            take = rng.random() < take_p
            ctx.set(dut.o.ready, take)
            if offer and ctx.get(dut.i.ready):
                sent_at.append(cycle)
                index += 1
            if take and ctx.get(dut.o.valid):
                got.append(ctx.get(dut.o.payload))
                got_at.append(cycle)
            await ctx.tick()
            cycle += 1

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return got, sent_at, got_at, combinational


@pytest.mark.parametrize("send_p, take_p", [(0.9, 0.5), (0.5, 0.9), (0.7, 0.7), (1.0, 0.3)])
def test_every_beat_once_in_order_under_stalls(send_p, take_p):
    rng = random.Random(1)
    beats = [rng.randrange(1 << WIDTH) for _ in range(300)]
    got, _, _, combinational = _run(send_p, take_p, beats, seed=int(10 * send_p + take_p))
    assert got == beats
    assert not combinational


def test_full_rate_one_cycle_late():
    beats = list(range(100))
    got, sent_at, got_at, _ = _run(1.0, 1.0, beats, seed=0)
    assert got == beats
    assert sent_at == list(range(100))
    assert got_at == [cycle + 1 for cycle in sent_at]
