"""Packing of quantized experts into the packed expert stream, and its checked unpacking.

The record format is defined once in :mod:`moefpga.rtl.expert_stream` (docs/formats.md,
"Packed expert stream"); the beats come from :class:`moefpga.rtl.expert_ffn_params.
ExpertFfnParams`, so a record holds exactly what the expert FFN datapath consumes.
"""

import zlib
from typing import NamedTuple

import numpy as np
from amaranth.lib import data

from ..hls_models.errors import MoefpgaError
from ..hls_models.fixedpoint import Multiplier
from ..rtl.expert_ffn_params import SILU_ENTRIES
from ..rtl.expert_stream import (
    CRC_BYTES,
    HEADER_BYTES,
    MAGIC,
    SHARED_EXPERT,
    VERSION,
    Header,
    beat_bytes,
    payload_bytes,
)

__all__ = ["ExpertRecord", "pack_expert", "unpack_expert", "pack_layer"]

_MULTS = ("gate_mult", "up_mult", "hidden_mult", "down_mult")


class ExpertRecord(NamedTuple):
    """An unpacked, verified expert record.

    Members
    -------
    header : dict
        Every :class:`~moefpga.rtl.expert_stream.Header` field as an ``int``, except the four
        multipliers, which are :class:`~moefpga.hls_models.fixedpoint.Multiplier`.
    silu : ndarray of int64, shape (256,)
        The SiLU table, in ``IntExpert.silu_table`` order.
    beats : list of int
        The weight beats, in ``ExpertFfnParams.weight_beats`` order.
    """
    header: dict
    silu:   np.ndarray
    beats:  list


def _name(layer, expert):
    which = "the shared expert" if expert == SHARED_EXPERT else f"expert {expert}"
    return f"{which} of layer {layer}"


def _hardware(params):
    """The header fields fixed by the hardware's parameters."""
    e = params.engine
    return {"weight_bits": e.weight_bits, "m": e.m, "n": e.n, "group_size": e.group_size,
            "lanes": e.lanes}


def pack_expert(int_expert, *, layer, expert, params):
    """The packed record of ``int_expert`` for the datapath of ``params``.

    Parameters
    ----------
    int_expert : IntExpert
        The quantized expert (``hls_models.intmodel``). Mantissas of groups coarser than the
        engine's G (per channel included) are repeated per G, as docs/ffn.md states.
    layer : int
        Layer index, 0 to 65535.
    expert : int
        Expert index, 0 to 65534, or :data:`~moefpga.rtl.expert_stream.SHARED_EXPERT`.
    params : ExpertFfnParams
        The datapath the record is packed for.

    Returns
    -------
    bytes
        Header, payload and CRC-32, as docs/formats.md describes.

    Raises
    ------
    MoefpgaError
        If an index is out of range, or the expert does not fit ``params``: its sizes, weight
        width, sparsity, quantization groups or multipliers.
    """
    if not 0 <= layer <= 0xFFFF:
        raise MoefpgaError(f"layer index {layer} does not fit the header's 16 bits")
    if not 0 <= expert <= SHARED_EXPERT:
        raise MoefpgaError(f"expert index {expert} does not fit the header's 16 bits")
    name = _name(layer, expert)
    ffn, hidden = int_expert.gate.q.shape
    bits = max(qm.bits for qm in (int_expert.gate, int_expert.up, int_expert.down))
    if bits > params.engine.weight_bits:
        raise MoefpgaError(f"{name} has {bits}-bit weights, the hardware takes "
                           f"{params.engine.weight_bits}-bit")
    try:
        params.expert_command(int_expert, tokens=1)     # its checks of the sizes and shifts
        silu = params.silu_beats(int_expert.silu_table)
        beats = params.weight_beats(int_expert)
    except ValueError as error:
        raise MoefpgaError(f"{name} does not fit the hardware: {error}") from None
    size = beat_bytes(params)
    payload = bytes(silu) + b"".join(beat.to_bytes(size, "little") for beat in beats)
    header = Header.const({
        "magic": MAGIC, "version": VERSION, "layer": layer, "expert": expert,
        "hidden": hidden, "ffn": ffn, **_hardware(params),
        **{key: {"mult": getattr(int_expert, key).mult, "shift": getattr(int_expert, key).shift}
           for key in _MULTS},
        "payload_bytes": len(payload),
    }).as_bits().to_bytes(HEADER_BYTES, "little")
    return header + payload + zlib.crc32(header + payload).to_bytes(CRC_BYTES, "little")


