"""The expert router on Verilator against ``intmodel``, bit for bit.

For every configuration the cocotb tests below load random router weights, route random tokens
and directed corners with random stalls on every input and random back-pressure on every output,
in both normalization modes, and check each pick, weight and shared-gate weight against
``intmodel.router_logits``, ``softmax_topk`` and ``sigmoid``; then they time tokens on streams
that never stall against :meth:`Router.latency`.
"""

from types import SimpleNamespace

import cocotb
import numpy as np
import pytest
from cocotb.triggers import RisingEdge
from harness import beat, params, report, run, start, stream_sink, stream_source, sweep, transfers

from moefpga.hls_models.fixedpoint import Multiplier as ModelMultiplier
from moefpga.hls_models.fixedpoint import multiplier_for
from moefpga.hls_models.intmodel import (
    LOGIT_FRAC_BITS,
    router_logits,
    shared_gate_logit,
    sigmoid,
    softmax_topk,
)
from moefpga.hls_models.quant import quantize_activations
from moefpga.rtl.requant import Multiplier
from moefpga.rtl.router import Pick, Router, TokenBeat

CONFIGS = sweep(
    default=[
        dict(hidden=24, experts=8, top_k=2, macs=3, shared_gate=True),
        dict(hidden=16, experts=64, top_k=8, macs=8),
        dict(hidden=12, experts=16, top_k=1, macs=1, shared_gate=True),
    ],
    full=[
        dict(hidden=32, experts=8, top_k=1, macs=8),
        dict(hidden=8, experts=8, top_k=4, macs=2, shared_gate=True),
        dict(hidden=16, experts=8, top_k=8, macs=9, shared_gate=True),
        dict(hidden=20, experts=16, top_k=2, macs=4),
        dict(hidden=16, experts=16, top_k=4, macs=5, shared_gate=True),
        dict(hidden=8, experts=16, top_k=8, macs=16),
        dict(hidden=8, experts=64, top_k=1, macs=16, shared_gate=True),
        dict(hidden=12, experts=64, top_k=2, macs=4),
        dict(hidden=16, experts=64, top_k=4, macs=13, shared_gate=True),
    ],
)


def _name(config):
    gate = "_gate" if config.get("shared_gate") else ""
    return (f"router_d{config['hidden']}_e{config['experts']}_k{config['top_k']}"
            f"_p{config['macs']}{gate}")


@pytest.mark.parametrize("config", CONFIGS, ids=_name)
def test_router(config, sim_report):
    router = Router(**config)
    latency = {str(normalize): router.latency(normalize) for normalize in (False, True)}
    records = run(router, name="router", config=_name(config), test_module=__name__,
                  parameters={"router": config, "latency": latency})
    sim_report.extend(record["text"] for record in records)
    checked = [record for record in records if "tokens" in record]
    timed = {record["normalize"] for record in records if "cycles" in record}
    assert {record["test"] for record in checked} == {"random_tokens", "corners"}
    assert timed == {False, True}


# Test vectors and the reference


def _reference(weights, mult, gate_mult, x16, exps, top_k, normalize, gate):
    """The integer model's picks, Q1.15 weights and shared-gate weights (None without a gate)."""
    experts = len(weights) - gate
    layer = SimpleNamespace(router=weights[:experts], router_mult=mult)
    picks, probs = softmax_topk(router_logits(x16, exps, layer), top_k, normalize)
    if not gate:
        return picks, probs, None
    gate_layer = SimpleNamespace(shared_gate=weights[experts], shared_gate_mult=gate_mult)
    return picks, probs, sigmoid(shared_gate_logit(x16, exps, gate_layer))


def _tokens(rng, count, hidden, spread=3):
    """Tokens the way the host sends them: Gaussian values, scales over ``2**+-spread``,
    quantized to int16 with power-of-two exponents."""
    scale = np.exp2(rng.uniform(-spread, spread, (count, 1)))
    x16, exps = quantize_activations(rng.normal(size=(count, hidden)) * scale)
    return x16.astype(np.int64), exps.astype(np.int64)


