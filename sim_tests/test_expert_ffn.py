"""The expert FFN datapath on Verilator against ``intmodel``, bit for bit.

For every configuration the cocotb tests below build a Qwen2-MoE layer the way the host does
(a random checkpoint from ``hls_models.synthetic``, ``calibrate.quantize_layer``), then run with
random stalls on every input and back-pressure on the output: each expert alone with a weight of
1.0 (the output is then ``expert_ffn``'s ``y`` exactly), a whole layer (top-k experts and the
gated shared expert combined, against ``intmodel.moe_layer``), and directed corners; finally
they time experts on streams that never stall.
"""

import tempfile
from dataclasses import replace

import cocotb
import numpy as np
import pytest
from cocotb.triggers import RisingEdge
from harness import beat, params, report, run, start, stream_sink, stream_source, sweep, transfers

from moefpga.hls_models.calibrate import QuantSpec, calibration_tokens, quantize_layer
from moefpga.hls_models.checkpoint import Checkpoint
from moefpga.hls_models.fixedpoint import Multiplier
from moefpga.hls_models.intmodel import (
    PROB_FRAC_BITS,
    combine,
    expert_ffn,
    expert_input,
    moe_layer,
    router_logits,
    shared_gate_logit,
    sigmoid,
    softmax_topk,
)
from moefpga.hls_models.quant import quantize_activations
from moefpga.hls_models.sparsity import DENSE, Sparsity
from moefpga.hls_models.synthetic import write_checkpoint
from moefpga.rtl.expert_ffn import ExpertFFN
from moefpga.rtl.expert_ffn_params import ExpertFfnParams

# Dense int8 with more lanes than columns a beat; 2:4 int4 with fewer (both hidden-buffer forms).
CONFIGS = sweep(
    default=[
        dict(lanes=8, m=4, n=4, weight_bits=8, group_size=16, max_tokens=4, hidden=32, ffn=64),
        dict(lanes=2, m=4, n=2, weight_bits=4, group_size=16, max_tokens=3, hidden=32, ffn=48),
    ],
    full=[
        dict(lanes=4, m=4, n=2, weight_bits=8, group_size=32, max_tokens=5, hidden=64, ffn=96),
        dict(lanes=1, m=1, n=1, weight_bits=4, group_size=8, max_tokens=2, hidden=16, ffn=24),
        dict(lanes=4, m=8, n=8, weight_bits=8, group_size=16, max_tokens=8, hidden=64,
             ffn=128, acc_bits=32),
        dict(lanes=8, m=4, n=2, weight_bits=4, group_size=16, max_tokens=3, hidden=16, ffn=16),
    ],
)

ONE = 1 << PROB_FRAC_BITS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ExpertFfnParams(**c).name)
def test_expert_ffn(config, sim_report):
    dut = ExpertFFN(**config)
    p = dut.params
    cycles = {tokens: dut.cycles(tokens, p.hidden, p.ffn) for tokens in (1, p.max_tokens)}
    records = run(dut, name="expert_ffn", config=p.name, test_module=__name__,
                  parameters={"ffn": config, "cycles": cycles})
    sim_report.extend(record["text"] for record in records)
    checked = {record["test"] for record in records if "test" in record}
    assert checked == {"experts_alone", "whole_layer", "corners"}
    assert any("cycles" in record for record in records)


# The layer and the reference


def _layer(p, seed):
    """A calibrated Qwen2-MoE layer of the datapath's sizes: 4 experts, top-2, gated shared."""
    with tempfile.TemporaryDirectory() as folder:
        write_checkpoint(folder, "qwen2_moe", num_layers=1, hidden_size=p.hidden,
                         num_experts=4, top_k=2, expert_ffn_size=p.ffn,
                         shared_expert_ffn_size=p.ffn, vocab_size=64, seed=seed)
        checkpoint = Checkpoint.open(folder)
        weights = checkpoint.moe_layer(0)
        calibration = calibration_tokens(p.hidden, checkpoint.norm_weight(0), seed=seed)
        norm = checkpoint.norm_weight(0)
    e = p.engine
    spec = QuantSpec(bits=e.weight_bits, group_size=None,
                     sparsity=DENSE if e.n == e.m else Sparsity(m=e.m, n=e.n),
                     acc_bits=p.acc_bits)
    return quantize_layer(weights, spec, calibration), norm


