"""``moefpga bench``: the design measured on the Verilator simulation of the MoE layer top.

Per configuration (a quantization setting and the hardware choices of :class:`SimOptions`),
every MoE layer of a checkpoint runs on the simulated top (:mod:`.sim`): a prefill of
``prefill_tokens`` tokens (in batches of T_max) and ``decode_tokens`` single-token decode steps,
each on empty slots. The top's counters give cycles, compute and stall cycles, loads, hits and
multiplies; everything else in ``results.json`` is computed from them and from facts stated
next to it (a board's clock, the link's baud rate, the bytes ``host.link`` puts on the wire),
and ``definitions`` in the file says how. docs/results.md shows a run.
"""

import gc
import importlib
import json
import math
import os
import re
import subprocess
import time
import warnings
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..hls_models import intmodel
from ..hls_models.calibrate import QuantSpec, calibration_tokens, quantize_layer
from ..hls_models.checkpoint import Checkpoint
from ..hls_models.errors import MoefpgaError
from ..hls_models.quant import quantize_activations
from ..hls_models.sparsity import DENSE, Sparsity
from ..hls_models.synthetic import ensure_default_model
from .cli import _progress, default_calibration
from .link import MAX_PAYLOAD, Frame, Type, encode_frame
from .sim_options import SimOptions

__all__ = ["BenchConfig", "configurations", "board_config", "run_bench", "format_table",
           "write_plots", "add_commands", "BOARDS", "LINK_BITS_PER_BYTE", "DEVICE_DSPS"]

#: The boards with a configuration of their own in the bench.
BOARDS = ("icebreaker", "ulx3s-85f")
#: Bits on the UART per byte: 8N1 (a start bit, 8 data bits, a stop bit).
LINK_BITS_PER_BYTE = 10
#: Hard multipliers per device (vendor data sheets): iCE40 UP5K 8 SB_MAC16, ECP5-85F 156
#: MULT18X18D. A report.json from ``make bitstream`` takes precedence.
DEVICE_DSPS = {"iCE40UP5K": 8, "LFE5U-85F": 156}
#: Predictors compared on the host's mirror of the slots (host/cache_sim.py).
CACHE_PREDICTORS = ("none", "gate", "history")


@dataclass(frozen=True)
class BenchConfig:
    """One configuration the bench runs.

    Members
    -------
    name : str
        Its name in the results (``dense``, ``2:4``, ``1:4``, ``dense-1slot`` or a board's).
    spec : QuantSpec
        How the layers are quantized and pruned.
    options : SimOptions
        Lanes, largest batch, slots and router MACs of the simulated top.
    board : str or None
        The board whose parameters these are (its clock and link then give tokens per second).
    """
    name: str
    spec: QuantSpec
    options: SimOptions
    board: str | None = None


def _load_board(name):
    """``boards.config.load_board`` (it needs the simulation extras), errors as one line."""
    try:
        from ..boards.config import BoardError, load_board
    except ImportError as exc:
        raise MoefpgaError(f"the bench needs the simulation extras ({exc}); install them: "
                           "pip install 'moefpga[bench]'") from None
    try:
        return load_board(name)
    except BoardError as exc:
        raise MoefpgaError(str(exc)) from None


def board_config(name):
    """The :class:`BenchConfig` of board ``name``: its YAML file's accelerator parameters."""
    b = _load_board(name)
    sparsity = DENSE if b.m == b.n else Sparsity(m=b.m, n=b.n)
    spec = QuantSpec(bits=b.weight_bits, group_size=b.group_size, sparsity=sparsity,
                     acc_bits=b.acc_bits)
    options = SimOptions(lanes=b.lanes, max_tokens=b.max_tokens, slots=b.slots,
                         router_macs=b.router_macs)
    return BenchConfig(name, spec, options, board=name)


def configurations():
    """Every configuration: int8 per-channel dense, 2:4 and 1:4 on the sim backend's default
    hardware (two slots), dense with one slot, and one per board in :data:`BOARDS`."""
    default = SimOptions()
    return [BenchConfig("dense", QuantSpec(), default),
            BenchConfig("2:4", QuantSpec(sparsity=Sparsity(m=4, n=2)), default),
            BenchConfig("1:4", QuantSpec(sparsity=Sparsity(m=4, n=1)), default),
            BenchConfig("dense-1slot", QuantSpec(), SimOptions(slots=1)),
            *(board_config(name) for name in BOARDS)]


# ----------------------------------------------------------------------------------------------
# The link: bytes on the wire, computed with host.link's own frame encoder

def wire_bytes(kind, payload):
    """``(bytes, frames)`` of message ``kind`` with ``payload`` on the wire: frames of at most
    ``MAX_PAYLOAD`` bytes, each ``00 | COBS(frame) | 00`` (``host.link.encode_frame``)."""
    chunks = [payload[i:i + MAX_PAYLOAD] for i in range(0, len(payload), MAX_PAYLOAD)] or [b""]
    sizes = [len(encode_frame(Frame(kind, 1, chunk, more=i + 1 < len(chunks))))
             for i, chunk in enumerate(chunks)]
    return sum(sizes), len(sizes)


