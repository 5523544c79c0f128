"""The packed expert stream (rtl/expert_stream.py, host/pack.py, docs/formats.md)."""

import random
import tempfile
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from moefpga.hls_models.calibrate import QuantSpec, calibration_tokens, quantize_layer
from moefpga.hls_models.checkpoint import Checkpoint
from moefpga.hls_models.errors import MoefpgaError
from moefpga.hls_models.fixedpoint import Multiplier
from moefpga.hls_models.intmodel import IntExpert
from moefpga.hls_models.quant import QuantizedMatrix
from moefpga.hls_models.sparsity import DENSE, Sparsity
from moefpga.hls_models.synthetic import write_checkpoint
from moefpga.host.pack import pack_expert, pack_layer, unpack_expert
from moefpga.rtl.expert_ffn_params import ExpertFfnParams
from moefpga.rtl.expert_stream import (
    CRC_BYTES,
    CRC_RESIDUE,
    HEADER_BYTES,
    SHARED_EXPERT,
    payload_bytes,
)

FORMATS_DOC = Path(__file__).resolve().parents[1] / "docs" / "formats.md"

# (quantization, datapath): int8 per channel on a dense engine; int4 G=32 2:4 on an engine with
# G=16, so every mantissa is repeated. Experts have f=32, the shared one f=64 (the maximum).
CONFIGS = {
    "int8-channel-dense": (
        QuantSpec(bits=8, group_size=None, sparsity=DENSE),
        dict(lanes=4, m=4, n=4, weight_bits=8, group_size=16, max_tokens=4, hidden=64, ffn=64)),
    "int4-g32-2of4": (
        QuantSpec(bits=4, group_size=32, sparsity=Sparsity(m=4, n=2)),
        dict(lanes=8, m=4, n=2, weight_bits=4, group_size=16, max_tokens=4, hidden=64, ffn=64)),
}


@cache
def _layer(config):
    """A calibrated Qwen2-MoE layer (3 experts and a shared one) and its datapath parameters."""
    spec, kwargs = CONFIGS[config]
    with tempfile.TemporaryDirectory() as folder:
        write_checkpoint(folder, "qwen2_moe", num_layers=1, hidden_size=64, num_experts=3,
                         top_k=2, expert_ffn_size=32, shared_expert_ffn_size=64, vocab_size=64,
                         seed=7)
        checkpoint = Checkpoint.open(folder)
        calibration = calibration_tokens(64, checkpoint.norm_weight(0), seed=7)
        layer = quantize_layer(checkpoint.moe_layer(0), spec, calibration)
    return layer, ExpertFfnParams(**kwargs)


def _tiny_matrix(q, mant):
    return QuantizedMatrix(q=np.array(q, np.int8), mant=np.array(mant, np.uint16)[:, None],
                           scale=np.float32(1), bits=4, group_size=4, sparsity=Sparsity(4, 2))


#: The expert and datapath of the worked example in docs/formats.md.
TINY = IntExpert(
    gate=_tiny_matrix([[3, 0, 0, -2], [0, 5, 1, 0], [-7, 7, 0, 0], [0, 0, 0, 0]],
                      [256, 100, 1, 256]),
    up=_tiny_matrix([[1, 0, 1, 0], [0, -1, 0, -1], [2, 0, 0, 0], [0, 0, 4, 4]],
                    [64, 128, 200, 256]),
    down=_tiny_matrix([[1, 2, 0, 0], [0, 0, -3, -4], [5, 0, 6, 0], [0, 7, 0, -7]],
                      [10, 20, 30, 40]),
    gate_mult=Multiplier(32768, 8), silu_table=np.arange(-128, 128),
    up_mult=Multiplier(40000, 16), hidden_mult=Multiplier(49152, 12),
    down_mult=Multiplier(65535, -2))
TINY_KWARGS = dict(lanes=2, m=4, n=2, weight_bits=4, group_size=4, max_tokens=1, hidden=4, ffn=4)
TINY_PARAMS = ExpertFfnParams(**TINY_KWARGS)


def _tiny_record():
    return pack_expert(TINY, layer=1, expert=3, params=TINY_PARAMS)


def _with_crc(body):
    """``body`` (header and payload) with its correct CRC appended."""
    return body + zlib.crc32(body).to_bytes(CRC_BYTES, "little")


