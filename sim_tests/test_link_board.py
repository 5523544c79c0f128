"""The board top (rtl/board_top.py: the link in front of one MoE layer) on Verilator, driven
only through its UART lines by a stop-and-wait host built on host.link's frames.

The host says HELLO, loads the router, sends a batch, answers every REQUEST with the packed
record, and compares RESULTS with ``intmodel.moe_layer`` bit for bit and COUNTERS with the
requests; the same batch again runs on resident experts; RESET clears the counters, and
(``MOEFPGA_SIM_FULL=1``) empties the slots: the batch after it loads every expert again.
"""

import cocotb
import numpy as np
from amaranth.lib import data
from cocotb.triggers import ClockCycles
from harness import FULL_SWEEP, params, report, run, start
from test_expert_loader_blocks import EXPERTS, FFN, LAYERS, layer
from test_link_rtl import DIVISOR, Host

from moefpga.hls_models.calibrate import calibration_tokens
from moefpga.hls_models.intmodel import moe_layer
from moefpga.hls_models.quant import quantize_activations
from moefpga.host.link import MAX_PAYLOAD, Identity, Type
from moefpga.host.pack import pack_layer
from moefpga.rtl.board_top import BoardTop
from moefpga.rtl.expert_ffn_params import ExpertFfnParams
from moefpga.rtl.expert_stream import SHARED_EXPERT

LAYER, TOKENS, SLOTS = 1, 4, 5


def design():
    p = ExpertFfnParams(**{**FFN, "max_tokens": TOKENS})
    return BoardTop(p, hidden=p.hidden, experts=EXPERTS, top_k=2, slots=SLOTS, layers=LAYERS,
                    macs=EXPERTS + 1, divisor=DIVISOR, clock_hz=12_000_000, ack_timeout=12_000,
                    load_timeout=0, fmax_khz=27_456)


def test_link_board(sim_report):
    records = run(design(), name="board_top", config=f"board_top_d{DIVISOR}",
                  test_module=__name__, parameters={"full": FULL_SWEEP})
    sim_report.extend(record["text"] for record in records)
    assert {record["test"] for record in records} == {"session"}