_ACK_BYTES = len(encode_frame(Frame(Type.ACK, 1, b"")))


@dataclass
class _Wire:
    """Bytes each way on the link for some messages, with the ACK of every data frame counted
    in the other direction."""
    to_device: int = 0
    to_host: int = 0

    def send(self, kind, payload, count=1):
        size, frames = wire_bytes(kind, payload)
        self.to_device += count * size
        self.to_host += count * frames * _ACK_BYTES

    def receive(self, kind, payload, count=1):
        size, frames = wire_bytes(kind, payload)
        self.to_host += count * size
        self.to_device += count * frames * _ACK_BYTES


def link_traffic(int_layer, layer, x16, exp, outputs, t_max, loads, record_wire):
    """:class:`_Wire` of one run of ``layer``: its ROUTER message once, a RUN_TOKENS message
    and a RESULTS message (flags byte and int32 outputs) per batch of at most ``t_max``
    tokens, and per load a REQUEST and a LOAD_EXPERT of ``record_wire`` bytes on the wire."""
    from .accelerator import router_message, token_message  # needs the simulation extras
    wire = _Wire()
    wire.send(Type.ROUTER, router_message(int_layer, layer))
    for start in range(0, len(x16), t_max):
        batch = slice(start, start + t_max)
        wire.send(Type.RUN_TOKENS, token_message(x16[batch], exp[batch]))
        wire.receive(Type.RESULTS, b"\0" + np.asarray(outputs[batch], "<i4").tobytes())
    wire.receive(Type.REQUEST, bytes(4), count=loads)
    wire.to_device += loads * record_wire
    wire.to_host += loads * math.ceil(record_wire / MAX_PAYLOAD) * _ACK_BYTES
    return wire


# ----------------------------------------------------------------------------------------------
# Running the simulated top

_RATE = re.compile(r"(\d+) cycles simulated \(([\d,]+) cycles/s\)")


class _SpeedLog:
    """A progress callback that passes lines on and keeps the simulation speed ``run_layer``
    reports in its last batch line: simulated cycles and seconds of the driver process."""

    def __init__(self, progress):
        self.progress, self.cycles, self.seconds = progress, 0, 0.0
        self._last = None

    def __call__(self, line):
        if self.progress:
            self.progress(line)
        found = _RATE.search(line)
        if found:
            self._last = int(found[1]), int(found[2].replace(",", ""))

    def close_run(self):
        if self._last:
            cycles, rate = self._last
            self.cycles += cycles
            self.seconds += cycles / max(rate, 1)
        self._last = None


_COUNTERS = ("cycles", "compute", "stall", "loads", "hits", "evictions", "multiplies")


def _run(sim, executable, hw, int_layer, layer, x16, exp, speed):
    """One ``run_layer`` on empty slots; its counters (:data:`_COUNTERS`), tokens, batches and
    outputs. A run whose outputs differ from ``intmodel.moe_layer`` is an error: nothing is
    measured on a design that computes wrong answers."""
    result = sim.run_layer(executable, hw, int_layer, layer, x16, exp, speed)
    speed.close_run()
    for name in ("rejected", "malformed", "timeouts"):
        if result.counters.get(name):
            raise MoefpgaError(f"the simulated layer counted {result.counters[name]} {name}")
    if not np.array_equal(result.outputs, intmodel.moe_layer(x16, exp, int_layer)):
        raise MoefpgaError(f"the simulated layer {layer}'s outputs differ from the integer "
                           "model's: the design is broken, nothing measured")
    out = {name: result.counters[name] for name in _COUNTERS}
    return dict(out, tokens=len(x16), batches=result.batches), result.outputs


def _add(total, part):
    for key, value in part.items():
        total[key] = total.get(key, 0) + value
    return total


def measure_layer(sim, executable, hw, int_layer, layer, x, decode_tokens, speed, progress):
    """The prefill (all of ``x``) and decode (its first ``decode_tokens`` tokens, one run each)
    counters of ``layer``, each with the link's bytes (:func:`link_traffic`) and the records
    streamed."""
    from .pack import pack_layer
    records = pack_layer(int_layer, layer, hw.params)
    wires = [wire_bytes(Type.LOAD_EXPERT, r)[0] for r in records]
    xq, exp = quantize_activations(x)
    t_max = hw.params.max_tokens

    def measured(rows, show):
        counts, outputs = _run(sim, executable, hw, int_layer, layer, xq[rows], exp[rows],
                               speed if show else _SpeedLog(None))
        wire = link_traffic(int_layer, layer, xq[rows], exp[rows], outputs, t_max,
                            counts["loads"], sum(wires) / len(wires))
        return dict(counts, link_to_device=wire.to_device, link_to_host=wire.to_host)

    progress(f"  layer {layer}: prefill, {len(x)} tokens in batches of at most {t_max}")
    prefill = measured(slice(None), True)
    decode = {}
    for i in range(decode_tokens):
        progress(f"  layer {layer}: decode token {i + 1}/{decode_tokens}")
        _add(decode, measured(slice(i, i + 1), False))
    return {"layer": layer, "prefill": prefill, "decode": decode,
            "record_bytes": {"routed": len(records[0]),
                             "shared": len(records[-1]) if int_layer.shared else None},
            "record_wire_bytes": [min(wires), max(wires)]}