def _tokens(p, norm, count, seed):
    """int16 tokens and exponents shaped like RMSNorm outputs."""
    return quantize_activations(calibration_tokens(p.hidden, norm, count=count, seed=seed))


class FFN:
    """The datapath's streams, with the given stall probabilities on inputs and output."""

    def __init__(self, dut, *, seed, stall):
        self.p = ExpertFfnParams(**params()["ffn"])
        self.streams = {name: stream_source(dut, name, seed=seed + i, stall=stall)
                        for i, name in enumerate(["cmd", "meta", "silu", "x", "w"])}
        self.o = stream_sink(dut, "o", seed=seed + 5, stall=stall)

    def _send(self, name, beats):
        for bits in beats:
            self.streams[name].send_nowait(beat(bits))

    def expert(self, expert, xq, exps, slots, weights):
        """Queue one expert on the int8 tokens ``xq`` (exponents ``exps``) for ``slots``."""
        p = self.p
        self._send("cmd", [p.expert_command(expert, len(xq))])
        self._send("meta", p.meta_beats(slots, exps, weights))
        self._send("silu", p.silu_beats(expert.silu_table))
        self._send("x", p.engine.activation_beats(xq))
        self._send("w", p.weight_beats(expert))

    async def emit(self, tokens):
        """Emit and clear the outputs of ``tokens`` slots; returns them (tokens x hidden)."""
        p = self.p
        self._send("cmd", [p.emit_command(tokens, p.hidden)])
        beats = [int((await self.o.recv()).payload) for _ in range(tokens * p.hidden // p.lanes)]
        return p.outputs(beats, tokens)


def _compare(got, expected, what):
    mismatch = np.argwhere(got != expected)
    assert not len(mismatch), (f"{what}: {len(mismatch)} outputs differ, first at (token, "
                               f"element) {tuple(mismatch[0])}: {got[tuple(mismatch[0])]} != "
                               f"{expected[tuple(mismatch[0])]}")


async def _alone(ffn, expert, xq, exps, acc_bits):
    """Run ``expert`` alone with weight 1.0 on every token; its outputs equal ``expert_ffn``."""
    tokens = len(xq)
    ffn.expert(expert, xq, exps, range(tokens), [ONE] * tokens)
    _compare(await ffn.emit(tokens), expert_ffn(xq, exps, expert, acc_bits), "expert_ffn")


# cocotb tests

_TIMEOUT = dict(timeout_time=20, timeout_unit="ms")


@cocotb.test(**_TIMEOUT)
async def experts_alone(dut):
    """Every expert of a calibrated layer, shared one included, on 1 to T_max tokens."""
    await start(dut)
    ffn = FFN(dut, seed=10, stall=0.3)
    p, rng = ffn.p, np.random.default_rng(11)
    layer, norm = _layer(p, seed=1)
    experts = [*layer.experts, layer.shared]
    for index, expert in enumerate(experts):
        tokens = (1, p.max_tokens)[index] if index < 2 else int(rng.integers(1, p.max_tokens + 1))
        xq, exps = expert_input(*_tokens(p, norm, tokens, seed=100 + index))
        await _alone(ffn, expert, xq, exps, layer.acc_bits)
    report(f"alone: {len(experts)} experts of a calibrated {p.engine.weight_bits}-bit layer "
           f"equal intmodel.expert_ffn with stalls on every stream", test="experts_alone")


@cocotb.test(**_TIMEOUT)
async def whole_layer(dut):
    """Routed top-2 experts and the gated shared expert combined per token: ``moe_layer``."""
    await start(dut)
    ffn = FFN(dut, seed=20, stall=0.3)
    p = ffn.p
    layer, norm = _layer(p, seed=2)
    for batch in range(2):
        x16, exp16 = _tokens(p, norm, p.max_tokens, seed=200 + batch)
        picks, weights = softmax_topk(router_logits(x16, exp16, layer), layer.top_k,
                                      layer.normalize)
        xq, exps = expert_input(x16, exp16)
        outputs = np.zeros((len(xq), layer.top_k + 1, p.hidden), dtype=np.int64)
        for index in np.unique(picks):
            token, slot = np.nonzero(picks == index)
            expert = layer.experts[index]
            ffn.expert(expert, xq[token], exps[token], token, weights[token, slot])
            outputs[token, slot] = expert_ffn(xq[token], exps[token], expert, layer.acc_bits)
        shared_weight = sigmoid(shared_gate_logit(x16, exp16, layer))
        ffn.expert(layer.shared, xq, exps, range(len(xq)), shared_weight)
        outputs[:, -1] = expert_ffn(xq, exps, layer.shared, layer.acc_bits)
        got = await ffn.emit(len(xq))
        expected = combine(np.concatenate([weights, shared_weight[:, None]], axis=1), outputs)
        _compare(got, expected, "combine")
        _compare(got, moe_layer(x16, exp16, layer), "moe_layer")
    report(f"layer: 2 batches of {p.max_tokens} tokens through top-{layer.top_k} experts and "
           f"the gated shared expert equal intmodel.combine and moe_layer", test="whole_layer")


@cocotb.test(**_TIMEOUT)
async def corners(dut):
    """Tokens of all -128 / 127, saturating requantizers, SiLU tables of extremes, weights of
    0 and 1.0 accumulated over several experts, 1 and T_max tokens."""
    await start(dut)
    ffn = FFN(dut, seed=30, stall=0.5)
    p, rng = ffn.p, np.random.default_rng(31)
    layer, _ = _layer(p, seed=3)
    base = layer.experts[0]
    tiny = Multiplier((1 << 16) - 1, 0)                 # saturates every stage it scales
    extremes = np.where(rng.random(256) < 0.5, -128, 127)
    variants = [
        base,
        replace(base, silu_table=extremes),
        replace(base, gate_mult=tiny, hidden_mult=tiny),
        replace(base, up_mult=tiny, down_mult=tiny, silu_table=extremes),
        replace(base, gate_mult=Multiplier(1 << 15, 40), up_mult=Multiplier(1 << 15, 60)),
    ]
    for tokens in (1, p.max_tokens):
        for fill in (-128, 127):
            xq = np.full((tokens, p.hidden), fill)
            for expert in variants:
                await _alone(ffn, expert, xq, np.full(tokens, 8), layer.acc_bits)
    # Several experts into one output: weights 0, 1.0 and in between, largest outputs.
    xq = np.where(rng.random((p.max_tokens, p.hidden)) < 0.5, -128, 127)
    exps = rng.integers(-8, 12, p.max_tokens)
    weights = np.array([[0, ONE, 12345]] * p.max_tokens)
    weights[0] = [ONE, ONE, ONE]
    chosen = variants[1:4]
    for expert, column in zip(chosen, weights.T, strict=True):
        ffn.expert(expert, xq, exps, range(p.max_tokens), column)
    outputs = np.stack([expert_ffn(xq, exps, expert, layer.acc_bits) for expert in chosen], 1)
    _compare(await ffn.emit(p.max_tokens), combine(weights, outputs), "combine corners")
    report("corners: extreme tokens, saturating multipliers and SiLU tables, weights 0 to 1.0 "
           "equal intmodel", test="corners")


@cocotb.test(**_TIMEOUT)
async def throughput(dut):
    """One expert at a time on streams that never stall: cycles from accepting its command to
    accepting the next one, equal to ``ExpertFFN.cycles``; multiplier use is the engine's
    beats over those cycles."""
    await start(dut)
    ffn = FFN(dut, seed=40, stall=0)
    commands = transfers(dut, "cmd")
    p = ffn.p
    layer, norm = _layer(p, seed=4)
    expert = layer.experts[1]
    beats_per_token = 3 * p.hidden * p.ffn // (p.lanes * p.m)
    for tokens in sorted({1, p.max_tokens}):
        xq, exps = expert_input(*_tokens(p, norm, tokens, seed=400 + tokens))
        await _alone(ffn, expert, xq, exps, layer.acc_bits)
        await RisingEdge(dut.clk)
        cycles = commands[-1] - commands[-2]
        busy = beats_per_token * tokens
        report(f"d={p.hidden} f={p.ffn}, {tokens} token(s): {cycles} cycles per expert, "
               f"{cycles / tokens:.1f} per token; {p.lanes * p.engine.n} multipliers busy "
               f"{busy / cycles:.1%}", tokens=tokens, cycles=cycles)
        assert cycles == params()["cycles"][str(tokens)]