class Session:
    """Stop-and-wait over :class:`test_link_rtl.Host`'s line, as docs/link.md says: every
    frame of ours waits for its ACK; every data frame of the device is ACKed, duplicates
    dropped, messages joined."""

    def __init__(self, line):
        self.line, self.seq, self.expect = line, 0, 0
        self.inbox, self._fragments = [], b""

    async def _pump(self):
        """Handle the frames read so far; the ACKs among them, by sequence number."""
        acks = []
        frames, self.line.frames = self.line.frames, []
        for frame in frames:
            assert frame != "bad", "a broken frame from the device on a clean line"
            if frame.type == Type.ACK:
                acks.append(frame.seq)
                continue
            assert frame.type != Type.NAK, "the device NAKed a frame on a clean line"
            await self.line.send(Type.ACK, frame.seq)
            if frame.seq != self.expect and frame.type != Type.IDENTIFY:
                continue
            self.expect = (frame.seq + 1) % 256
            self._fragments += frame.payload
            if not frame.more:
                self.inbox.append((frame.type, self._fragments))
                self._fragments = b""
        return acks

    async def send(self, kind, payload=b""):
        chunks = [payload[i:i + MAX_PAYLOAD] for i in range(0, len(payload), MAX_PAYLOAD)]
        for k, chunk in enumerate(chunks or [b""]):
            await self.line.send(kind, self.seq, chunk, more=k < len(chunks) - 1)
            for _ in range(2000):
                if self.seq in await self._pump():
                    break
                await ClockCycles(self.line.clk, 100)
            else:
                raise AssertionError(f"no ACK of {kind.name} frame {self.seq}")
            self.seq = (self.seq + 1) % 256

    async def receive(self, limit=3_000_000):
        """The next message from the device."""
        for _ in range(limit // 100):
            await self._pump()
            if self.inbox:
                return self.inbox.pop(0)
            await ClockCycles(self.line.clk, 100)
        raise AssertionError("no message from the device")


def _multiplier(model):
    return model.mult.to_bytes(2, "little") + model.shift.to_bytes(1, "little", signed=True)


@cocotb.test(timeout_time=400, timeout_unit="ms")
async def session(dut):
    """HELLO, ROUTER, a batch of 4 tokens with every expert requested and loaded, the same
    batch on resident experts, RESET (and, in the full sweep, the batch again)."""
    await start(dut)
    hw = design()
    p = hw.layer.params
    int_layer, norm = layer(p, seed=7)
    records = pack_layer(int_layer, LAYER, p)
    host = Session(Host(dut, streams=False))

    host.seq = 200                          # any number: HELLO starts a session
    await host.send(Type.HELLO)
    kind, payload = await host.receive()
    assert kind == Type.IDENTIFY and Identity.from_bytes(payload) == hw.identity
    assert hw.identity.fmax_khz == 27_456

    rows = np.concatenate([int_layer.router, int_layer.shared_gate[None]]).reshape(-1)
    router = (_multiplier(int_layer.router_mult) + _multiplier(int_layer.shared_gate_mult)
              + bytes([int(int_layer.normalize)]) + LAYER.to_bytes(2, "little")
              + rows.astype("<i2").tobytes())
    await host.send(Type.ROUTER, router)
    x16, exps = quantize_activations(calibration_tokens(norm.size, norm, count=TOKENS, seed=20))
    expected = moe_layer(x16, exps, int_layer)
    tokens = b"".join(int(v).to_bytes(2, "little", signed=True)
                      + int(e).to_bytes(1, "little", signed=True)
                      for row, e in zip(x16, exps, strict=True) for v in row)
    layout = hw.layer.counters_layout

    async def batch():
        """Run the batch, answering requests; the requests and the outputs."""
        await host.send(Type.RUN_TOKENS, tokens)
        requests = []
        while True:
            kind, payload = await host.receive()
            if kind == Type.REQUEST:
                layer_index = int.from_bytes(payload[:2], "little")
                expert = int.from_bytes(payload[2:], "little")
                assert layer_index == LAYER, payload.hex()
                requests.append(expert)
                await host.send(Type.LOAD_EXPERT,
                                records[-1 if expert == SHARED_EXPERT else expert])
                continue
            assert kind == Type.RESULTS and payload[0] == 0, (kind, payload[:1])
            out = np.frombuffer(payload[1:], "<i4").reshape(TOKENS, p.hidden)
            return requests, out

    async def counters():
        await host.send(Type.READ_COUNTERS)
        kind, payload = await host.receive()
        assert kind == Type.COUNTERS and len(payload) * 8 == layout.size
        view = data.Const(layout, int.from_bytes(payload, "little"))
        return {name: int(view[name]) for name in layout.members}

    requests, out = await batch()
    assert np.array_equal(out, expected)
    first = await counters()
    assert len(requests) == len(set(requests)) and SHARED_EXPERT in requests
    assert (first["loads"], first["hits"]) == (len(requests), 0), first
    sent = sum(len(records[-1 if e == SHARED_EXPERT else e]) for e in requests)
    report(f"board top: HELLO -> IDENTIFY; ROUTER; {TOKENS} tokens: {len(requests)} REQUESTs "
           f"answered with LOAD EXPERT ({sent} bytes), RESULTS equal intmodel.moe_layer; "
           f"COUNTERS loads {first['loads']}, {first['cycles']} busy cycles", test="session")

    requests, out = await batch()
    assert requests == [] and np.array_equal(out, expected)
    second = await counters()
    assert (second["loads"], second["hits"]) == (first["loads"], first["loads"]), second

    await host.send(Type.RESET)
    cleared = await counters()
    assert all(value == 0 for value in cleared.values()), cleared
    report("board top: the same batch again on resident experts (no REQUEST, same RESULTS, "
           f"{second['hits'] - first['hits']} hits); RESET clears the counters", test="session")
    if params()["full"]:
        await host.send(Type.ROUTER, router)    # RESET cleared the router's registers too
        requests, out = await batch()
        assert sorted(requests) == sorted(set(requests)) and len(requests) == first["loads"]
        assert np.array_equal(out, expected)
        report("board top: after RESET and ROUTER the batch requests every expert again",
               test="session")