def _phase_summary(per_layer, phase, multipliers, m_over_n):
    """A phase's counters summed over the layers, with the quantities computed from them."""
    total = {}
    for entry in per_layer:
        _add(total, entry[phase])
    layers, tokens = len(per_layer), per_layer[0][phase]["tokens"]
    cycles = total["cycles"]
    uniform = all(e["record_bytes"]["shared"] in (None, e["record_bytes"]["routed"])
                  for e in per_layer)
    streamed = (sum(e[phase]["loads"] * e["record_bytes"]["routed"] for e in per_layer)
                if uniform else None)
    return {
        "tokens": tokens, "layers": layers, **{k: total[k] for k in _COUNTERS},
        "cycles_per_token_per_layer": cycles / (tokens * layers),
        "cycles_per_token": cycles / tokens,
        "compute_fraction": total["compute"] / cycles,
        "stall_fraction": total["stall"] / cycles,
        "utilization": total["multiplies"] / (cycles * multipliers),
        "dense_equivalent_macs_per_cycle": total["multiplies"] * m_over_n / cycles,
        "multiplies_per_token": total["multiplies"] / tokens,
        "record_bytes_per_token": None if streamed is None else streamed / tokens,
        "link_bytes_per_token": {"to_device": total["link_to_device"] / tokens,
                                 "to_host": total["link_to_host"] / tokens},
    }


def board_clock(board, build_root=Path("build")):
    """``(MHz, source)``: the Fmax in ``build/<board>/report.json`` when that report is of a
    board top that met timing (a bitstream was written), else the board's ``target_mhz``. A
    report of a survey unit (``make bitstream UNIT=...``) or of a failed build is not the
    board's clock."""
    report = Path(build_root) / board / "report.json"
    try:
        built = json.loads(report.read_text())
        if built["core"] == "board_top" and built["timing_met"]:
            return float(built["fmax_mhz"]), f"Fmax in {report}"
    except (ValueError, KeyError, TypeError, OSError):
        pass
    return (float(_load_board(board).target_mhz),
            "target_mhz (no report.json of a board top that met timing, from make bitstream)")


def board_dsps(board, build_root=Path("build")):
    """``(multipliers, source)`` of the board's device: report.json's DSP count when present,
    else :data:`DEVICE_DSPS` by the platform's device, else ``(None, reason)``."""
    report = Path(build_root) / board / "report.json"
    if report.is_file():
        try:
            return int(json.loads(report.read_text())["resources"]["dsp"]["available"]), \
                f"{report}"
        except (ValueError, KeyError, OSError):
            pass
    module, name = _load_board(board).platform.split(":")
    try:
        device = getattr(importlib.import_module(module), name).device
    except (ImportError, AttributeError):
        return None, f"platform {module}:{name} not installed"
    if device not in DEVICE_DSPS:
        return None, f"device {device} not in host.bench.DEVICE_DSPS"
    return DEVICE_DSPS[device], f"{device} data sheet"


def board_rates(config, summary, multipliers):
    """Tokens per second of ``config`` on its board, per phase: limited by the clock (measured
    cycles of every MoE layer, loads at a byte a cycle), by the link (its busier direction at
    baud / 10 bytes a second) and the smaller of the two; with the peaks of the roofline."""
    board = _load_board(config.board)
    mhz, clock_source = board_clock(config.board)
    dsps, dsp_source = board_dsps(config.board)
    link_bps = board.baud / LINK_BITS_PER_BYTE
    out = {"clock_mhz": mhz, "clock_source": clock_source, "baud": board.baud,
           "link_bytes_per_s": link_bps, "device_multipliers": dsps,
           "device_multipliers_source": dsp_source,
           "engine_peak_multiplies_per_s": multipliers * mhz * 1e6,
           "device_peak_multiplies_per_s": None if dsps is None else dsps * mhz * 1e6}
    for phase, s in summary.items():
        link_bytes = max(s["link_bytes_per_token"].values())
        clock_limited = mhz * 1e6 / s["cycles_per_token"]
        link_limited = link_bps / link_bytes
        out[phase] = {"clock_limited_tokens_per_s": clock_limited,
                      "link_limited_tokens_per_s": link_limited,
                      "tokens_per_s": min(clock_limited, link_limited),
                      "multiplies_per_link_byte": s["multiplies_per_token"] / link_bytes}
    return out


# ----------------------------------------------------------------------------------------------
# Cache hit rate and prediction accuracy (the host's mirror of the slots)

