"""The simulation backend: one MoE layer on the Verilated MoE layer top (``rtl/moe_layer.py``).

:func:`hardware_for` sizes a :class:`~moefpga.rtl.moe_layer.MoeLayer` for a checkpoint layer and
a :class:`~moefpga.hls_models.calibrate.QuantSpec`; :func:`build` turns it into a Verilator
executable with the driver ``sim_moe_layer.cpp`` (cached, :mod:`.sim_build`); :func:`run_layer`
streams the router weights, the tokens in batches of at most ``max_tokens`` and the expert
records the layer asks for through it and returns the int32 outputs with the counters.
docs/sim_backend.md describes the choices and what is printed.
"""

import math
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from amaranth.back import verilog
from amaranth.lib import data

from ..hls_models.errors import MoefpgaError
from ..rtl.expert_ffn_params import SILU_ENTRIES, ExpertFfnParams
from ..rtl.expert_stream import CRC_BYTES, HEADER_BYTES, SHARED_EXPERT, payload_bytes
from ..rtl.moe_layer import MoeLayer, RequestBeat
from ..rtl.requant import Multiplier
from .pack import pack_layer
from .sim_build import build_executable
from .sim_options import SimOptions

__all__ = ["SimOptions", "SimResult", "hardware_for", "build", "run_layer", "format_counters",
           "TOP", "DENSE_M", "MAX_TOKENS_LIMIT", "MAX_EXPERTS", "SLOT_BYTES_LIMIT"]

#: Verilog module name of the layer top (the driver includes ``V<TOP>.h``).
TOP = "moe_layer"
#: M of the engine for dense weights (M = N: M weights per lane a cycle, as a 2:4 engine).
DENSE_M = 4
#: Largest batch the simulated top may be built for (picks and weights are registers).
MAX_TOKENS_LIMIT = 64
#: Most routed experts (the router's limit).
MAX_EXPERTS = 256
#: Largest packed record (one expert) a simulated slot may hold.
SLOT_BYTES_LIMIT = 16 << 20
_DRIVER = Path(__file__).with_name("sim_moe_layer.cpp")


@dataclass(frozen=True)
class SimResult:
    """What :func:`run_layer` returns.

    Members
    -------
    outputs : ndarray of int64, shape (tokens, hidden)
        The layer's int32 outputs, equal to ``intmodel.moe_layer``.
    counters : dict of str to int
        The top's counters over all batches (end minus start), by name.
    batches : int
    """
    outputs:  np.ndarray
    counters: dict
    batches:  int


def _widths(weights):
    """The layer's hidden size and the FFN sizes of its routed and shared experts."""
    widths = [weights.experts[0].down.shape[1]]
    if weights.shared is not None:
        widths.append(weights.shared.down.shape[1])
    return weights.router.shape[1], widths


def hardware_for(weights, spec, *, num_layers, options=None):
    """The :class:`MoeLayer` that runs ``weights`` quantized by ``spec``.

    Engine: ``options.lanes`` lanes; the spec's N:M pattern, or M = N = :data:`DENSE_M` for
    dense weights; the spec's weight width and accumulator width; group size G the spec's, or
    for one scale per output channel the greatest common divisor of the hidden and FFN sizes
    (a per-channel mantissa is repeated per G). Sizes: ``hidden`` the layer's, ``ffn`` the
    largest of the routed and shared experts'. ``layers=num_layers``, so one build serves every
    layer of the checkpoint. ``options`` (:class:`SimOptions`, default its defaults) gives the
    rest.

    Raises
    ------
    MoefpgaError
        If the shapes do not fit such hardware (one line naming the dimension and the rule).
    """
    options = options or SimOptions()
    hidden, ffns = _widths(weights)
    m, n = (DENSE_M, DENSE_M) if spec.sparsity.is_dense else (spec.sparsity.m,
                                                               spec.sparsity.n)
    group = spec.group_size or math.gcd(hidden, *ffns)
    lanes, tokens = options.lanes, options.max_tokens
    rows = len(weights.experts) + (weights.shared_gate is not None)
    if not 1 <= tokens <= MAX_TOKENS_LIMIT:
        raise MoefpgaError(f"--max-tokens {tokens} is out of range: the simulated layer takes "
                           f"1 to {MAX_TOKENS_LIMIT} tokens a batch")
    if not 2 <= len(weights.experts) <= MAX_EXPERTS:
        raise MoefpgaError(f"the layer has {len(weights.experts)} experts; the simulated "
                           f"router takes 2 to {MAX_EXPERTS}")
    for name, size in [("hidden size", hidden), *(("expert ffn size", f) for f in ffns)]:
        for what, q in [(f"{lanes} lanes (see --lanes)", lanes), (f"M = {m}", m),
                        (f"group size {group}", group)]:
            if size % q:
                raise MoefpgaError(f"{name} {size} does not fit the simulated hardware: it is "
                                   f"not a multiple of {what}")
    try:
        params = ExpertFfnParams(lanes=lanes, m=m, n=n, weight_bits=spec.bits, group_size=group,
                                 max_tokens=tokens, hidden=hidden, ffn=max(ffns),
                                 acc_bits=spec.acc_bits)
    except (TypeError, ValueError) as error:
        raise MoefpgaError(f"the layer does not fit the simulated hardware: {error}") from None
    record = HEADER_BYTES + payload_bytes(params, hidden, max(ffns)) + CRC_BYTES
    if record > SLOT_BYTES_LIMIT:
        raise MoefpgaError(f"an expert record of {record} bytes is larger than a simulated slot "
                           f"holds ({SLOT_BYTES_LIMIT} bytes)")
    try:
        return MoeLayer(params, hidden=hidden, experts=len(weights.experts),
                        top_k=weights.top_k, slots=options.slots,
                        shared=weights.shared is not None,
                        shared_gate=weights.shared_gate is not None, layers=num_layers,
                        macs=min(options.router_macs, rows))
    except (TypeError, ValueError) as error:
        raise MoefpgaError(f"the layer does not fit the simulated hardware: {error}") from None


