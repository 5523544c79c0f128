"""The packed expert stream: what the host sends per expert, as one definition.

A record is a :class:`Header`, then the payload in the order :class:`.expert_ffn.ExpertFFN`
consumes it (the 256-entry int8 SiLU table, then the weight beats of
:meth:`.expert_ffn_params.ExpertFfnParams.weight_beats`, each serialized to whole bytes), then a
CRC-32 (zlib's) over header and payload. Every field and byte is described in docs/formats.md,
section "Packed expert stream"; the host packer (:mod:`moefpga.host.pack`), its tests and the
expert loader read the layout from here.
"""

from amaranth.hdl import Shape, unsigned
from amaranth.lib import data

from .expert_ffn_params import SILU_ENTRIES
from .requant import Multiplier

__all__ = [
    "MAGIC", "VERSION", "SHARED_EXPERT", "Header", "HEADER_BYTES", "CRC_BYTES", "CRC_RESIDUE",
    "beat_bytes", "weight_beat_count", "payload_bytes",
]

#: The first four bytes of every record, ``4D 6F 45 58`` ("MoEX").
MAGIC = int.from_bytes(b"MoEX", "little")
#: The format version this module describes.
VERSION = 1
#: The expert index of a layer's shared expert.
SHARED_EXPERT = 0xFFFF
#: Bytes of the CRC-32 that ends a record (little-endian).
CRC_BYTES = 4
#: ``zlib.crc32`` of a whole record, CRC included: a receiver that runs its CRC over every byte
#: of a record can check this constant instead of comparing the last four bytes.
CRC_RESIDUE = 0x2144DF1C


class Header(data.Struct):
    """The header of a packed expert record; serialized little-endian, field ``magic`` first.

    Every field starts on a byte boundary. The shape fields say which engine the payload is
    packed for; a receiver compares them with its own parameters.

    Members
    -------
    magic : unsigned(32)
        :data:`MAGIC`.
    version : unsigned(8)
        :data:`VERSION`.
    weight_bits : unsigned(8)
        Width of the weights in the beats, 8 or 4.
    layer : unsigned(16)
        Layer index.
    expert : unsigned(16)
        Expert index in the layer; :data:`SHARED_EXPERT` for the shared expert.
    hidden : unsigned(16)
        The expert's hidden size d.
    ffn : unsigned(16)
        The expert's FFN size f.
    m, n : unsigned(8)
        The engine's M:N pattern (``n == m`` for a dense engine).
    group_size : unsigned(16)
        The engine's quantization group G (mantissas in the beats are per G columns).
    lanes : unsigned(16)
        The engine's lane count P.
    gate_mult, up_mult, hidden_mult, down_mult : Multiplier
        The expert's requantization multipliers (16-bit ``mult``, then signed 8-bit ``shift``).
    payload_bytes : unsigned(32)
        Bytes between the header and the CRC, :func:`payload_bytes` of the shape.
    """
    magic:         unsigned(32)
    version:       unsigned(8)
    weight_bits:   unsigned(8)
    layer:         unsigned(16)
    expert:        unsigned(16)
    hidden:        unsigned(16)
    ffn:           unsigned(16)
    m:             unsigned(8)
    n:             unsigned(8)
    group_size:    unsigned(16)
    lanes:         unsigned(16)
    gate_mult:     Multiplier
    up_mult:       Multiplier
    hidden_mult:   Multiplier
    down_mult:     Multiplier
    payload_bytes: unsigned(32)


#: Bytes of a serialized :class:`Header`.
HEADER_BYTES = Shape.cast(Header).width // 8


def beat_bytes(params):
    """Bytes of one serialized weight beat of ``params`` (an ``ExpertFfnParams``): the beat's
    bits, little-endian, padded with zero bits to a whole byte."""
    return -(-Shape.cast(params.engine.weight_beat).width // 8)


def weight_beat_count(params, hidden, ffn):
    """Weight beats of an expert of sizes ``hidden`` x ``ffn``: ``3 d f / (P M)``."""
    return 3 * hidden * ffn // (params.lanes * params.m)


def payload_bytes(params, hidden, ffn):
    """Payload bytes of an expert of sizes ``hidden`` x ``ffn``: the SiLU table and the beats."""
    return SILU_ENTRIES + weight_beat_count(params, hidden, ffn) * beat_bytes(params)