def cache_rows(checkpoint, spec, slots, tokens, record_bytes, progress, traces):
    """Hit rate, prediction accuracy and bytes streamed per token with each predictor of
    :data:`CACHE_PREDICTORS` (LRU), replayed on the model's routing of ``tokens`` decode steps
    (``host.cache_sim``); ``record_bytes(layer, expert)`` the config's record sizes. The
    routing trace of a setting is kept in ``traces`` (by setting) for the next call."""
    from amaranth.hdl import UnusedElaboratable

    from .cache_sim import record_trace, replay
    key = str(spec)
    if key not in traces:
        with warnings.catch_warnings():
            # record_trace sizes records with sim.hardware_for's MoeLayer, never elaborated
            warnings.simplefilter("ignore", UnusedElaboratable)
            traces[key] = record_trace(checkpoint, spec, tokens, progress=progress)
            gc.collect()
    trace = replace(traces[key], record_bytes=record_bytes)
    rows = []
    for predictor in CACHE_PREDICTORS:
        r = replay(trace, slots=slots, policy="lru", predictor=predictor)
        rows.append({"predictor": predictor, "policy": "lru", "slots": slots,
                     "tokens": r.tokens, "hit_rate": r.stats.hit_rate,
                     "routed_hit_rate": r.stats.routed_hit_rate,
                     "prediction_accuracy": r.accuracy,
                     "demand_loads": r.stats.demand_loads, "prefetches": r.stats.prefetches,
                     "bytes_streamed_per_token": r.stats.bytes_streamed / r.tokens})
    return rows


# ----------------------------------------------------------------------------------------------
# The tools: Amaranth's simulator on the same top, and the host's packing speed

def amaranth_speed(hw, int_layer, layer, x16, exp, records, cycles):
    """Simulated cycles per second of ``hw`` in Amaranth's Python simulator, driven as the
    Verilator driver drives it (router weights, then the tokens, every request answered with
    its record), for ``cycles`` cycles from reset. Returns the cycles and seconds of the timed
    part (all but the first :data:`_AMARANTH_WARMUP` cycles) and the seconds until then
    (building the simulator and compiling the design)."""
    from amaranth.sim import Simulator

    from ..rtl.expert_stream import SHARED_EXPERT
    from ..rtl.moe_layer import RequestBeat
    from ..rtl.requant import Multiplier

    rows = [int_layer.router] + ([int_layer.shared_gate[None]] if hw.shared_gate else [])
    router = [int(v) & 0xFFFF for v in np.concatenate(rows).ravel()]
    tokens = [(int(v) & 0xFFFF) | ((int(e) & 0xFF) << 16) for row, e in zip(x16, exp,
                                                                            strict=True)
              for v in row]
    ids = [*range(len(int_layer.experts)), SHARED_EXPERT]
    by_request = {RequestBeat.const({"layer": layer, "expert": e}).as_bits(): r
                  for e, r in zip(ids, records, strict=False)}

    def mult(model):
        return Multiplier.const({"mult": model.mult, "shift": model.shift}).as_bits()

    async def drive(ctx):
        ctx.set(hw.router_mult.as_value(), mult(int_layer.router_mult))
        if hw.shared_gate:
            ctx.set(hw.gate_mult.as_value(), mult(int_layer.shared_gate_mult))
        ctx.set(hw.normalize, int(int_layer.normalize))
        ctx.set(hw.layer, layer)
        ctx.set(hw.m_request.tready, 1)
        ctx.set(hw.m_result.tready, 1)
        queue, sent_router, sent = deque(), 0, 0
        for _ in range(cycles):
            routing = sent_router < len(router)
            ctx.set(hw.s_router.tvalid, routing)
            ctx.set(hw.s_router.tdata, router[sent_router] if routing else 0)
            sending = not routing and sent < len(tokens)
            ctx.set(hw.s_tokens.tvalid, sending)
            ctx.set(hw.s_tokens.tdata, tokens[sent] if sending else 0)
            ctx.set(hw.s_tokens.tlast, sending and sent + 1 == len(tokens))
            ctx.set(hw.s_expert.tvalid, bool(queue))
            ctx.set(hw.s_expert.tdata, queue[0][0] if queue else 0)
            ctx.set(hw.s_expert.tlast, bool(queue) and queue[0][1])
            fires = (routing and ctx.get(hw.s_router.tready),
                     sending and ctx.get(hw.s_tokens.tready),
                     bool(queue) and ctx.get(hw.s_expert.tready))
            if ctx.get(hw.m_request.tvalid):
                record = by_request[ctx.get(hw.m_request.tdata)]
                queue.extend((byte, i + 1 == len(record)) for i, byte in enumerate(record))
            await ctx.tick()
            sent_router += fires[0]
            sent += fires[1]
            if fires[2]:
                queue.popleft()

    start = time.monotonic()
    simulator = Simulator(hw)
    simulator.add_clock(1e-6)
    simulator.add_testbench(drive)
    simulator.run_until(_AMARANTH_WARMUP * 1e-6)      # compiles the design on the way
    compiled = time.monotonic() - start
    start = time.monotonic()
    simulator.run()
    return {"cycles": cycles - _AMARANTH_WARMUP, "seconds": time.monotonic() - start,
            "warmup_cycles": _AMARANTH_WARMUP, "compile_seconds": compiled}


#: Cycles of the Amaranth run before the timed part (their time includes compiling the design).
_AMARANTH_WARMUP = 10


def packing_speed(int_layer, layer, params, repeat):
    """Host packing throughput: bytes of packed records per second of ``pack_layer`` over
    ``repeat`` packings of ``int_layer`` (the best of them)."""
    from .pack import pack_layer
    best, size = math.inf, 0
    for _ in range(repeat):
        start = time.perf_counter()
        size = sum(len(r) for r in pack_layer(int_layer, layer, params))
        best = min(best, time.perf_counter() - start)
    return {"bytes": size, "seconds": best, "mb_per_s": size / best / 1e6}


