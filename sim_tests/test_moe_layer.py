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
from cocotb.triggers import ClockCycles, RisingEdge
from cocotbext.axi import AxiStreamBus, AxiStreamFrame, AxiStreamSink, AxiStreamSource
from harness import params, pauses, report, run, start, sweep
from test_expert_loader_blocks import EXPERTS, FFN, LAYERS, layer

from moefpga.hls_models.calibrate import calibration_tokens
from moefpga.hls_models.intmodel import moe_layer, router_logits, softmax_topk
from moefpga.hls_models.quant import quantize_activations
from moefpga.host.pack import pack_layer
from moefpga.rtl.expert_ffn import ExpertFFN
from moefpga.rtl.expert_ffn_params import ExpertFfnParams
from moefpga.rtl.expert_stream import SHARED_EXPERT
from moefpga.rtl.moe_layer import MoeLayer, RequestBeat
from moefpga.rtl.requant import Multiplier

MAX_TOKENS, LAYER, TOP_K = 16, 1, 2
PARAMS = {**FFN, "max_tokens": MAX_TOKENS}
#: Stalled cycles measured by ``steady`` per slot count, for the comparison of 1 and 2 slots.
STEADY = {}


def design(slots):
    p = ExpertFfnParams(**PARAMS)
    return MoeLayer(p, hidden=p.hidden, experts=EXPERTS, top_k=TOP_K, slots=slots,
                    shared=True, shared_gate=True, layers=LAYERS, macs=EXPERTS + 1)


@pytest.mark.parametrize("slots", sweep([2, 1], [3]))
def test_moe_layer(sim_report, slots):
    records = run(design(slots), name="moe_layer", config=f"moe_layer_s{slots}",
                  test_module=__name__, parameters={"slots": slots})
    sim_report.extend(record["text"] for record in records)
    assert {record["test"] for record in records} == {"batches", "steady"}
    steady = [r for r in records if r["test"] == "steady" and "stall" in r]
    STEADY[slots] = sum(r["stall"] for r in steady[1:]) / sum(r["cycles"] for r in steady[1:])
    if slots == 2:
        assert STEADY[2] <= 0.05, STEADY
    if 1 in STEADY and 2 in STEADY:
        assert STEADY[1] > 4 * STEADY[2], STEADY


def _order(tags, resident):
    """The order in which the top runs ``tags`` (the experts of a batch): those in ``resident``
    first, then the others, each group in index order with the shared expert last."""
    key = [(tag not in resident, tag == SHARED_EXPERT, tag) for tag in tags]
    return [tag for _, tag in sorted(zip(key, tags, strict=True))]


def _lru(accesses, resident, slots, *, stop_at_miss=False):
    """The number of hits, the list of misses and the number of evictions of ``accesses`` (tags
    in order) on ``slots`` slots holding ``resident`` (least recently used first), which it
    updates: a hit and a load both make the tag the most recently used. ``stop_at_miss``: the
    first miss is never loaded, and nothing after it runs."""
    hits, misses, evicted = 0, [], 0
    for tag in accesses:
        if tag in resident:
            hits += 1
            resident.remove(tag)
        else:
            misses.append(tag)
            if stop_at_miss:
                break
            if len(resident) == slots:
                resident.pop(0)
                evicted += 1
        resident.append(tag)
    return hits, misses, evicted


