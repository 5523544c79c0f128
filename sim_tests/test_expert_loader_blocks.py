"""The expert loader in the Amaranth simulator: good and corrupt records against what the load
port and the status must show, with random stalls on the byte stream and on ``load``.

:func:`cases` (good records and every kind of corruption, with the expected status) is shared
with the Verilator test ``test_expert_loader.py``.
"""

import random
import tempfile
import zlib

from amaranth.sim import Simulator

from moefpga.hls_models.calibrate import QuantSpec, calibration_tokens, quantize_layer
from moefpga.hls_models.checkpoint import Checkpoint
from moefpga.hls_models.sparsity import DENSE, Sparsity
from moefpga.hls_models.synthetic import write_checkpoint
from moefpga.host.pack import pack_expert, pack_layer, unpack_expert
from moefpga.rtl.expert_ffn_params import ExpertFfnParams
from moefpga.rtl.expert_loader import ExpertLoader, StatusKind
from moefpga.rtl.expert_slots import LoadOp
from moefpga.rtl.expert_stream import CRC_BYTES, HEADER_BYTES, SHARED_EXPERT

FFN = dict(lanes=2, m=4, n=2, weight_bits=4, group_size=16, max_tokens=2, hidden=32, ffn=32)
LAYERS, EXPERTS = 2, 4


def layer(p, seed):
    """A calibrated Qwen2-MoE layer of ``p``'s sizes (4 experts, top-2, gated shared), its
    RMSNorm weight."""
    with tempfile.TemporaryDirectory() as folder:
        write_checkpoint(folder, "qwen2_moe", num_layers=1, hidden_size=p.hidden,
                         num_experts=EXPERTS, top_k=2, expert_ffn_size=p.ffn,
                         shared_expert_ffn_size=p.ffn, vocab_size=64, seed=seed)
        checkpoint = Checkpoint.open(folder)
        weights, norm = checkpoint.moe_layer(0), checkpoint.norm_weight(0)
    e = p.engine
    spec = QuantSpec(bits=e.weight_bits, group_size=None,
                     sparsity=DENSE if e.n == e.m else Sparsity(m=e.m, n=e.n),
                     acc_bits=p.acc_bits)
    return quantize_layer(weights, spec, calibration_tokens(p.hidden, norm, seed=seed)), norm


def _flip(record, byte, bit=0):
    out = bytearray(record)
    out[byte] ^= 1 << bit
    return bytes(out)


def _header(record, offset, value, size):
    """``record`` with header bytes ``offset..offset+size`` set to ``value`` and a good CRC."""
    body = bytearray(record[:-CRC_BYTES])
    body[offset:offset + size] = value.to_bytes(size, "little")
    return bytes(body) + zlib.crc32(body).to_bytes(CRC_BYTES, "little")


def cases(p, int_layer):
    """(name, record bytes, expected ``StatusKind``, whether a load begins) for the records of
    ``int_layer`` (as layer 1) and corrupt ones; every bad record is followed by a good one."""
    expert = int_layer.experts[2]
    base = pack_expert(expert, layer=0, expert=2, params=p)
    other = ExpertFfnParams(**{**FFN, "n": 4})
    wide = ExpertFfnParams(**{**FFN, "lanes": 4})
    K = StatusKind
    refused = [
        ("magic bit", _flip(base, 1), K.BAD_MAGIC),
        ("version", _header(base, 4, 2, 1), K.BAD_VERSION),
        ("hidden bit", _flip(base, 10), K.MISMATCH),
        ("dense engine", pack_expert(expert, layer=0, expert=2, params=other), K.MISMATCH),
        ("4 lanes", pack_expert(expert, layer=0, expert=2, params=wide), K.MISMATCH),
        ("layer out of range", pack_expert(expert, layer=LAYERS, expert=2, params=p), K.MISMATCH),
        ("expert out of range", pack_expert(expert, layer=0, expert=EXPERTS, params=p),
         K.MISMATCH),
        ("hidden too large", _header(base, 10, 2 * p.hidden, 2), K.MISMATCH),
        ("payload length", _header(base, 32, len(base) - 39, 4), K.BAD_LENGTH),
        ("truncated header", base[:20], K.BAD_LENGTH),
    ]
    aborted = [
        ("multiplier bit", _flip(base, 20), K.BAD_CRC),
        ("SiLU bit", _flip(base, HEADER_BYTES + 7, 3), K.BAD_CRC),
        ("weight bit", _flip(base, len(base) - 9, 6), K.BAD_CRC),
        ("CRC bit", _flip(base, len(base) - 2, 7), K.BAD_CRC),
        ("truncated SiLU", base[:HEADER_BYTES + 1], K.BAD_LENGTH),
        ("truncated weights", base[:HEADER_BYTES + 300], K.BAD_LENGTH),
        ("truncated CRC", base[:-1], K.BAD_LENGTH),
        ("one byte late", base + b"\0", K.BAD_LENGTH),
        ("many bytes late", base + bytes(range(50)), K.BAD_LENGTH),
    ]
    out = [(f"good {i}", record, K.OK, True)
           for i, record in enumerate(pack_layer(int_layer, 1, p))]
    for group, loads in [(refused, False), (aborted, True)]:
        for name, record, kind in group:
            out += [(name, record, kind, loads), (f"good after {name}", base, K.OK, True)]
    return out


