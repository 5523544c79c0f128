"""The expert loader on Verilator, feeding two expert slots that feed the expert FFN datapath.

``end_to_end`` streams the packed records of a calibrated layer (AxiStreamSource with random
pauses), reads each loaded expert from its slot into ``ExpertFFN`` with the command built from
the loader's per-slot table, and compares with ``intmodel.expert_ffn`` and ``combine``.
``corruption`` streams every case of ``test_expert_loader_blocks.cases`` and checks each
status, that nothing bad is ever found by a lookup, that an aborted load's slot is refused for
reads, and that the next good record loads.
"""

import cocotb
import numpy as np
from amaranth import Module
from amaranth.lib import data, wiring
from cocotb.triggers import RisingEdge
from cocotb.utils import get_sim_time
from cocotbext.axi import AxiStreamBus, AxiStreamFrame, AxiStreamSource
from harness import CLOCK_NS, beat, pauses, report, run, start, stream_sink, stream_source
from test_expert_loader_blocks import EXPERTS, FFN, LAYERS, cases, layer, tag_bits

from moefpga.hls_models.calibrate import calibration_tokens
from moefpga.hls_models.intmodel import (
    PROB_FRAC_BITS,
    combine,
    expert_ffn,
    expert_input,
    router_logits,
    shared_gate_logit,
    sigmoid,
    softmax_topk,
)
from moefpga.hls_models.quant import quantize_activations
from moefpga.host.pack import pack_layer
from moefpga.rtl.expert_ffn import ExpertFFN
from moefpga.rtl.expert_loader import ExpertLoader, StatusKind
from moefpga.rtl.expert_slots import EventKind, ExpertSlots

SLOTS = 2
ONE = 1 << PROB_FRAC_BITS


class Top(wiring.Component):
    """ExpertLoader -> ExpertSlots (``SLOTS``) -> ExpertFFN, as the MoE layer top will join
    them; the other ports of the three face the outside."""

    _PORTS = {"loader": ["s_axis", "status", "info_slot", "info"],
              "slots": ["lookup", "found", "read", "event"],
              "ffn": ["cmd", "meta", "x", "o"]}

    def __init__(self):
        self.ffn = ExpertFFN(**FFN)
        p = self.ffn.params
        self.loader = ExpertLoader(p, layers=LAYERS, experts=EXPERTS, slots=SLOTS)
        self.slots = ExpertSlots(p, slots=SLOTS, layers=LAYERS, experts=EXPERTS + 1)
        super().__init__({name: getattr(self, unit).signature.members[name]
                          for unit, names in self._PORTS.items() for name in names})

    def elaborate(self, platform):
        m = Module()
        m.submodules.loader, m.submodules.slots = self.loader, self.slots
        m.submodules.ffn = self.ffn
        wiring.connect(m, loader=self.loader.load, slots=self.slots.load)
        wiring.connect(m, self.slots.silu, self.ffn.silu)
        wiring.connect(m, self.slots.w, self.ffn.w)
        m.d.comb += self.loader.load_slot.eq(self.slots.load_slot)
        for unit, names in self._PORTS.items():
            for name in names:
                port = getattr(getattr(self, unit), name)
                if hasattr(port, "signature"):          # a stream
                    wiring.connect(m, wiring.flipped(getattr(self, name)), port)
                elif name.endswith("_slot"):
                    m.d.comb += port.eq(getattr(self, name))
                else:
                    m.d.comb += getattr(self, name).eq(port)
        return m


def test_expert_loader(sim_report):
    dut = Top()
    records = run(dut, name="expert_loader_top", config=f"loader_slots{SLOTS}",
                  test_module=__name__, parameters={})
    sim_report.extend(record["text"] for record in records)
    assert {record.get("test") for record in records} == {None, "end_to_end", "corruption"}