def _spread_multiplier(weights, x16, exps, std=2.0):
    """A multiplier giving logits of about ``std`` (real units) on these tokens: a mix of close
    and far-apart logits (saturation is left to the corners)."""
    acc = np.ldexp((x16 @ weights.T).astype(np.float64), exps[:, None])
    return multiplier_for(std * (1 << LOGIT_FRAC_BITS) / max(acc.std(), 1.0))


class Bench:
    """The router's streams with seeded stall probabilities, its layer loaded by
    :meth:`configure`, and :meth:`route` to check tokens against the model."""

    def __init__(self, dut, *, seed, stall):
        self.dut = dut
        self.config = params()["router"]
        self.gate = int(self.config.get("shared_gate", False))
        self.top_k = self.config["top_k"]
        self.rows = self.config["experts"] + self.gate
        self.load = stream_source(dut, "load", seed=seed, stall=stall)
        self.tokens = stream_source(dut, "i", seed=seed + 1, stall=stall)
        self.picks = stream_sink(dut, "o", seed=seed + 2, stall=stall)
        self.shared = stream_sink(dut, "shared", seed=seed + 3, stall=stall) if self.gate \
            else None
        self.checked = 0

    async def configure(self, weights, mult, gate_mult=None, normalize=True):
        """Load ``weights`` (rows x hidden) through the load stream and set the ports. Call it
        between tokens: the router must be idle."""
        for value in weights.reshape(-1).tolist():
            self.load.send_nowait(beat(value & 0xffff))
        await self.load.wait()
        self.weights, self.mult, self.gate_mult = weights, mult, gate_mult
        self.normalize = normalize
        self.dut.router_mult.value = _port(mult)
        if self.gate:
            self.dut.gate_mult.value = _port(gate_mult)
        self.dut.normalize.value = int(normalize)

    async def route(self, x16, exps):
        """Send the tokens and check every output bit for bit."""
        for values, exp in zip(x16.tolist(), exps.tolist(), strict=True):
            for value in values:
                self.tokens.send_nowait(beat(TokenBeat.const({"value": value, "exp": exp})
                                             .as_bits()))
        count = len(x16)
        got = [Pick.from_bits(int((await self.picks.recv()).payload))
               for _ in range(count * self.top_k)]
        got_picks = np.array([p.expert for p in got]).reshape(count, self.top_k)
        got_probs = np.array([p.weight for p in got]).reshape(count, self.top_k)
        picks, probs, shared = _reference(self.weights, self.mult, self.gate_mult, x16, exps,
                                          self.top_k, self.normalize, self.gate)
        _compare("picks", got_picks, picks)
        _compare("weights", got_probs, probs)
        if self.gate:
            got_shared = [int((await self.shared.recv()).payload) for _ in range(count)]
            _compare("shared-gate weights", np.array(got_shared), shared)
        self.checked += count


def _port(mult):
    assert -128 <= mult.shift < 128, f"{mult} does not fit the 8-bit shift of the port"
    return Multiplier.const({"mult": mult.mult, "shift": mult.shift}).as_bits()


def _compare(what, got, expected):
    bad = np.argwhere(np.atleast_2d(got != expected).reshape(len(got), -1).any(axis=1))
    assert not len(bad), (f"{what} of {len(bad)} tokens differ, first token {bad[0][0]}: "
                          f"{got[bad[0][0]]} != {expected[bad[0][0]]}")


# cocotb tests

_TIMEOUT = dict(timeout_time=50, timeout_unit="ms")


@cocotb.test(**_TIMEOUT)
async def random_tokens(dut):
    """Random weights (the whole int16 range) and Gaussian tokens over a 64x range of scales,
    both normalization modes; 30 % stalls and back-pressure on every stream."""
    await start(dut)
    bench = Bench(dut, seed=10, stall=0.3)
    rng = np.random.default_rng(11)
    hidden = bench.config["hidden"]
    for normalize in (True, False):
        weights = rng.integers(-32768, 32768, (bench.rows, hidden))
        x16, exps = _tokens(rng, 24, hidden)
        mult = _spread_multiplier(weights[:bench.config["experts"]], x16, exps)
        gate_mult = _spread_multiplier(weights[-1:], x16, exps)
        await bench.configure(weights, mult, gate_mult, normalize)
        await bench.route(x16, exps)
    report(f"random: {bench.checked} tokens equal intmodel with 30 % stalls",
           test="random_tokens", tokens=bench.checked)