# ----------------------------------------------------------------------------------------------
# The whole bench

#: What each computed quantity in results.json is (written into the file).
DEFINITIONS = {
    "cycles, compute, stall, loads, hits, evictions, multiplies":
        "the MoE layer top's counters (docs/moe_layer.md), measured on Verilator, summed over "
        "the MoE layers; each run starts on empty slots",
    "prefill": "all prefill tokens of a layer in one run, in batches of at most T_max",
    "decode": "one token per run (empty slots: in a whole model the other layers' experts "
              "have evicted this layer's by the next token), summed over the decode tokens",
    "cycles_per_token_per_layer": "cycles / (tokens x MoE layers)",
    "utilization": "multiplies / (cycles x P x N), P x N the engine's multipliers",
    "dense_equivalent_macs_per_cycle": "multiplies x M / N / cycles",
    "record_bytes_per_token": "loads x packed record bytes / tokens (null when the routed "
                              "and shared records differ in size: the counters do not say "
                              "which were loaded)",
    "link_bytes_per_token": "bytes on the wire each way (host.link.encode_frame of the "
                            "ROUTER, RUN_TOKENS, LOAD_EXPERT, REQUEST and RESULTS messages "
                            "with their actual payloads, an ACK per data frame the other "
                            "way); a load's record counted at the mean encoded size of the "
                            "layer's records",
    "clock_limited_tokens_per_s": "clock / cycles per token over all MoE layers (the "
                                  "simulation streams records at a byte a cycle)",
    "link_limited_tokens_per_s": "(baud / 10) / link bytes per token of the busier "
                                 "direction (8N1: 10 bits a byte)",
    "tokens_per_s": "min(clock-limited, link-limited): an upper bound for the MoE layers "
                    "alone (the host's attention and the link's ACK round trips not counted)",
    "cache": "host/cache_sim replay of decode steps through the host's mirror of the slots "
             "(LRU), not the simulated top",
}


def _model_facts(checkpoint):
    cfg = checkpoint.config
    return {"checkpoint": str(checkpoint.path), "family": cfg.family,
            "hidden_size": cfg.hidden_size, "experts": cfg.num_experts, "top_k": cfg.top_k,
            "expert_ffn_size": cfg.expert_ffn_size,
            "shared_expert_ffn_size": cfg.shared_expert_ffn_size,
            "moe_layers": list(cfg.moe_layers)}