def _patched(record, offset, new):
    """``record`` with ``new`` written at ``offset`` and the CRC recomputed."""
    body = bytearray(record[:-CRC_BYTES])
    body[offset:offset + len(new)] = new
    return _with_crc(bytes(body))


# --- round trip on real layers ------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_round_trip(config):
    layer, params = _layer(config)
    records = pack_layer(layer, 5, params)
    experts = [*enumerate(layer.experts), (SHARED_EXPERT, layer.shared)]
    assert len(records) == len(experts) == 4
    for record, (index, expert) in zip(records, experts, strict=True):
        ffn, hidden = expert.gate.q.shape
        assert len(record) == HEADER_BYTES + payload_bytes(params, hidden, ffn) + CRC_BYTES
        assert zlib.crc32(record) == CRC_RESIDUE
        header, silu, beats = unpack_expert(record, params)
        assert (header["layer"], header["expert"], header["hidden"], header["ffn"]) == \
            (5, index, hidden, ffn)
        assert [header[k] for k in ("gate_mult", "up_mult", "hidden_mult", "down_mult")] == \
            [expert.gate_mult, expert.up_mult, expert.hidden_mult, expert.down_mult]
        np.testing.assert_array_equal(silu, expert.silu_table)
        assert beats == params.weight_beats(expert)
    assert {unpack_expert(r, params).header["ffn"] for r in records} == {32, 64}


def test_every_single_bit_flip_is_detected():
    layer, params = _layer("int4-g32-2of4")
    record = pack_layer(layer, 0, params)[1]
    bits = len(record) * 8
    payload = range(HEADER_BYTES * 8, bits - CRC_BYTES * 8)
    positions = [*range(HEADER_BYTES * 8), *random.Random(1).sample(payload, 400),
                 *payload[:64], *payload[-64:], *range(bits - CRC_BYTES * 8, bits)]
    for bit in positions:
        flipped = bytearray(record)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(MoefpgaError, match="corrupted|magic|version|truncated|too long"):
            unpack_expert(bytes(flipped), params)


# --- malformed records --------------------------------------------------------------------------


@pytest.mark.parametrize("cut, message", [
    (lambda r: r[:-1], "record of 331 bytes is truncated: its header declares 332"),
    (lambda r: r[:HEADER_BYTES], "record of 36 bytes is truncated: a record has at least 40"),
    (lambda r: b"", "record of 0 bytes is truncated"),
    (lambda r: r + b"\0", "record of 333 bytes is too long: its header declares 332"),
])
def test_wrong_length(cut, message):
    with pytest.raises(MoefpgaError, match=message):
        unpack_expert(cut(_tiny_record()), TINY_PARAMS)


def test_wrong_magic_and_version():
    record = _tiny_record()
    with pytest.raises(MoefpgaError, match="not a packed expert: magic 0x58456f4e"):
        unpack_expert(_patched(record, 0, b"N"), TINY_PARAMS)
    with pytest.raises(MoefpgaError, match="format version 2 is not supported, only 1"):
        unpack_expert(_patched(record, 4, b"\x02"), TINY_PARAMS)


@pytest.mark.parametrize("change, message", [
    (dict(n=1), "expert 3 of layer 1 was packed for 2:4 weights, the hardware takes 1:4"),
    (dict(m=8, group_size=8, hidden=8, ffn=8), "was packed for 2:4 weights, the hardware "
                                                "takes 2:8"),
    (dict(weight_bits=8), "was packed for 4-bit weights, the hardware takes 8-bit weights"),
    (dict(group_size=8, hidden=8, ffn=8), "packed for groups of 4 columns, the hardware takes "
                                          "groups of 8 columns"),
    (dict(lanes=4, hidden=4, ffn=4), "was packed for 2 lanes, the hardware takes 4 lanes"),
])
def test_mismatched_hardware(change, message):
    params = ExpertFfnParams(**{**TINY_KWARGS, **change})
    with pytest.raises(MoefpgaError, match=message):
        unpack_expert(_tiny_record(), params)


def test_shared_expert_too_large_for_the_receiver():
    layer, params = _layer("int8-channel-dense")
    shared = pack_layer(layer, 2, params)[-1]
    smaller = ExpertFfnParams(**{**CONFIGS["int8-channel-dense"][1], "ffn": 32})
    with pytest.raises(MoefpgaError, match="the shared expert of layer 2 has ffn size 64, the "
                                           "hardware takes a multiple of 16 and 4 up to 32"):
        unpack_expert(shared, smaller)