@cocotb.test(**_TIMEOUT)
async def corners(dut):
    """int16 extremes everywhere, all-equal logits (ties everywhere), logits saturated by a
    left shift, logits rounded to 0 by the clamped right shift, zero tokens and extreme
    exponents; 50 % stalls and back-pressure."""
    await start(dut)
    bench = Bench(dut, seed=20, stall=0.5)
    rng = np.random.default_rng(21)
    hidden, rows = bench.config["hidden"], bench.rows
    extremes = np.array([[-32768] * hidden, [32767] * hidden, [-32768, 32767] * (hidden // 2)
                         + [-32768] * (hidden % 2), [0] * hidden])
    extreme_exps = np.array([-64, 0, 63, -128, 127, -20])
    tokens = np.concatenate([extremes, extremes[:2]]), extreme_exps
    random_tokens = _tokens(rng, 6, hidden)
    extreme_rows = np.resize(extremes[:3], (rows, hidden))
    tied_rows = np.tile(rng.integers(-32768, 32768, hidden), (rows, 1))
    cases = [
        (extreme_rows, ModelMultiplier(1 << 15, 40), tokens),        # extreme accumulators
        (extreme_rows, ModelMultiplier((1 << 16) - 1, -8), tokens),  # saturating left shifts
        (tied_rows, ModelMultiplier(40000, 30), tokens),             # ties everywhere
        (tied_rows, ModelMultiplier(40000, 30), random_tokens),
        (rng.integers(-32768, 32768, (rows, hidden)), ModelMultiplier(50000, 2),
         random_tokens),                                              # mostly saturated
        (rng.integers(-32768, 32768, (rows, hidden)), ModelMultiplier(50000, 127),
         tokens),                                                     # all 0: clamped shift
    ]
    for normalize in (True, False):
        for weights, mult, (x16, exps) in cases:
            await bench.configure(weights, mult, ModelMultiplier(mult.mult, mult.shift - 3),
                                  normalize)
            await bench.route(x16, exps)
    report(f"corners: {bench.checked} tokens equal intmodel with 50 % stalls",
           test="corners", tokens=bench.checked)


@cocotb.test(**_TIMEOUT)
async def latency(dut):
    """Tokens on streams that never stall: the cycles from a token's first value to its last
    output equal Router.latency, and back-to-back tokens start that plus one cycle apart."""
    await start(dut)
    bench = Bench(dut, seed=30, stall=0)
    inputs = transfers(dut, "i")
    outputs = transfers(dut, "shared" if bench.gate else "o")
    rng = np.random.default_rng(31)
    hidden = bench.config["hidden"]
    for normalize in (True, False):
        weights = rng.integers(-32768, 32768, (bench.rows, hidden))
        x16, exps = _tokens(rng, 3, hidden)
        await bench.configure(weights, _spread_multiplier(weights, x16, exps),
                              _spread_multiplier(weights, x16, exps), normalize)
        del inputs[:], outputs[:]
        await bench.route(x16, exps)
        await RisingEdge(dut.clk)
        starts = inputs[::hidden]
        ends = outputs if bench.gate else outputs[bench.top_k - 1::bench.top_k]
        cycles = ends[0] - starts[0]
        per_token = np.diff(starts).tolist()
        expected = params()["latency"][str(normalize)]
        report(f"{'normalized' if normalize else 'not normalized'}: {cycles} cycles from a "
               f"token's first value to its last output, a token every {per_token[0]} cycles",
               normalize=normalize, cycles=cycles)
        assert cycles == expected, f"{cycles} cycles, Router.latency gives {expected}"
        assert per_token == [expected + 1] * 2
        assert ends == [start + cycles for start in starts]