class Host:
    """The host side: the top's AXI-Stream ports with ``stall`` pauses, and the records."""

    def __init__(self, dut, hw, records, stall):
        self.dut, self.hw, self.records = dut, hw, records
        bus = {name: AxiStreamBus.from_prefix(dut, name, bus_separator="__")
               for name in ["s_router", "s_tokens", "s_expert", "m_request", "m_result"]}
        self.src = {name: AxiStreamSource(bus[name], dut.clk, dut.rst)
                    for name in ["s_router", "s_tokens", "s_expert"]}
        self.sink = {name: AxiStreamSink(bus[name], dut.clk, dut.rst)
                     for name in ["m_request", "m_result"]}
        for seed, port in enumerate([*self.src.values(), *self.sink.values()]):
            port.set_pause_generator(pauses(seed, stall))
            port.log.setLevel("WARNING")
        self.requests = []
        self.corrupt = 0        # requests to answer first with a record whose CRC is broken
        self.drop = 0           # requests not to answer at all
        cocotb.start_soon(self._answer())

    def record(self, tag):
        return self.records[-1 if tag == SHARED_EXPERT else tag]

    async def _answer(self):
        while True:
            frame = await self.sink["m_request"].recv()
            beat = data.Const(RequestBeat, int.from_bytes(bytes(frame.tdata), "little"))
            self.requests.append((int(beat.layer), int(beat.expert)))
            record = self.record(int(beat.expert))
            if self.drop:
                self.drop -= 1
                continue
            if self.corrupt:
                self.corrupt -= 1
                await self.src["s_expert"].send(AxiStreamFrame(record[:-1] + bytes([
                    record[-1] ^ 1])))
            await self.src["s_expert"].send(AxiStreamFrame(record))

    async def prefetch(self, tag):
        """Send ``tag``'s record unrequested."""
        await self.src["s_expert"].send(AxiStreamFrame(self.record(tag)))

    def counters(self):
        view = data.Const(self.hw.counters_layout, int(self.dut.counters.value))
        return {name: int(view[name]) for name in self.hw.counters_layout.members}

    async def batch(self, x16, exps, values=None):
        """Send a batch (only its first ``values`` values if given) and wait until the top is
        idle; its outputs (tokens, hidden), the set of ``tuser`` flags of the result beats and
        the counters' increments."""
        before = self.counters()
        payload = b"".join(int(v).to_bytes(2, "little", signed=True) + int(e).to_bytes(
            1, "little", signed=True) for row, e in zip(x16, exps, strict=True) for v in row)
        await self.src["s_tokens"].send(AxiStreamFrame(payload[:3 * values if values else None]))
        frame = await self.sink["m_result"].recv()
        while self.dut.busy.value:
            await RisingEdge(self.dut.clk)
        flags = set(frame.tuser) if isinstance(frame.tuser, list) else {frame.tuser}
        out = np.frombuffer(bytes(frame.tdata), "<i4").astype(np.int64)
        after = self.counters()
        return (out.reshape(-1, self.hw.hidden), flags,
                {name: (after[name] - before[name]) % 2**32 for name in after})


def _experts(x16, exps, int_layer):
    """The experts a batch runs, as tags, and the number of tokens of each."""
    picks, _ = softmax_topk(router_logits(x16, exps, int_layer), int_layer.top_k,
                            int_layer.normalize)
    tokens = {int(e): int(np.sum(picks == e)) for e in np.unique(picks)}
    return {**tokens, SHARED_EXPERT: len(x16)}


def _multiplies(experts, int_layer):
    """Multiplies of a batch: each expert multiplies the weights M:N pruning keeps (zeros
    included) once per token."""
    total = 0
    for tag, tokens in experts.items():
        expert = int_layer.shared if tag == SHARED_EXPERT else int_layer.experts[tag]
        for matrix in (expert.gate, expert.up, expert.down):
            rows, cols = matrix.q.shape
            total += tokens * rows * cols * matrix.sparsity.n // matrix.sparsity.m
    return total


async def _setup(dut, stall):
    """Reset; a calibrated layer with its router loaded; the host; the test's hardware."""
    await start(dut)
    hw = design(params()["slots"])
    p = hw.params
    int_layer, norm = layer(p, seed=7)
    assert int_layer.top_k == TOP_K
    host = Host(dut, hw, pack_layer(int_layer, LAYER, p), stall)
    dut.layer.value = LAYER
    dut.load_timeout.value = 0
    dut.normalize.value = int(int_layer.normalize)
    for port, model in [(dut.router_mult, int_layer.router_mult),
                        (dut.gate_mult, int_layer.shared_gate_mult)]:
        port.value = Multiplier.const({"mult": model.mult, "shift": model.shift}).as_bits()
    rows = np.concatenate([int_layer.router, int_layer.shared_gate[None]]).reshape(-1)
    await host.src["s_router"].send(AxiStreamFrame(rows.astype("<i2").tobytes()))
    await host.src["s_router"].wait()
    return hw, int_layer, norm, host