class Bench:
    """The top's streams with 30 % stalls everywhere, and the loader's and slots' formats."""

    def __init__(self, dut, seed):
        self.dut, self.hw = dut, Top()
        self.p = self.hw.ffn.params
        self.axis = AxiStreamSource(AxiStreamBus.from_prefix(dut, "s_axis", bus_separator="__"),
                                    dut.clk, dut.rst)
        self.axis.set_pause_generator(pauses(seed, 0.3))
        self.axis.log.setLevel("WARNING")
        self.src = {name: stream_source(dut, name, seed=seed + i, stall=0.3)
                    for i, name in enumerate(["read", "lookup", "cmd", "meta", "x"])}
        self.sink = {name: stream_sink(dut, name, seed=seed + 10 + i, stall=0.3)
                     for i, name in enumerate(["status", "found", "event", "o"])}
        self.events = []
        cocotb.start_soon(self._events())

    async def _events(self):
        while True:
            bits = int((await self.sink["event"].recv()).payload)
            view = data.Const(self.hw.slots.event_beat, bits)
            self.events.append((EventKind(view.kind), int(view.slot)))

    async def load(self, record):
        """Stream one record; its status (kind, slot)."""
        await self.axis.send(AxiStreamFrame(record))
        view = data.Const(self.hw.loader.status_beat,
                          int((await self.sink["status"].recv()).payload))
        return StatusKind(view.kind), int(view.slot)

    async def lookup(self, tag):
        self.src["lookup"].send_nowait(beat(tag))
        view = data.Const(self.hw.slots.found_beat, int((await self.sink["found"].recv()).payload))
        return bool(view.hit), int(view.slot)

    async def command(self, slot, tokens):
        """The FFN command for the expert in ``slot`` from the loader's table."""
        self.dut.info_slot.value = slot
        await RisingEdge(self.dut.clk)
        info = data.Const(self.hw.loader.info_layout, int(self.dut.info.value))
        p = self.p
        mults = {key: {"mult": info[key].mult, "shift": info[key].shift}
                 for key in ("gate_mult", "up_mult", "hidden_mult", "down_mult")}
        return p.command.const({
            "tokens": tokens,
            "hidden_groups": info.hidden // p.group_size, "hidden_blocks": info.hidden // p.lanes,
            "ffn_groups": info.ffn // p.group_size, "ffn_blocks": info.ffn // p.lanes,
            **mults}).as_bits()

    async def run_expert(self, slot, xq, exps, token_slots, weights):
        """Read ``slot`` into the FFN for the tokens ``xq``; returns its command."""
        command = await self.command(slot, len(xq))
        self.src["cmd"].send_nowait(beat(command))
        for bits in self.p.meta_beats(token_slots, exps, weights):
            self.src["meta"].send_nowait(beat(bits))
        for bits in self.p.engine.activation_beats(xq):
            self.src["x"].send_nowait(beat(bits))
        self.src["read"].send_nowait(beat(slot))
        return command

    async def emit(self, tokens):
        p = self.p
        self.src["cmd"].send_nowait(beat(p.emit_command(tokens, p.hidden)))
        beats = [int((await self.sink["o"].recv()).payload)
                 for _ in range(tokens * p.hidden // p.lanes)]
        return p.outputs(beats, tokens)


def _tokens(p, norm, count, seed):
    return quantize_activations(calibration_tokens(p.hidden, norm, count=count, seed=seed))


_TIMEOUT = dict(timeout_time=50, timeout_unit="ms")


@cocotb.test(**_TIMEOUT)
async def end_to_end(dut):
    """Each expert of a calibrated layer loaded and run alone; then a batch routed to top-2
    experts and the gated shared expert, loading each expert as it is needed."""
    await start(dut)
    b = Bench(dut, seed=1)
    p = b.p
    int_layer, norm = layer(p, seed=7)
    records = pack_layer(int_layer, 1, p)
    experts = [*int_layer.experts, int_layer.shared]
    b.axis.clear_pause_generator()            # the first record on a stream without pauses
    began = get_sim_time("ns")
    for index, (record, expert) in enumerate(zip(records, experts, strict=True)):
        kind, slot = await b.load(record)
        assert kind == StatusKind.OK
        if not index:
            cycles = round((get_sim_time("ns") - began) / CLOCK_NS)
            b.axis.set_pause_generator(pauses(3, 0.3))
        tokens = 1 + index % p.max_tokens
        xq, exps = expert_input(*_tokens(p, norm, tokens, seed=10 + index))
        command = await b.run_expert(slot, xq, exps, range(tokens), [ONE] * tokens)
        assert command == p.expert_command(expert, tokens)
        got = await b.emit(tokens)
        assert np.array_equal(got, expert_ffn(xq, exps, expert, int_layer.acc_bits)), index

    x16, exp16 = _tokens(p, norm, p.max_tokens, seed=20)
    picks, weights = softmax_topk(router_logits(x16, exp16, int_layer), int_layer.top_k,
                                  int_layer.normalize)
    xq, exps = expert_input(x16, exp16)
    outputs = np.zeros((len(xq), int_layer.top_k + 1, p.hidden), dtype=np.int64)
    for index in np.unique(picks):
        token, column = np.nonzero(picks == index)
        kind, slot = await b.load(records[index])
        assert kind == StatusKind.OK
        await b.run_expert(slot, xq[token], exps[token], token, weights[token, column])
        outputs[token, column] = expert_ffn(xq[token], exps[token], experts[index],
                                            int_layer.acc_bits)
    shared_weight = sigmoid(shared_gate_logit(x16, exp16, int_layer))
    kind, slot = await b.load(records[-1])
    await b.run_expert(slot, xq, exps, range(len(xq)), shared_weight)
    outputs[:, -1] = expert_ffn(xq, exps, int_layer.shared, int_layer.acc_bits)
    expected = combine(np.concatenate([weights, shared_weight[:, None]], axis=1), outputs)
    assert np.array_equal(await b.emit(len(xq)), expected)
    report(f"loader: a {len(records[0])}-byte record to its status in {cycles} cycles without "
           f"pauses ({cycles / len(records[0]):.3f} cycles per byte)", cycles=cycles)
    report(f"end to end: {len(records)} records of {len(records[0])} bytes loaded through "
           f"{SLOTS} slots equal intmodel.expert_ffn, and top-{int_layer.top_k} + shared equal "
           f"intmodel.combine, with 30 % stalls", test="end_to_end")


@cocotb.test(**_TIMEOUT)
async def corruption(dut):
    """Every case of ``cases``: its status; a lookup of its tag misses after an aborted load
    and is unchanged after a refused header; the aborted slot refuses reads; good records after
    bad ones load and hit."""
    await start(dut)
    b = Bench(dut, seed=2)
    p = b.p
    int_layer, _ = layer(p, seed=5)
    mask = (1 << b.hw.loader.tag.size) - 1
    counts = {StatusKind.OK: 0, "aborted": 0}
    for name, record, kind, began in cases(p, int_layer):
        tag = tag_bits(b.hw.loader, record) & mask
        before = await b.lookup(tag)
        got, slot = await b.load(record)
        assert got == kind, (name, got, kind)
        hit, found = await b.lookup(tag)
        if kind == StatusKind.OK:
            assert (hit, found) == (True, slot), name
            counts[kind] += 1
        elif began:
            assert not hit, name
            counts["aborted"] += 1
            seen = len(b.events)
            b.src["read"].send_nowait(beat(slot))
            while (EventKind.REFUSED, slot) not in b.events[seen:]:
                await RisingEdge(dut.clk)
        else:
            assert (hit, found) == before, name
    for _ in range(20):
        await RisingEdge(dut.clk)
    assert sum(e == EventKind.LOAD for e, _ in b.events) == counts[StatusKind.OK]
    assert sum(e == EventKind.ABORT for e, _ in b.events) == counts["aborted"]
    report(f"corruption: {len(cases(p, int_layer))} records, {counts['aborted']} aborted, "
           f"each with its status, never found, slot refused; good ones after each load",
           test="corruption")