def good_ops(record, p, tag):
    """The ``load`` beats (op, data) of a good record: begin, SiLU bytes, beats, commit."""
    unpacked = unpack_expert(record, p)
    return [(LoadOp.BEGIN, tag), *[(LoadOp.WORD, int(v) & 0xff) for v in unpacked.silu],
            *[(LoadOp.WORD, b) for b in unpacked.beats], (LoadOp.COMMIT, 0)]


def tag_bits(dut, record):
    """The tag ``dut`` (an ExpertLoader) gives the expert of ``record``: the shared expert's
    index is ``experts``."""
    layer, expert = (int.from_bytes(record[i:i + 2], "little") for i in (6, 8))
    expert = dut.experts if expert == SHARED_EXPERT else expert
    return layer | expert << dut.tag["layer"].shape.width


def test_loader_records():
    """Every case of :func:`cases` through the loader with 30 % stalls on the byte stream and
    on ``load``: the status kinds and slots, the exact load beats of every good record, no
    load for a refused header and an abort for every other bad record."""
    p = ExpertFfnParams(**FFN)
    dut = ExpertLoader(p, layers=LAYERS, experts=EXPERTS, slots=2)
    int_layer, _ = layer(p, seed=5)
    records = cases(p, int_layer)
    rng = random.Random(6)
    statuses, loads = [], []

    async def source(ctx):
        s = dut.s_axis
        for _, record, _, _ in records:
            for i, byte in enumerate(record):
                while rng.random() < 0.3:
                    await ctx.tick()
                ctx.set(s.tdata, byte)
                ctx.set(s.tlast, i == len(record) - 1)
                ctx.set(s.tvalid, 1)
                await ctx.tick().until(s.tready)
                ctx.set(s.tvalid, 0)

    async def sink(ctx):
        ctx.set(dut.load_slot, 1)
        ctx.set(dut.status.ready, 1)
        ops = []
        while len(statuses) < len(records):
            ready = rng.random() >= 0.3
            ctx.set(dut.load.ready, ready)
            if ready and ctx.get(dut.load.valid):
                beat = ctx.get(dut.load.payload)
                ops.append((LoadOp(beat.op), int(beat.data)))
            if ctx.get(dut.status.valid):
                view = ctx.get(dut.status.payload)
                statuses.append((StatusKind(view.kind), int(view.slot)))
                loads.append(ops)
                ops = []
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(source)
    sim.add_testbench(sink)
    sim.run_until(2e-6 * sum(len(record) for _, record, _, _ in records) * 2)
    assert len(statuses) == len(records)
    for (name, record, kind, began), (status, slot), ops in zip(records, statuses, loads,
                                                                strict=True):
        assert status == kind, (name, status, kind)
        assert slot == (1 if began else 0), name
        if kind == StatusKind.OK:
            assert ops == good_ops(record, p, tag_bits(dut, record)), name
        elif began:
            assert [ops[0][0], ops[-1][0]] == [LoadOp.BEGIN, LoadOp.ABORT], name
            assert all(op == LoadOp.WORD for op, _ in ops[1:-1]), name
        else:
            assert ops == [], name
