"""Amaranth-simulator test of the expert FFN's combiner against ``intmodel.combine``, bit for bit.

The requantizers of the datapath are ``rtl.requant.Requantizer``, tested in
``test_router_blocks.py``; the whole datapath is tested on Verilator in ``test_expert_ffn.py``.
"""

import numpy as np
import pytest
from amaranth.hdl import ResetInserter, Signal
from amaranth.sim import Simulator

from moefpga.hls_models.intmodel import PROB_FRAC_BITS, combine
from moefpga.rtl.expert_ffn import Combiner

ONE = 1 << PROB_FRAC_BITS
Y_MIN, Y_MAX = -(1 << 31), (1 << 31) - 1


def _run(dut, phases, *, seed, stall, emit_with_last=False, cut_first=False):
    """For each phase ``(adds, (tokens, blocks))``: send ``adds`` (slot, block, lane, weight,
    value) on ``y``, then the emit command on ``cmd`` (offered in the same cycle as the last add
    with ``emit_with_last``). With ``cut_first`` the first phase ends in a reset instead of its
    emit. Returns every payload received on ``o``."""
    rng = np.random.default_rng(seed)
    received = []
    emitted = phases[1:] if cut_first else phases
    expected = sum(tokens * blocks for _, (tokens, blocks) in emitted)
    reset = Signal()

    async def source(ctx):
        for phase, (adds, (tokens, blocks)) in enumerate(phases):
            for index, (slot, block, lane, weight, value) in enumerate(adds):
                while rng.random() < stall:
                    await ctx.tick()
                ctx.set(dut.y.payload, {"slot": slot, "block": block, "lane": lane,
                                        "weight": weight, "value": value})
                if emit_with_last and index == len(adds) - 1:
                    await ctx.tick().repeat(3)          # nothing left in flight but this add
                    ctx.set(dut.cmd.payload, {"tokens": tokens, "blocks": blocks})
                    ctx.set(dut.cmd.valid, 1)
                ctx.set(dut.y.valid, 1)
                await ctx.tick().until(dut.y.ready)
                ctx.set(dut.y.valid, 0)
            if cut_first and phase == 0:
                await ctx.tick().repeat(3)              # the last add is written, then a reset
                ctx.set(reset, 1)
                await ctx.tick()
                ctx.set(reset, 0)
                continue
            ctx.set(dut.cmd.payload, {"tokens": tokens, "blocks": blocks})
            ctx.set(dut.cmd.valid, 1)
            await ctx.tick().until(dut.cmd.ready)
            ctx.set(dut.cmd.valid, 0)

    async def sink(ctx):
        while len(received) < expected:
            ready = rng.random() >= stall
            ctx.set(dut.o.ready, ready)
            await ctx.delay(1e-7)
            if ready and ctx.get(dut.o.valid):
                received.append([int(v) for v in ctx.get(dut.o.payload)])
            await ctx.tick()

    sim = Simulator(ResetInserter(reset)(dut))
    sim.add_clock(1e-6)
    sim.add_testbench(source)
    sim.add_testbench(sink)
    sim.run()
    return np.array(received, dtype=np.int64)


@pytest.mark.parametrize("lanes, consecutive", [(2, True), (3, False)])
def test_combiner(lanes, consecutive):
    """Three experts into every slot: random outputs and weights, exact halves of the final
    rounding, int32 saturation both ways; the same accumulator hit in consecutive cycles
    (``consecutive``: expert by expert for each element) or expert after expert. Then the
    cleared accumulators start again, on halves that round."""
    rng = np.random.default_rng(lanes)
    max_tokens, hidden, experts = 4, 4 * lanes, 3
    dut = Combiner(lanes=lanes, max_tokens=max_tokens, hidden=hidden)
    y = rng.integers(Y_MIN, Y_MAX + 1, (max_tokens, experts, hidden))
    w = rng.integers(0, ONE + 1, (max_tokens, experts))
    y[0], w[0] = Y_MAX, ONE                                  # saturates up
    y[1], w[1] = Y_MIN, ONE                                  # saturates down
    y[2, :, ::2], w[2] = 1, [ONE // 2, 0, 0]                  # an exact half: rounds up
    y[2, :, 1::2] = -1                                       # -1/2 rounds to 0
    order = [(t, k, b, lane) for t in range(max_tokens) for b in range(hidden // lanes)
             for lane in range(lanes) for k in range(experts)]
    if not consecutive:
        order.sort(key=lambda tkbl: tkbl[1])
    adds = [(t, b, lane, w[t, k], y[t, k, b * lanes + lane]) for t, k, b, lane in order]
    again = [(t, b, lane, ONE // 2, y[t, 0, b * lanes + lane]) for t in range(max_tokens)
             for b in range(hidden // lanes) for lane in range(lanes)]
    blocks = (max_tokens, hidden // lanes)
    got = _run(dut, [(adds, blocks), (again, blocks)], seed=lanes, stall=0.3)
    first = max_tokens * hidden // lanes
    _check(got[:first].reshape(max_tokens, hidden), combine(w, y))
    _check(got[first:].reshape(max_tokens, hidden),
           combine(np.full((max_tokens, 1), ONE // 2), y[:, :1]))


def _check(got, expected):
    mismatch = np.argwhere(got != expected)
    assert not len(mismatch), (f"{len(mismatch)} outputs differ, first at "
                               f"{tuple(mismatch[0])}: {got[tuple(mismatch[0])]} != "
                               f"{expected[tuple(mismatch[0])]}")


def test_an_emit_offered_with_the_last_add_waits_for_it():
    """The emit command offered in the same cycle as the last add, with nothing else in flight,
    still sees that add in its sums."""
    lanes, max_tokens = 2, 2
    dut = Combiner(lanes=lanes, max_tokens=max_tokens, hidden=2 * lanes)
    adds = [(t, b, lane, ONE, 1000 * t + 10 * b + lane + 1) for t in range(max_tokens)
            for b in range(2) for lane in range(lanes)]
    got = _run(dut, [(adds, (max_tokens, 2))], seed=0, stall=0, emit_with_last=True)
    _check(got.reshape(-1), np.array([value for *_, value in adds]))


@pytest.mark.parametrize("lanes", [1, 3])
def test_a_reset_clears_the_sums_of_a_cut_off_batch(lanes):
    """Adds into every accumulator, then a reset before their emit: the next batch's sums start
    from nothing (the Combiner sweeps its accumulators after a reset). The first fresh add goes
    to the last word: offered during the sweep, it is taken as the sweep writes that word."""
    rng = np.random.default_rng(lanes)
    max_tokens, hidden = 3, 2 * lanes
    dut = Combiner(lanes=lanes, max_tokens=max_tokens, hidden=hidden)
    stale = rng.integers(Y_MIN, Y_MAX + 1, (max_tokens, hidden))
    y = rng.integers(-1000, 1000, (max_tokens, 1, hidden))
    cells = [(t, b, lane) for t in range(max_tokens) for b in range(hidden // lanes)
             for lane in range(lanes)]
    cut = [(t, b, lane, ONE, stale[t, b * lanes + lane]) for t, b, lane in cells]
    fresh = [(t, b, lane, ONE // 2, y[t, 0, b * lanes + lane]) for t, b, lane in cells[::-1]]
    blocks = (max_tokens, hidden // lanes)
    got = _run(dut, [(cut, blocks), (fresh, blocks)], seed=lanes, stall=0.3, cut_first=True)
    _check(got.reshape(max_tokens, hidden), combine(np.full((max_tokens, 1), ONE // 2), y))
