"""The MoE layer top on Verilator: batches of tokens in, combined outputs out, experts loaded
on request, against ``intmodel.moe_layer``.

``batches`` loads the router of a calibrated qwen2_moe layer, then sends two batches; a host
coroutine answers every expert request with that expert's packed record. Every AXI-Stream
port is driven by cocotbext-axi with random pauses. The outputs must equal the integer model
bit for bit, and the counters the loads and hits of an LRU model of the slots.
"""

import cocotb
import numpy as np
import pytest
from amaranth.lib import data
from cocotb.triggers import RisingEdge
from cocotbext.axi import AxiStreamBus, AxiStreamFrame, AxiStreamSink, AxiStreamSource
from harness import params, pauses, report, run, start, sweep
from test_expert_loader_blocks import EXPERTS, FFN, LAYERS, layer

from moefpga.hls_models.calibrate import calibration_tokens
from moefpga.hls_models.intmodel import moe_layer, router_logits, softmax_topk
from moefpga.hls_models.quant import quantize_activations
from moefpga.host.pack import pack_layer
from moefpga.rtl.expert_ffn_params import ExpertFfnParams
from moefpga.rtl.expert_stream import SHARED_EXPERT
from moefpga.rtl.moe_layer import MoeLayer, RequestBeat
from moefpga.rtl.requant import Multiplier

MAX_TOKENS, LAYER, TOP_K = 4, 1, 2
PARAMS = {**FFN, "max_tokens": MAX_TOKENS}
#: Per slot count, (loads, hits) present in each of the three batches of ``batches``.
PATTERNS = {3: [(True, False), (True, True), (False, True)],
            1: [(True, False), (True, False), (True, False)]}


def design(slots):
    p = ExpertFfnParams(**PARAMS)
    return MoeLayer(p, hidden=p.hidden, experts=EXPERTS, top_k=TOP_K, slots=slots,
                    shared=True, shared_gate=True, layers=LAYERS, macs=EXPERTS + 1)


@pytest.mark.parametrize("slots", sweep([3], [1]))
def test_moe_layer(sim_report, slots):
    records = run(design(slots), name="moe_layer", config=f"moe_layer_s{slots}",
                  test_module=__name__, parameters={"slots": slots})
    sim_report.extend(record["text"] for record in records)
    assert [record["test"] for record in records] == ["batches"] * 5


def _lru(accesses, resident, slots):
    """The number of hits and the list of misses of ``accesses`` (tags in order) on ``slots``
    slots holding ``resident`` (least recently used first), which it updates: a hit and a load
    both make the tag the most recently used."""
    misses = []
    for tag in accesses:
        if tag in resident:
            resident.remove(tag)
        else:
            misses.append(tag)
            if len(resident) == slots:
                resident.pop(0)
        resident.append(tag)
    return len(accesses) - len(misses), misses


class Host:
    """The host side: the top's AXI-Stream ports with 30 % pauses, and the expert records."""

    def __init__(self, dut, hw, records):
        self.dut, self.hw, self.records = dut, hw, records
        bus = {name: AxiStreamBus.from_prefix(dut, name, bus_separator="__")
               for name in ["s_router", "s_tokens", "s_expert", "m_request", "m_result"]}
        self.src = {name: AxiStreamSource(bus[name], dut.clk, dut.rst)
                    for name in ["s_router", "s_tokens", "s_expert"]}
        self.sink = {name: AxiStreamSink(bus[name], dut.clk, dut.rst)
                     for name in ["m_request", "m_result"]}
        for seed, port in enumerate([*self.src.values(), *self.sink.values()]):
            port.set_pause_generator(pauses(seed, 0.3))
            port.log.setLevel("WARNING")
        self.requests = []
        self.corrupt = 0        # requests to answer first with a record whose CRC is broken
        cocotb.start_soon(self._answer())

    async def _answer(self):
        while True:
            frame = await self.sink["m_request"].recv()
            beat = data.Const(RequestBeat, int.from_bytes(bytes(frame.tdata), "little"))
            self.requests.append((int(beat.layer), int(beat.expert)))
            index = -1 if beat.expert == SHARED_EXPERT else int(beat.expert)
            record = self.records[index]
            if self.corrupt:
                self.corrupt -= 1
                await self.src["s_expert"].send(AxiStreamFrame(record[:-1] + bytes([
                    record[-1] ^ 1])))
            await self.src["s_expert"].send(AxiStreamFrame(record))

    def counters(self):
        view = data.Const(self.hw.counters_layout, int(self.dut.counters.value))
        return {name: int(view[name]) for name in self.hw.counters_layout.members}

    async def batch(self, x16, exps, values=None):
        """Send a batch (only its first ``values`` values if given); its outputs (tokens,
        hidden) and the set of ``tuser`` flags of the result beats."""
        payload = b"".join(int(v).to_bytes(2, "little", signed=True) + int(e).to_bytes(
            1, "little", signed=True) for row, e in zip(x16, exps, strict=True) for v in row)
        await self.src["s_tokens"].send(AxiStreamFrame(payload[:3 * values if values else None]))
        frame = await self.sink["m_result"].recv()
        flags = set(frame.tuser) if isinstance(frame.tuser, list) else {frame.tuser}
        out = np.frombuffer(bytes(frame.tdata), "<i4").astype(np.int64)
        return out.reshape(-1, self.hw.hidden), flags