def pack_layer(int_layer, layer_index, params):
    """The records of every expert of ``int_layer`` in index order, then its shared expert's.

    Raises
    ------
    MoefpgaError
        As :func:`pack_expert`, for the first expert that does not fit.
    """
    records = [pack_expert(e, layer=layer_index, expert=i, params=params)
               for i, e in enumerate(int_layer.experts)]
    if int_layer.shared is not None:
        records.append(pack_expert(int_layer.shared, layer=layer_index, expert=SHARED_EXPERT,
                                   params=params))
    return records


def _check_hardware(header, params):
    """Raise if the verified ``header`` was packed for other hardware than ``params``."""
    name = _name(header["layer"], header["expert"])
    got, want = header, _hardware(params)
    if (got["m"], got["n"]) != (want["m"], want["n"]):
        raise MoefpgaError(f"{name} was packed for {got['n']}:{got['m']} weights, the hardware "
                           f"takes {want['n']}:{want['m']}")
    for key, what in [("weight_bits", "{}-bit weights"), ("group_size", "groups of {} columns"),
                      ("lanes", "{} lanes")]:
        if got[key] != want[key]:
            raise MoefpgaError(f"{name} was packed for {what.format(got[key])}, the hardware "
                               f"takes {what.format(want[key])}")
    for key, limit in [("hidden", params.hidden), ("ffn", params.ffn)]:
        size = got[key]
        if not (0 < size <= limit and size % params.group_size == 0
                and size % params.lanes == 0):
            raise MoefpgaError(f"{name} has {key} size {size}, the hardware takes a multiple "
                               f"of {params.group_size} and {params.lanes} up to {limit}")
    expected = payload_bytes(params, got["hidden"], got["ffn"])
    if got["payload_bytes"] != expected:
        raise MoefpgaError(f"{name} declares {got['payload_bytes']} payload bytes, its sizes "
                           f"take {expected}")


def unpack_expert(data_bytes, params):
    """The verified contents of a packed record, for the datapath of ``params``.

    Checks, in order: the length holds a header and CRC, the magic, the version, the length
    the header declares, the CRC-32, the header against ``params`` (M:N, weight width, G, P,
    sizes, payload length), the multipliers and the beats' padding bits.

    Parameters
    ----------
    data_bytes : bytes
        One record, exactly.
    params : ExpertFfnParams
        The hardware the record must fit.

    Returns
    -------
    ExpertRecord

    Raises
    ------
    MoefpgaError
        With one line naming the first check that fails.
    """
    data_bytes = bytes(data_bytes)
    least = HEADER_BYTES + CRC_BYTES
    if len(data_bytes) < least:
        raise MoefpgaError(f"expert record of {len(data_bytes)} bytes is truncated: a record "
                           f"has at least {least}")
    view = data.Const(Header, int.from_bytes(data_bytes[:HEADER_BYTES], "little"))
    if view.magic != MAGIC:
        raise MoefpgaError(f"not a packed expert: magic {view.magic:#010x}, expected "
                           f"{MAGIC:#010x}")
    if view.version != VERSION:
        raise MoefpgaError(f"packed expert format version {view.version} is not supported, "
                           f"only {VERSION}")
    declared = least + view.payload_bytes
    if len(data_bytes) != declared:
        state = "truncated" if len(data_bytes) < declared else "too long"
        raise MoefpgaError(f"expert record of {len(data_bytes)} bytes is {state}: its header "
                           f"declares {declared}")
    body, crc = data_bytes[:-CRC_BYTES], int.from_bytes(data_bytes[-CRC_BYTES:], "little")
    if zlib.crc32(body) != crc:
        raise MoefpgaError(f"expert record is corrupted: CRC-32 {zlib.crc32(body):#010x}, the "
                           f"record says {crc:#010x}")
    header = {name: view[name] for name, _ in data.Layout.cast(Header)}
    _check_hardware(header, params)
    for key in _MULTS:
        try:
            header[key] = Multiplier(header[key].mult, header[key].shift)
        except ValueError as error:
            raise MoefpgaError(f"{_name(header['layer'], header['expert'])}: {key}: "
                               f"{error}") from None
    silu = np.frombuffer(body, np.int8, SILU_ENTRIES, HEADER_BYTES).astype(np.int64)
    size, width = beat_bytes(params), data.Layout.cast(params.engine.weight_beat).size
    start = HEADER_BYTES + SILU_ENTRIES
    beats = [int.from_bytes(body[i:i + size], "little") for i in range(start, len(body), size)]
    if any(beat >> width for beat in beats):
        raise MoefpgaError(f"{_name(header['layer'], header['expert'])} has nonzero padding "
                           f"bits in a weight beat")
    return ExpertRecord(header, silu, beats)