def _source():
    """The git commit of the code measured, and the files under rtl/ and host/ that differed
    from it (the simulated top is generated from the working tree); None outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        def git(*args):
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=30, check=True).stdout
        commit = git("rev-parse", "HEAD").strip()
        changed = git("status", "--porcelain", "--", "rtl", "host").splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "uncommitted": sorted(line[3:] for line in changed)}


def _sim_module():
    try:
        from . import sim
        from .sim_build import verilator_root
    except ImportError as exc:
        raise MoefpgaError(f"the bench needs the simulation extras ({exc}); install them: "
                           "pip install 'moefpga[bench]'") from None
    verilator_root()
    return sim


def _record_sizes(per_layer):
    """``record_bytes(layer, expert)`` from the records measured per layer."""
    from .expert_cache import SHARED_EXPERT
    sizes = {e["layer"]: e["record_bytes"] for e in per_layer}
    return lambda layer, expert: sizes[layer]["shared" if expert == SHARED_EXPERT else "routed"]


def measure_config(sim, checkpoint, config, inputs, decode_tokens, progress):
    """Build ``config``'s top and measure every MoE layer on it; returns its results entry
    and what the tools' measurements reuse (hardware, first layer's integer layer)."""
    cfg = checkpoint.config
    layers = cfg.moe_layers
    hw = sim.hardware_for(checkpoint.moe_layer(layers[0]), config.spec,
                          num_layers=cfg.num_layers, options=config.options)
    source = _source()          # the working tree the top's Verilog is generated from
    executable = sim.build(hw, progress)
    speed = _SpeedLog(progress)
    per_layer, int_layers = [], {}
    for layer in layers:
        int_layers[layer] = quantize_layer(checkpoint.moe_layer(layer), config.spec,
                                           default_calibration(checkpoint, layer))
        per_layer.append(measure_layer(sim, executable, hw, int_layers[layer], layer,
                                       inputs[layer], decode_tokens, speed, progress))
    e = hw.params.engine
    multipliers = e.lanes * e.n
    summary = {phase: _phase_summary(per_layer, phase, multipliers, e.m / e.n)
               for phase in ("prefill", "decode")}
    entry = {"name": config.name, "board": config.board, "spec": str(config.spec),
             "hardware": {"lanes": e.lanes, "m": e.m, "n": e.n, "multipliers": multipliers,
                          "weight_bits": e.weight_bits, "group_size": e.group_size,
                          "max_tokens": hw.params.max_tokens, "slots": config.options.slots,
                          "router_macs": hw.macs},
             "source": source, **summary, "layers": per_layer,
             "verilator": {"cycles": speed.cycles, "seconds": speed.seconds,
                           "cycles_per_s": speed.cycles / max(speed.seconds, 1e-9)}}
    if config.board:
        entry["board_rate"] = board_rates(config, summary, multipliers)
    return entry, hw, int_layers[layers[0]]


def run_bench(checkpoint, configs, *, prefill_tokens, decode_tokens, cache_tokens,
              amaranth_cycles, progress=_progress, save=None):
    """Measure ``configs`` on ``checkpoint``; the results as ``results.json`` holds them.
    ``save(results)``, when given, is called with the results so far after each configuration.

    Raises
    ------
    MoefpgaError
        A configuration does not fit the model, the simulation extras or Verilator are
        missing, a simulation fails or counts a rejected record, malformed batch or timeout.
    """
    if not 1 <= decode_tokens <= prefill_tokens:
        raise MoefpgaError(f"decode tokens ({decode_tokens}) must be 1 to the prefill tokens "
                           f"({prefill_tokens})")
    sim = _sim_module()
    cfg = checkpoint.config
    inputs = {layer: calibration_tokens(cfg.hidden_size, checkpoint.norm_weight(layer),
                                        count=prefill_tokens, seed=1000 + layer)
              for layer in cfg.moe_layers}
    results = {"model": _model_facts(checkpoint),
               "settings": {"prefill_tokens": prefill_tokens, "decode_tokens": decode_tokens,
                            "cache_tokens": cache_tokens, "amaranth_cycles": amaranth_cycles},
               "link": {"bits_per_byte": LINK_BITS_PER_BYTE, "framing": "8N1 UART, "
                        "COBS frames of at most 1024 payload bytes (docs/link.md)"},
               "definitions": DEFINITIONS, "configs": []}
    traces, first = {}, None
    for n, config in enumerate(configs):
        progress(f"bench: configuration {n + 1}/{len(configs)}: {config.name} ({config.spec}, "
                 f"P={config.options.lanes}, T_max={config.options.max_tokens}, "
                 f"S={config.options.slots})")
        entry, hw, int_layer = measure_config(sim, checkpoint, config, inputs, decode_tokens,
                                              progress)
        first = first or (entry, hw, int_layer)
        progress(f"bench: {config.name}: cache hit rate and prediction accuracy, "
                 f"{cache_tokens} decode steps on the host's mirror of the slots")
        entry["cache"] = cache_rows(checkpoint, config.spec, config.options.slots, cache_tokens,
                                    _record_sizes(entry["layers"]), progress, traces)
        results["configs"].append(entry)
        if save:
            save(results)
    results["tools"] = measure_tools(checkpoint, first, inputs, amaranth_cycles, progress)
    return results


def measure_tools(checkpoint, first, inputs, amaranth_cycles, progress):
    """Verilator's and Amaranth's simulated cycles per second on the first configuration's top
    (layer 0's prefill tokens), and the host's packing throughput for it."""
    entry, hw, int_layer = first
    layer = checkpoint.config.moe_layers[0]
    from .pack import pack_layer
    records = pack_layer(int_layer, layer, hw.params)
    xq, exp = quantize_activations(inputs[layer])
    progress(f"bench: Amaranth's simulator on the {entry['name']} top, {amaranth_cycles} "
             "cycles (compiling the design first)")
    amaranth = amaranth_speed(hw, int_layer, layer, xq, exp, records, amaranth_cycles)
    amaranth["cycles_per_s"] = amaranth["cycles"] / amaranth["seconds"]
    verilator = dict(entry["verilator"], config=entry["name"])
    progress("bench: host packing throughput")
    return {"cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "verilator": verilator, "amaranth": dict(amaranth, config=entry["name"]),
            "verilator_over_amaranth": verilator["cycles_per_s"] / amaranth["cycles_per_s"],
            "packing": dict(packing_speed(int_layer, layer, hw.params, repeat=3),
                            config=entry["name"])}


# ----------------------------------------------------------------------------------------------
# The table and the plots

def format_table(results):
    """The tables ``moefpga bench`` prints (and docs/results.md shows): per configuration and
    phase, then tokens per second per board, cache replay, and the tools."""
    lines = [f"{'config':<12}{'setting':<22}{'PxN':>4}{'phase':>8}{'cyc/tok/layer':>14}"
             f"{'util':>7}{'stall':>7}{'loads':>7}{'hits':>6}{'record kB/tok':>14}"
             f"{'link kB/tok':>12}"]
    for c in results["configs"]:
        for phase in ("prefill", "decode"):
            s = c[phase]
            record = ("-" if s["record_bytes_per_token"] is None
                      else f"{s['record_bytes_per_token'] / 1e3:.1f}")
            link = max(s["link_bytes_per_token"].values()) / 1e3
            lines.append(f"{c['name']:<12}{c['spec']:<22}{c['hardware']['multipliers']:>4}"
                         f"{phase:>8}{s['cycles_per_token_per_layer']:>14,.0f}"
                         f"{s['utilization']:>7.1%}{s['stall_fraction']:>7.1%}"
                         f"{s['loads']:>7}{s['hits']:>6}{record:>14}{link:>12.1f}")
    lines += ["", f"{'board':<12}{'clock MHz':>10}{'baud':>8}{'phase':>8}"
                  f"{'clock-limited tok/s':>21}{'link-limited tok/s':>20}{'bound tok/s':>13}"]
    for c in results["configs"]:
        r = c.get("board_rate")
        for phase in ("prefill", "decode") if r else ():
            p = r[phase]
            lines.append(f"{c['name']:<12}{r['clock_mhz']:>10.2f}{r['baud']:>8}{phase:>8}"
                         f"{p['clock_limited_tokens_per_s']:>21.2f}"
                         f"{p['link_limited_tokens_per_s']:>20.3f}{p['tokens_per_s']:>13.3f}")
    lines += ["", f"{'config':<12}{'slots':>6}{'predictor':>10}{'hit rate':>10}{'routed':>8}"
                  f"{'accuracy':>10}{'kB/token':>10}"]
    for c in results["configs"]:
        for row in c["cache"]:
            accuracy = ("-" if row["prediction_accuracy"] is None
                        else f"{row['prediction_accuracy']:.1%}")
            lines.append(f"{c['name']:<12}{row['slots']:>6}{row['predictor']:>10}"
                         f"{row['hit_rate']:>10.1%}{row['routed_hit_rate']:>8.1%}"
                         f"{accuracy:>10}{row['bytes_streamed_per_token'] / 1e3:>10.1f}")
    t = results["tools"]
    lines += ["", f"simulation speed on the {t['verilator']['config']} top: Verilator "
                  f"{t['verilator']['cycles_per_s']:,.0f} cycles/s, Amaranth "
                  f"{t['amaranth']['cycles_per_s']:,.0f} cycles/s ({t['amaranth']['cycles']} "
                  f"cycles; compiling took {t['amaranth']['compile_seconds']:.1f} s): "
                  f"Verilator {t['verilator_over_amaranth']:,.0f}x faster",
              f"host packing: {t['packing']['mb_per_s']:.2f} MB/s "
              f"({t['packing']['bytes']:,} bytes in {t['packing']['seconds']:.3f} s)"]
    return "\n".join(lines)


def write_plots(results, folder):
    """``cycles.png`` (cycle breakdown per layer), ``utilization.png`` (per configuration) and
    ``roofline.png`` (each board's configuration against its DSP, engine and link limits) in
    ``folder``; returns their paths."""
    try:
        import matplotlib
    except ImportError as exc:
        raise MoefpgaError(f"the bench plots need matplotlib ({exc}); install it: "
                           "pip install 'moefpga[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    paths = [folder / "cycles.png", folder / "utilization.png", folder / "roofline.png"]
    for draw, path in zip((_plot_cycles, _plot_utilization, _plot_roofline), paths,
                          strict=True):
        figure = draw(plt, results)
        figure.savefig(path, dpi=110)
        plt.close(figure)
    return paths


def _plot_cycles(plt, results):
    """Stacked compute / stall / other cycles per token of each layer, per phase."""
    configs = results["configs"]
    figure, axes = plt.subplots(2, 1, figsize=(11, 9))
    for ax, phase in zip(axes, ("prefill", "decode"), strict=True):
        labels, parts = [], {"compute": [], "stall on loads": [], "other": []}
        for c in configs:
            for entry in c["layers"]:
                s = entry[phase]
                labels.append(f"{c['name']} L{entry['layer']}")
                parts["compute"].append(s["compute"] / s["tokens"])
                parts["stall on loads"].append(s["stall"] / s["tokens"])
                parts["other"].append((s["cycles"] - s["compute"] - s["stall"]) / s["tokens"])
        bottom = np.zeros(len(labels))
        for (name, values), color in zip(parts.items(), ("#3a7", "#d54", "#bbb"), strict=True):
            ax.bar(range(len(labels)), values, bottom=bottom, label=name, color=color)
            bottom += values
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=60, ha="right")
        ax.set_ylabel("cycles per token")
        ax.set_title(f"{phase}: cycles per token per MoE layer (measured, Verilator)")
        ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _plot_utilization(plt, results):
    """Multiplier utilization per configuration, prefill and decode side by side."""
    configs = results["configs"]
    figure, ax = plt.subplots(figsize=(9, 4.5))
    x = np.arange(len(configs))
    for offset, phase in ((-0.2, "prefill"), (0.2, "decode")):
        values = [100 * c[phase]["utilization"] for c in configs]
        bars = ax.bar(x + offset, values, width=0.4, label=phase)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, [f"{c['name']}\n{c['hardware']['multipliers']} mult." for c in configs])
    ax.set_ylabel("multiplies / (cycles x multipliers), %")
    ax.set_title("multiplier utilization against the engine's peak (measured)")
    ax.legend()
    figure.tight_layout()
    return figure


def _plot_roofline(plt, results):
    """Per board: multiplies per second against multiplies per link byte, with the roofs of
    the device's multipliers, the engine's and the link; the board configuration's prefill
    and decode at its clock-limited and bound rates."""
    boards = [c for c in results["configs"] if c.get("board_rate")]
    figure, axes = plt.subplots(1, max(len(boards), 1), figsize=(6 * max(len(boards), 1), 4.8),
                                squeeze=False)
    for ax, c in zip(axes[0], boards, strict=False):
        r = c["board_rate"]
        points = [r[p]["multiplies_per_link_byte"] for p in ("prefill", "decode")]
        x = np.logspace(np.log10(min(points) / 10), np.log10(max(points) * 1e4), 100)
        ax.loglog(x, x * r["link_bytes_per_s"], "k--",
                  label=f"link: {r['baud']} baud / {LINK_BITS_PER_BYTE} bits a byte")
        ax.axhline(r["engine_peak_multiplies_per_s"], color="C0",
                   label=f"engine peak: {c['hardware']['multipliers']} multipliers")
        if r["device_peak_multiplies_per_s"]:
            ax.axhline(r["device_peak_multiplies_per_s"], color="C3",
                       label=f"device: {r['device_multipliers']} DSP multipliers")
        for phase, marker in (("prefill", "o"), ("decode", "s")):
            p, s = r[phase], c[phase]
            ax.plot(p["multiplies_per_link_byte"],
                    s["multiplies_per_token"] * p["clock_limited_tokens_per_s"], marker,
                    mfc="none", color="C2", label=f"{phase}: clock-limited (measured cycles)")
            ax.plot(p["multiplies_per_link_byte"],
                    s["multiplies_per_token"] * p["tokens_per_s"], marker, color="C1",
                    label=f"{phase}: with the link")
        ax.set_xlabel("multiplies per byte on the link")
        ax.set_ylabel("multiplies per second")
        ax.set_title(f"{c['name']} at {r['clock_mhz']:g} MHz")
        ax.legend(fontsize=6)
    figure.tight_layout()
    return figure


# ----------------------------------------------------------------------------------------------
# The command

#: Sizes of a full and a ``--quick`` run.
FULL = {"prefill_tokens": 64, "decode_tokens": 4, "cache_tokens": 64, "amaranth_cycles": 3000}
QUICK = {"prefill_tokens": 8, "decode_tokens": 1, "cache_tokens": 8, "amaranth_cycles": 300}


def _config_names(text):
    return [name for name in text.split(",") if name]


def select_configs(names):
    """The configurations named in ``names`` (all when None), or a :class:`MoefpgaError`."""
    configs = configurations()
    if names is None:
        return configs
    known = {c.name: c for c in configs}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise MoefpgaError(f"unknown configuration {unknown[0] if unknown else '(none)'!r}; "
                           f"choose from {', '.join(known)}")
    return [known[n] for n in names]


def _write_json(path, results):
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(results, indent=1) + "\n")
    staging.replace(path)


def cmd_bench(args):
    configs = select_configs(args.configs)
    path = (Path(args.checkpoint) if args.checkpoint
            else ensure_default_model(Path(args.workdir) / "model"))
    checkpoint = Checkpoint.open(path)
    output = Path(args.output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoefpgaError(f"cannot create the output folder {output}: {exc.strerror}") from None
    sizes = dict(QUICK if args.quick else FULL)
    start = time.monotonic()
    # The configurations measured so far go to a file of their own: a run that fails later
    # keeps them, and the results.json of an earlier run stays whole.
    partial = output / "results.partial.json"
    partial.unlink(missing_ok=True)
    try:
        results = run_bench(checkpoint, configs, save=lambda r: _write_json(partial, r),
                            **sizes)
    except MoefpgaError as exc:
        if partial.exists():
            raise MoefpgaError(f"{exc} (the configurations measured before it are in "
                               f"{partial})") from None
        raise
    results["settings"].update(quick=args.quick, seconds=round(time.monotonic() - start, 1))
    _write_json(output / "results.json", results)
    partial.unlink(missing_ok=True)
    paths = write_plots(results, output)
    print(format_table(results))
    print(f"\nwrote {output / 'results.json'}, " + ", ".join(str(p) for p in paths))


def add_commands(sub):
    """Add ``bench`` to the ``moefpga`` subcommands ``sub``. Its ``--checkpoint`` is optional
    (the default model when absent), unlike the other commands'."""
    p = sub.add_parser("bench", help="measure cycles, utilization, stalls, cache and tokens/s "
                                     "on the Verilator simulation; write results and plots")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="Hugging Face checkpoint folder (default: the default model)")
    p.add_argument("--workdir", default="build/demo-model", metavar="DIR",
                   help="where the default model is (made if absent) without --checkpoint")
    p.add_argument("--output", default="bench", metavar="DIR",
                   help="folder for results.json and the plots (default bench)")
    p.add_argument("--configs", type=_config_names, metavar="NAME[,NAME...]",
                   help="configurations to run (default all: dense, 2:4, 1:4, dense-1slot, "
                        f"{', '.join(BOARDS)})")
    p.add_argument("--quick", action="store_true",
                   help=f"a small run: {QUICK['prefill_tokens']} prefill tokens, "
                        f"{QUICK['decode_tokens']} decode token, {QUICK['cache_tokens']} cache "
                        "steps per configuration")
    p.set_defaults(func=cmd_bench)