def build(hw, progress=None):
    """The Verilator executable of ``hw`` (a :class:`MoeLayer`), built unless cached."""
    if progress:
        progress("generating the Verilog of the MoE layer top...")
    text = verilog.convert(hw, name=TOP, emit_src=False)
    members = hw.signature.members
    defines = [name for name, port in [("HAS_GATE_MULT", "gate_mult"),
                                       ("HAS_LOAD_TIMEOUT", "load_timeout")] if port in members]
    return build_executable(text, TOP, {_DRIVER.name: _DRIVER.read_text()}, defines=defines,
                            progress=progress)


def _multiplier_bits(model):
    return Multiplier.const({"mult": model.mult, "shift": model.shift}).as_bits()


def _token_bytes(x16, exp):
    """The ``s_tokens`` beats of tokens ``x16`` with exponents ``exp`` (docs/moe_layer.md)."""
    beats = np.empty((*x16.shape, 3), np.uint8)
    beats[..., :2] = np.asarray(x16, "<i2")[..., None].view(np.uint8)
    beats[..., 2] = np.asarray(exp, np.int8).view(np.uint8)[:, None]
    return beats.tobytes()


def _request_word(layer, expert):
    return RequestBeat.const({"layer": layer, "expert": expert}).as_bits()


def _cycle_budget(hw, records):
    """A generous bound on one batch's cycles: ten times loading every record once (a byte a
    cycle), running every expert on a full batch (``3 d f T / (P M)`` engine beats plus the
    SiLU table and the hidden activations) and routing it; a batch beyond it counts as hung."""
    p = hw.params
    t, d, f = p.max_tokens, p.hidden, p.ffn
    expert = 3 * d * f * t // (p.lanes * p.m) + SILU_ENTRIES + t * (d + f)
    route = t * d * (math.ceil((hw.experts + hw.shared_gate) / hw.macs) + 1)
    return 10 * (sum(len(r) for r in records) + (hw.experts + 1) * expert + route) + 100_000


def _write_job(folder, hw, int_layer, layer, records, budget, batches, x16, exp):
    """The driver's input files (see ``sim_moe_layer.cpp``) in ``folder``."""
    expert_ids = [*range(len(int_layer.experts)), SHARED_EXPERT][:len(records)]
    lines = [f"hidden {hw.hidden}", f"router_mult {_multiplier_bits(int_layer.router_mult)}",
             f"normalize {int(int_layer.normalize)}", f"layer {layer}",
             f"max_cycles {budget}"]
    if hw.shared_gate:
        lines.append(f"gate_mult {_multiplier_bits(int_layer.shared_gate_mult)}")
    lines += [f"batch {len(b)}" for b in batches]
    offset = 0
    for expert, record in zip(expert_ids, records, strict=True):
        lines.append(f"record {_request_word(layer, expert)} {offset} {len(record)}")
        offset += len(record)
    (folder / "job.txt").write_text("\n".join(lines) + "\n")
    rows = [int_layer.router] + ([int_layer.shared_gate[None]] if hw.shared_gate else [])
    (folder / "router.bin").write_bytes(np.concatenate(rows).astype("<i2").tobytes())
    (folder / "tokens.bin").write_bytes(_token_bytes(x16, exp))
    (folder / "records.bin").write_bytes(b"".join(records))