@pytest.mark.parametrize("offset, new, receiver, message", [
    (10, b"\x08", dict(hidden=8), "declares 292 payload bytes, its sizes take 328"),
    (20, b"\x00\x00", {}, "expert 3 of layer 1: gate_mult: .*not normalized"),
    (HEADER_BYTES + 256 + 5, b"\x04", {}, "expert 3 of layer 1 has nonzero padding bits"),
])
def test_consistent_crc_but_bad_contents(offset, new, receiver, message):
    params = ExpertFfnParams(**{**TINY_KWARGS, **receiver})
    with pytest.raises(MoefpgaError, match=message):
        unpack_expert(_patched(_tiny_record(), offset, new), params)


# --- what the packer refuses --------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (dict(hidden=64, ffn=64, group_size=32), "hidden size 4 does not fit"),
    (dict(n=1), "expert 3 of layer 1 does not fit the hardware: Weights are not 1:4 sparse"),
    (dict(ffn=2, hidden=2, group_size=2, lanes=2, m=2, n=1), "hidden size 4 does not fit"),
])
def test_pack_refuses_what_does_not_fit(change, message):
    params = ExpertFfnParams(**{**TINY_KWARGS, **change})
    with pytest.raises(MoefpgaError, match=message):
        pack_expert(TINY, layer=1, expert=3, params=params)


def test_pack_refuses_other_misfits():
    layer, params = _layer("int8-channel-dense")
    narrow = ExpertFfnParams(**{**CONFIGS["int8-channel-dense"][1], "weight_bits": 4})
    with pytest.raises(MoefpgaError, match="expert 1 of layer 0 has 8-bit weights, the hardware "
                                           "takes 4-bit"):
        pack_expert(layer.experts[1], layer=0, expert=1, params=narrow)
    with pytest.raises(MoefpgaError, match="layer index 65536 does not fit"):
        pack_expert(TINY, layer=1 << 16, expert=0, params=TINY_PARAMS)
    with pytest.raises(MoefpgaError, match="expert index -1 does not fit"):
        pack_expert(TINY, layer=0, expert=-1, params=TINY_PARAMS)
    coarse = ExpertFfnParams(**{**CONFIGS["int4-g32-2of4"][1], "group_size": 64})
    int4 = _layer("int4-g32-2of4")[0]
    with pytest.raises(MoefpgaError, match="the shared expert of layer 0 does not fit the "
                                           "hardware: Weights with groups of 32 do not fit the "
                                           "engine's group size 64"):
        pack_expert(int4.shared, layer=0, expert=SHARED_EXPERT, params=coarse)
    wide_shift = IntExpert(**{**TINY.__dict__, "down_mult": Multiplier(65535, 128)})
    with pytest.raises(MoefpgaError, match="shift beyond 8 signed bits"):
        pack_expert(wide_shift, layer=0, expert=0, params=TINY_PARAMS)


# --- the worked example of docs/formats.md ------------------------------------------------------


def _documented_record():
    """The hex dump of the worked example in docs/formats.md, section "Packed expert stream"."""
    section = FORMATS_DOC.read_text().split("## Packed expert stream", 1)[1]
    dump = section.split("### Worked example", 1)[1].split("```")[1]
    lines = [line.split(":", 1) for line in dump.strip().splitlines()]
    assert [int(offset, 16) for offset, _ in lines] == list(range(0, 16 * len(lines), 16))
    return bytes.fromhex("".join(hexes for _, hexes in lines))


def test_worked_example():
    record = _tiny_record()
    assert _documented_record() == record
    assert len(record) == 332
    header, silu, beats = unpack_expert(record, TINY_PARAMS)
    assert {k: header[k] for k in ("weight_bits", "layer", "expert", "hidden", "ffn", "m", "n",
                                   "group_size", "lanes", "payload_bytes")} == dict(
        weight_bits=4, layer=1, expert=3, hidden=4, ffn=4, m=4, n=2, group_size=4, lanes=2,
        payload_bytes=292)
    assert header["down_mult"] == Multiplier(65535, -2)
    assert beats[0] == 0x00C900855F83
    assert record[-CRC_BYTES:] == bytes.fromhex("6dc38e91")