def _check(got, flags, c, xb, eb, int_layer, *, hits, misses):
    """A batch's outputs equal the integer model and its counters the expected work."""
    assert np.array_equal(got, moe_layer(xb, eb, int_layer)) and flags == {0}
    assert (c["loads"], c["hits"]) == (misses, hits), c
    assert c["multiplies"] == _multiplies(_experts(xb, eb, int_layer), int_layer), c
    assert (c["stall"] > 0) == (misses > 0), c
    assert 0 < c["compute"] and c["compute"] + c["stall"] <= c["cycles"], c


def _tokens(norm, count, seed):
    return quantize_activations(calibration_tokens(norm.size, norm, count=count, seed=seed))


@cocotb.test(timeout_time=100, timeout_unit="ms")
async def batches(dut):
    """With 30 % pauses on every port. Two malformed batches (a token cut short by ``tlast``,
    one token too many): zero outputs flagged on ``tuser``. Then batches of a calibrated layer,
    each checked against the integer model, and its requests and counters against an LRU model
    of the slots: 4 tokens on empty slots; one new token, its first record answered corrupt and
    then again; another token after the host prefetched one of its experts; a token whose first
    request is never answered (zero outputs flagged, a timeout); one with an unrequested
    record sent while it runs."""
    hw, int_layer, norm, host = await _setup(dut, stall=0.3)
    slots, d = hw.slots, hw.hidden
    x, exps = _tokens(norm, MAX_TOKENS + 1, seed=30)
    for name, values, tokens in [("a token cut short", 3 * d // 2, 2),
                                 (f"{MAX_TOKENS + 1} tokens", None, MAX_TOKENS)]:
        got, flags, c = await host.batch(x, exps, values)
        assert got.shape == (tokens, d) and not got.any() and flags == {1}, name
        assert c["malformed"] == 1 and c["loads"] == c["hits"] == c["compute"] == 0, (name, c)
        report(f"{slots} slots, malformed batch ({name}): {tokens} zero outputs flagged on "
               f"tuser, {c['cycles']} cycles, nothing loaded or computed", test="batches")

    resident, seen = [], set()
    for index, (count, seed) in enumerate([(4, 20), (1, 25), (1, 26)]):
        xb, eb = _tokens(norm, count, seed)
        asked, prefetched = len(host.requests), index == 2
        order = _order(list(_experts(xb, eb, int_layer)), resident)
        if prefetched:
            tag = next(tag for tag in reversed(order) if tag not in resident)
            await host.prefetch(tag)
            await host.src["s_expert"].wait()
            _lru([tag], resident, slots)
            order = _order(order, resident)
        host.corrupt = int(index == 1)
        got, flags, c = await host.batch(xb, eb)
        hits, missed, evicted = _lru(order, resident, slots)
        assert host.requests[asked:] == [(LAYER, tag) for tag in missed], index
        assert c["evictions"] == evicted, c
        assert (c["rejected"], c["timeouts"]) == (int(index == 1), 0), c
        _check(got, flags, c, xb, eb, int_layer, hits=hits, misses=len(missed))
        seen.add((len(missed) > 0, hits > 0))
        report(f"{slots} slots, batch {index}: {count} tokens, {len(order)} experts "
               f"({len(missed)} loads, {hits} hits{', one prefetched' if prefetched else ''}): "
               f"{c['cycles']} cycles ({c['cycles'] / count:.0f} per token), {c['compute']} "
               f"computing, {c['stall']} stalled on loads; equals intmodel.moe_layer",
               test="batches", **c)
    assert (True, False) in seen and (True, True) in seen, seen

    xb, eb = _tokens(norm, 2, seed=40)
    order = _order(list(_experts(xb, eb, int_layer)), resident)
    asked, host.drop, dut.load_timeout.value = len(host.requests), 1, 5000
    got, flags, c = await host.batch(xb, eb)
    dut.load_timeout.value = 0
    hits, missed, _ = _lru(order, resident, slots, stop_at_miss=True)
    assert missed and host.requests[asked:] == [(LAYER, missed[0])]
    assert got.shape == (2, d) and not got.any() and flags == {1}
    assert (c["timeouts"], c["loads"], c["hits"]) == (1, 1, hits), c
    report(f"{slots} slots, a request never answered: the batch ends after {c['cycles']} "
           f"cycles (load_timeout 5000) with zero outputs flagged on tuser", test="batches")
    asked = len(host.requests)
    order = _order(order, resident)
    got, flags, c = await host.batch(xb, eb)
    hits, missed, evicted = _lru(order, resident, slots)
    assert host.requests[asked:] == [(LAYER, tag) for tag in missed]
    assert (c["timeouts"], c["evictions"]) == (0, evicted), c
    _check(got, flags, c, xb, eb, int_layer, hits=hits, misses=len(missed))
    report(f"{slots} slots, the same batch again: {len(missed)} loads, {hits} hits; equals "
           f"intmodel.moe_layer", test="batches")

    xb, eb = _tokens(norm, 1, seed=41)
    stranger = next(e for e in range(EXPERTS) if e not in _experts(xb, eb, int_layer))
    running = cocotb.start_soon(host.batch(xb, eb))
    await ClockCycles(dut.clk, 300)
    await host.prefetch(stranger)
    got, flags, c = await running
    assert np.array_equal(got, moe_layer(xb, eb, int_layer)) and flags == {0}
    report(f"{slots} slots, a record sent unrequested during a batch: {c['loads']} loads, "
           f"{c['hits']} hits; equals intmodel.moe_layer", test="batches")


@cocotb.test(timeout_time=200, timeout_unit="ms")
async def steady(dut):
    """Six batches of 16 tokens on streams that never pause: the host sends each record as
    soon as it is requested, at one byte a cycle. A load_timeout of 1000 cycles, shorter than
    many loads wait for their slot, never fires: only a silent host times out. Reports each
    batch's cycles, stalls and multiplier utilization, and how long a load takes against an
    expert's compute."""
    hw, int_layer, norm, host = await _setup(dut, stall=0)
    dut.load_timeout.value = 1000           # shorter than a load waits for its slot
    p = hw.params
    ffn = ExpertFFN(**PARAMS)
    record = len(host.record(0))
    for index in range(6):
        xb, eb = _tokens(norm, MAX_TOKENS, seed=100 + index)
        got, flags, c = await host.batch(xb, eb)
        assert np.array_equal(got, moe_layer(xb, eb, int_layer)) and flags == {0}
        experts = _experts(xb, eb, int_layer)
        assert c["multiplies"] == _multiplies(experts, int_layer) and not c["timeouts"], c
        routed = sorted(n for tag, n in experts.items() if tag != SHARED_EXPERT)
        peak = c["cycles"] * p.lanes * p.engine.n
        report(f"{hw.slots} slots, steady batch {index}: {len(experts)} experts "
               f"({c['loads']} loads of {record} bytes, {c['hits']} hits), tokens per routed "
               f"expert {routed} (compute {ffn.cycles(routed[0], p.hidden, p.ffn)}.."
               f"{ffn.cycles(routed[-1], p.hidden, p.ffn)} cycles each): {c['cycles']} cycles "
               f"({c['cycles'] / MAX_TOKENS:.0f} per token), {c['stall']} stalled "
               f"({100 * c['stall'] / c['cycles']:.1f} %), multiplier utilization "
               f"{100 * c['multiplies'] / peak:.1f} %", test="steady", **c)