def _counters(hw, words):
    """The counters by name from the ``counters`` port's 32-bit words (from bit 0)."""
    value = sum(int(w) << (32 * i) for i, w in enumerate(words))
    view = data.Const(hw.counters_layout, value & ((1 << hw.counters_layout.size) - 1))
    return {name: int(view[name]) for name, _ in hw.counters_layout}


def run_layer(executable, hw, int_layer, layer, x16, exp, progress=None, timeout=None):
    """Run tokens ``x16`` (int16, with exponents ``exp``) through layer ``layer`` of the
    simulated top ``hw`` built as ``executable``.

    Tokens go in batches of at most ``hw.params.max_tokens``; every expert request is answered
    with the record ``host.pack.pack_layer`` gives. ``progress`` gets a line per batch.
    ``timeout`` (seconds, default from the cycle budget at 2000 cycles/s) bounds the run.

    Raises
    ------
    MoefpgaError
        A record does not fit the hardware, the simulation stops with an error (a batch that
        does not finish within its cycle budget included), flags a batch malformed, or runs
        beyond ``timeout``.
    """
    progress = progress or (lambda line: None)
    records = pack_layer(int_layer, layer, hw.params)
    t_max = hw.params.max_tokens
    batches = [range(i, min(i + t_max, len(x16))) for i in range(0, len(x16), t_max)]
    budget = _cycle_budget(hw, records)
    timeout = timeout or 60 + budget * (len(batches) + 1) / 2000
    with tempfile.TemporaryDirectory(prefix="moefpga-sim-") as folder:
        folder = Path(folder)
        _write_job(folder, hw, int_layer, layer, records, budget, batches, x16, exp)
        lines = _run_driver(executable, folder, timeout, len(batches), progress)
        results = np.fromfile(folder / "results.bin", "<i4").astype(np.int64)
    start = _counters(hw, lines[0].split("counters")[1].split())
    end = _counters(hw, lines[-1].split("counters")[1].split())
    for index, line in enumerate(lines[1:]):
        fields = line.split()
        if fields[fields.index("tuser") + 1] != "0":
            raise MoefpgaError(f"the simulated layer flagged batch {index} as malformed")
    if results.size != x16.size:
        raise MoefpgaError(f"the simulated layer returned {results.size} values for "
                           f"{x16.size}")
    counters = {name: (end[name] - start[name]) % (1 << 32) for name in end}
    return SimResult(results.reshape(x16.shape), counters, len(batches))


def _run_driver(executable, folder, timeout, batches, progress):
    """The driver's output lines (``loaded ...`` then one per batch), with progress."""
    process = subprocess.Popen([str(executable), str(folder)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    start, lines = time.monotonic(), []
    try:
        for line in process.stdout:
            lines.append(line.strip())
            if line.startswith("batch"):
                cycle = int(line.split()[3])
                rate = cycle / max(time.monotonic() - start, 1e-3)
                progress(f"  batch {len(lines) - 1}/{batches} done: {cycle} cycles simulated "
                         f"({rate:,.0f} cycles/s)")
        error = process.stderr.read()
        process.wait()
    finally:
        timer.cancel()
        process.kill()
    if process.returncode != 0:
        message = error.strip().removeprefix("error: ").splitlines()
        reason = (message[-1] if message
                  else f"stopped after {timeout:.0f} s" if process.returncode < 0
                  else f"exit status {process.returncode}")
        raise MoefpgaError(f"the simulation failed: {reason}")
    if len(lines) != batches + 1:
        raise MoefpgaError(f"the simulation ended after {len(lines) - 1} of {batches} batches")
    return lines


def format_counters(counters, tokens):
    """Two lines: every counter by name, then the cycle counts and the loads and hits per token
    with ``compute`` and ``stall`` as shares of the cycles."""
    cycles = max(counters.get("cycles", 0), 1)
    per_token = [f"{name} {counters[name] / tokens:.{0 if name in _CYCLES else 2}f}"
                 + (f" ({counters[name] / cycles:.1%} of cycles)" if name in _CYCLES[1:] else "")
                 for name in (*_CYCLES, "loads", "hits") if name in counters]
    return ("counters: " + ", ".join(f"{name} {value}" for name, value in counters.items())
            + "\nper token: " + ", ".join(per_token))


_CYCLES = ("cycles", "compute", "stall")
