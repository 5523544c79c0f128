"""Amaranth-simulator tests of the engine's small blocks: the N-of-M select, one MAC lane, the
weight product."""

import numpy as np
import pytest
from amaranth import Module, Signal, signed
from amaranth.lib import data
from amaranth.sim import Simulator

from moefpga.hls_models.intmodel import matvec
from moefpga.rtl.sparse_matmul import ActivationSelect, LaneStep, MacLane, weight_product
from moefpga.rtl.sparse_matmul_params import SparseMatmulParams


def _params(m, n, **kwargs):
    kwargs = {"weight_bits": 8, "group_size": 2 * m, "max_cols": 8 * m, **kwargs}
    return SparseMatmulParams(lanes=1, m=m, n=n, max_tokens=1, **kwargs)


@pytest.mark.parametrize("m, n", [(4, 2), (8, 2), (4, 1), (4, 4), (1, 1)])
def test_activation_select(m, n):
    params = _params(m, n)
    dut = ActivationSelect(params)
    rng = np.random.default_rng(1)
    cases = [(rng.integers(-128, 128, m), rng.integers(0, m, n)) for _ in range(200)]
    cases.append((np.full(m, -128), np.full(n, m - 1)))
    cases.append((np.full(m, 127), np.zeros(n, int)))

    async def bench(ctx):
        for acts, pos in cases:
            ctx.set(dut.acts, [int(a) for a in acts])
            if params.pos_bits:
                ctx.set(dut.pos, [int(p) for p in pos])
            expected = acts[pos] if params.pos_bits else acts[:n]
            assert [ctx.get(dut.selected[i]) for i in range(n)] == list(expected)

    sim = Simulator(dut)
    sim.add_testbench(bench)
    sim.run()


@pytest.mark.parametrize("m, n, weight_bits, acc_bits", [
    (4, 2, 8, 40),
    (8, 2, 4, 40),
    (2, 2, 8, 20),      # dense, saturating
])
def test_mac_lane(m, n, weight_bits, acc_bits):
    """One lane against the integer model: a row over several tokens, with bubbles and stalls."""
    params = _params(m, n, weight_bits=weight_bits, acc_bits=acc_bits)
    dut = MacLane(params)
    rng = np.random.default_rng(2)
    cols, tokens = 6 * m, 3
    lo, hi = -(1 << (weight_bits - 1)), 1 << (weight_bits - 1)
    q = rng.integers(lo, hi, (1, cols))
    q = q * np.concatenate([rng.permutation(np.arange(m) < n) for _ in range(cols // m)])
    q[0, :m] = 0                                          # an all-zero group
    mant = rng.integers(1, 257, (1, cols // params.group_size))
    x = rng.integers(-128, 128, (tokens, cols))
    x[0] = -128                                           # the largest products
    expected = list(matvec(q, mant, params.group_size, x, acc_bits)[:, 0])
    beats = [data.Const(params.weight_beat, bits)
             for bits in params.weight_beats(q, mant)]
    K = params.beats_per_group

    async def bench(ctx):
        results = []
        inputs = [(t, j) for t in range(tokens) for j in range(cols // m)]
        while inputs or len(results) < tokens:
            en = rng.random() < 0.8
            valid = bool(inputs) and rng.random() < 0.7
            ctx.set(dut.en, en)
            if valid:
                t, j = inputs[0]
                ctx.set(dut.step, LaneStep.const({
                    "valid": 1, "group_first": j % K == 0, "group_last": j % K == K - 1,
                    "row_first": j < K, "row_last": j >= cols // m - K,
                }))
                ctx.set(dut.acts, [int(a) for a in x[t, j * m:(j + 1) * m]])
                ctx.set(dut.entries, beats[j]["entries"][0])
                ctx.set(dut.mant, beats[j]["mant"][0])
            else:
                ctx.set(dut.step, LaneStep.const({"valid": 0}))
            if en and ctx.get(dut.done):
                results.append(ctx.get(dut.acc))
            if en and valid:
                inputs.pop(0)
            await ctx.tick()
        assert results == expected

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()


@pytest.mark.parametrize("weight_bits", [2, 4, 8])
def test_weight_product(weight_bits):
    """``weight_product`` equals ``*`` on every weight and activation (shift-add at up to 4
    bits, a multiplier above)."""
    w, a = Signal(signed(weight_bits)), Signal(signed(8))
    out = Signal(signed(weight_bits + 8))
    m = Module()
    m.d.comb += out.eq(weight_product(w, a))
    half = 1 << (weight_bits - 1)
    weights = range(-half, half) if weight_bits <= 4 else [-128, -77, -1, 0, 1, 93, 127]
    wrong = []

    async def bench(ctx):
        for wv in weights:
            for av in range(-128, 128):
                ctx.set(w, wv)
                ctx.set(a, av)
                if ctx.get(out) != wv * av:
                    wrong.append((wv, av, ctx.get(out)))

    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()
    assert not wrong, wrong[:5]