def _tag_sequence(x16, exps, int_layer):
    """The experts the top runs for a batch, in its order: picked ones ascending, then shared."""
    picks, _ = softmax_topk(router_logits(x16, exps, int_layer), int_layer.top_k,
                            int_layer.normalize)
    return [*(int(e) for e in np.unique(picks)), SHARED_EXPERT]


@cocotb.test(timeout_time=50, timeout_unit="ms")
async def batches(dut):
    """Two malformed batches (a token cut short by ``tlast``, one token too many): zero
    outputs flagged on ``tuser``. Then three batches of a calibrated layer: 4 tokens on empty
    slots (all loads); one new token whose experts are partly resident (a load and hits), its
    first record answered corrupt and then again; the same token again (all hits)."""
    await start(dut)
    slots = params()["slots"]
    hw = design(slots)
    p = hw.params
    int_layer, norm = layer(p, seed=7)
    assert int_layer.top_k == TOP_K
    host = Host(dut, hw, pack_layer(int_layer, LAYER, p))
    dut.layer.value = LAYER
    dut.normalize.value = int(int_layer.normalize)
    for port, model in [(dut.router_mult, int_layer.router_mult),
                        (dut.gate_mult, int_layer.shared_gate_mult)]:
        port.value = Multiplier.const({"mult": model.mult, "shift": model.shift}).as_bits()
    rows = np.concatenate([int_layer.router, int_layer.shared_gate[None]]).reshape(-1)
    await host.src["s_router"].send(AxiStreamFrame(rows.astype("<i2").tobytes()))
    await host.src["s_router"].wait()

    x16, exps = quantize_activations(calibration_tokens(p.hidden, norm, count=MAX_TOKENS,
                                                        seed=20))
    x1, exps1 = quantize_activations(calibration_tokens(p.hidden, norm, count=1, seed=25))
    x5, exps5 = quantize_activations(calibration_tokens(p.hidden, norm, count=5, seed=30))
    for name, values, tokens in [("a token cut short", 3 * p.hidden // 2, 2),
                                 (f"{MAX_TOKENS + 1} tokens", None, MAX_TOKENS)]:
        before = host.counters()
        got, flags = await host.batch(x5, exps5, values)
        while dut.busy.value:
            await RisingEdge(dut.clk)
        after = host.counters()
        c = {key: after[key] - before[key] for key in after}
        assert got.shape == (tokens, p.hidden) and not got.any() and flags == {1}, name
        assert c["malformed"] == 1 and c["loads"] == c["hits"] == c["compute"] == 0, (name, c)
        report(f"{slots} slots, malformed batch ({name}): {tokens} zero outputs flagged on "
               f"tuser, {c['cycles']} cycles, nothing loaded or computed", test="batches")
    resident = []
    for index, (xb, eb) in enumerate([(x16, exps), (x1, exps1), (x1, exps1)]):
        before, asked = host.counters(), len(host.requests)
        host.corrupt = int(index == 1)
        got, flags = await host.batch(xb, eb)
        assert np.array_equal(got, moe_layer(xb, eb, int_layer)) and flags == {0}, index
        while dut.busy.value:
            await RisingEdge(dut.clk)
        after = host.counters()
        c = {name: after[name] - before[name] for name in after}
        tags = _tag_sequence(xb, eb, int_layer)
        hits, missed = _lru(tags, resident, slots)
        assert host.requests[asked:] == [(LAYER, tag) for tag in missed], index
        misses = len(missed)
        assert (c["loads"], c["hits"]) == (misses, hits), (index, c)
        assert (c["rejected"], c["malformed"]) == (int(index == 1), 0), (index, c)
        assert (c["stall"] > 0) == (misses > 0), (index, c)
        assert 0 < c["compute"] and c["compute"] + c["stall"] <= c["cycles"], c
        assert (misses > 0, hits > 0) == PATTERNS[slots][index]
        report(f"{slots} slots, batch {index}: {len(xb)} tokens, {len(tags)} experts "
               f"({misses} loads, {hits} hits): {c['cycles']} cycles "
               f"({c['cycles'] / len(xb):.0f} per token), {c['compute']} computing, "
               f"{c['stall']} stalled on loads; equals intmodel.moe_layer", test="batches",
               **c)
