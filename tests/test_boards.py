"""Board flow without synthesis: YAML loading and validation, PLL settings, report parsing and
the table, the development harness, and the command line's errors."""

import json

import pytest
import yaml
from amaranth import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from moefpga.boards import build
from moefpga.boards.config import BoardError, board_names, load_board
from moefpga.boards.harness import DevelopmentHarness
from moefpga.boards.pll import ecp5_pll, ice40_pll
from moefpga.boards.survey import UNITS, parse_memory_fates, synth_script, unit
from moefpga.boards.toolchain import run_tool

ICEBREAKER = {
    "platform": "amaranth_boards.icebreaker:ICEBreakerPlatform", "family": "ice40",
    "target_mhz": 24, "lanes": 4, "m": 4, "n": 2, "weight_bits": 4, "group_size": 32,
    "max_tokens": 4, "slots": 2, "memory": "spram", "seed": 1,
}


def write_board(tmp_path, **changes):
    """A board YAML file from ICEBREAKER with ``changes`` (a value None removes the key)."""
    raw = {**ICEBREAKER, **changes}
    raw = {key: value for key, value in raw.items() if value is not None}
    path = tmp_path / "board.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_boards_load():
    assert {"icebreaker", "ulx3s-85f"} <= set(board_names())
    ice = load_board("icebreaker")
    assert (ice.family, ice.memory, ice.target_mhz) == ("ice40", "spram", 24)
    ecp = load_board("ulx3s-85f")
    assert (ecp.family, ecp.memory) == ("ecp5", "ebr")
    assert ecp.target_mhz >= 50
    # The expert FFN of either board holds the default model's experts.
    for cfg in (ice, ecp):
        kwargs = cfg.ffn_kwargs()
        assert (kwargs["hidden"], kwargs["ffn"]) == (128, 256)


def test_a_file_path_loads_with_defaults(tmp_path):
    cfg = load_board(str(write_board(tmp_path)))
    assert cfg.name == "board"
    assert (cfg.baud, cfg.acc_bits, cfg.router_macs, cfg.nextpnr_options) == \
        (115200, 40, 1, ())


def test_unknown_board_names_the_known_ones():
    with pytest.raises(BoardError, match="unknown board 'nope'.*icebreaker"):
        load_board("nope")


@pytest.mark.parametrize("changes, message", [
    ({"lanes": None}, "missing key.*lanes"),
    ({"colour": "red"}, "unknown key.*colour"),
    ({"lanes": 0}, "lanes must be a positive integer"),
    ({"lanes": -4}, "lanes must be a positive integer"),
    ({"slots": True}, "slots must be a positive integer"),
    ({"m": 4.0}, "m must be a positive integer"),
    ({"target_mhz": 0}, "target_mhz must be a number"),
    ({"target_mhz": "fast"}, "target_mhz must be a number"),
    ({"family": "gowin"}, "family must be one of ice40, ecp5"),
    ({"family": "ecp5"}, "memory must be one of ebr on ecp5, not 'spram'"),
    ({"platform": "amaranth_boards.icebreaker"}, "platform must be 'module:Class'"),
    ({"nextpnr_options": "--router router2"}, "nextpnr_options must be a list"),
    ({"lanes": 3}, "do not hold the default model"),
    ({"group_size": 48}, "do not hold the default model"),
])
def test_bad_keys_are_named(tmp_path, changes, message):
    with pytest.raises(BoardError, match=message):
        load_board(str(write_board(tmp_path, **changes)))


def test_not_a_mapping_or_not_yaml(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(BoardError, match="expected a mapping"):
        load_board(str(path))
    path.write_text("lanes: [4\n")
    with pytest.raises(BoardError, match="not valid YAML"):
        load_board(str(path))
    with pytest.raises(BoardError, match="cannot read"):
        load_board(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("fin, target", [(12, 24), (12, 30), (12, 48)])
def test_ice40_pll_meets_its_constraints(fin, target):
    params, fout = ice40_pll(fin, target)
    divr, divf, divq = params["DIVR"], params["DIVF"], params["DIVQ"]
    assert fout == fin * (divf + 1) / ((divr + 1) * 2 ** divq) == pytest.approx(target)
    assert 10 <= fin / (divr + 1) <= 133
    assert 533 <= fin / (divr + 1) * (divf + 1) <= 1066


def test_ice40_pll_12_to_24_as_icepll():
    # icepll -i 12 -o 24 prints DIVR=0, DIVF=63, DIVQ=5, FILTER_RANGE=1.
    assert ice40_pll(12, 24) == ({"DIVR": 0, "DIVF": 63, "DIVQ": 5, "FILTER_RANGE": 1}, 24.0)


@pytest.mark.parametrize("fin, target", [(25, 50), (25, 65), (25, 100)])
def test_ecp5_pll_meets_its_constraints(fin, target):
    params, fout = ecp5_pll(fin, target)
    assert fout == fin * params["CLKFB_DIV"] / params["CLKI_DIV"] == pytest.approx(target)
    assert 400 <= fout * params["CLKOP_DIV"] <= 800


def test_unreachable_pll_is_an_error():
    with pytest.raises(BoardError, match="no PLL setting makes 1000 MHz from 12 MHz"):
        ice40_pll(12, 1000)


# Shortened from nextpnr --report output: only the keys the flow reads, numbers made up.
ICE40_PNR = {
    "utilization": {
        "ICESTORM_LC": {"available": 5280, "used": 4100},
        "ICESTORM_RAM": {"available": 30, "used": 12},
        "ICESTORM_SPRAM": {"available": 4, "used": 3},
        "ICESTORM_DSP": {"available": 8, "used": 8},
        "ICESTORM_PLL": {"available": 1, "used": 1},
    },
    "fmax": {"clk": {"achieved": 27.456, "constraint": 24.0}},
}
ECP5_PNR = {
    "utilization": {
        "TRELLIS_COMB": {"available": 83640, "used": 20000},
        "TRELLIS_FF": {"available": 83640, "used": 15000},
        "MULT18X18D": {"available": 156, "used": 48},
        "DP16KD": {"available": 208, "used": 90},
    },
    "fmax": {"$glbnet$clk": {"achieved": 61.0, "constraint": 50.0}},
}


def test_parse_report_ice40():
    parsed = build.parse_report("ice40", ICE40_PNR,
                                {"SB_DFF": 10, "SB_DFFE": 5, "SB_LUT4": 99, "SB_CARRY": 7})
    assert parsed["resources"] == {
        "lut": {"used": 4100, "available": 5280}, "ff": {"used": 15, "available": 5280},
        "dsp": {"used": 8, "available": 8}, "bram": {"used": 12, "available": 30},
        "spram": {"used": 3, "available": 4}}
    assert parsed["clocks"] == {"clk": {"achieved_mhz": 27.46, "constraint_mhz": 24.0}}


def test_parse_report_ecp5_has_no_spram():
    parsed = build.parse_report("ecp5", ECP5_PNR, {})
    assert parsed["resources"]["ff"] == {"used": 15000, "available": 83640}
    assert parsed["resources"]["dsp"] == {"used": 48, "available": 156}
    assert parsed["resources"]["spram"] == {"used": 0, "available": 0}


def _report(board, fmax, met):
    parsed = build.parse_report("ice40", ICE40_PNR, {"SB_DFF": 15})
    return {"board": board, **parsed, "fmax_mhz": fmax, "target_mhz": 24, "timing_met": met,
            "seed": 3, "seconds": {"total": 123.4}}


def test_format_table():
    lines = build.format_table([_report("icebreaker", 27.46, True),
                                _report("slow", 20.0, False)]).splitlines()
    assert lines[0].split()[:3] == ["board", "LUT/LC", "FF"]
    assert lines[1].split() == ["icebreaker", "4100/5280", "15/5280", "8/8", "12/30", "3/4",
                                "27.46", "24", "yes", "3", "123"]
    assert lines[2].split()[6:9] == ["20.00", "24", "NO"]


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert build.main(["--board", "nope", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moefpga: error: unknown board 'nope'") and err.count("\n") == 1
    assert build.main(["--root", str(tmp_path)]) == 1
    assert "moefpga: error: --board is required" in capsys.readouterr().err
    assert build.main(["--report", "--root", str(tmp_path)]) == 1
    assert "no board built yet" in capsys.readouterr().err
    assert build.main(["--program", "--board", "icebreaker", "--root", str(tmp_path)]) == 1
    assert "icebreaker is not built" in capsys.readouterr().err


def test_cli_report_prints_every_built_board(capsys, tmp_path):
    for board in ("icebreaker", "ulx3s-85f"):
        (tmp_path / board).mkdir()
        (tmp_path / board / "report.json").write_text(json.dumps(_report(board, 30.0, True)))
    assert build.main(["--report", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["board", "icebreaker", "ulx3s-85f"]


def test_program_without_a_loader_says_so(capsys, tmp_path, monkeypatch):
    (tmp_path / "icebreaker").mkdir()
    (tmp_path / "icebreaker" / "report.json").write_text(
        json.dumps({**_report("icebreaker", 30.0, True), "bitstream": "top.bin"}))
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    assert build.main(["--program", "--board", "icebreaker", "--root", str(tmp_path)]) == 1
    assert "none of openFPGALoader, iceprog is installed" in capsys.readouterr().err


def test_parse_memory_fates():
    log = ("mapping memory top.engine.acts$71 via $__ICE40_RAM4K_\n"
           "using FF mapping for memory top.sbuf\n"
           "mapping memory top.slots.w_mem via $__ICE40_SPRAM_\n")
    assert parse_memory_fates(log) == {"top.engine.acts$71": "$__ICE40_RAM4K_",
                                       "top.sbuf": "FFs",
                                       "top.slots.w_mem": "$__ICE40_SPRAM_"}


def test_synth_scripts_enable_dsp_and_spram_on_ice40():
    assert "synth_ice40 -dsp -spram -top top" in synth_script("ice40", "a.il", "s.json")
    assert "synth_ecp5 -top top" in synth_script("ecp5", "a.il", "s.json")


class _Pair(wiring.Component):
    """A core with a 3-bit and a 1-bit input; outputs the 3-bit input and the 1-bit one."""
    a: In(3)
    b: In(1)
    y: Out(3)
    z: Out(1)

    def elaborate(self, platform):
        m = Module()
        m.d.comb += [self.y.eq(self.a), self.z.eq(self.b)]
        return m


def test_harness_shifts_inputs_and_sends_output_parity():
    harness = DevelopmentHarness(_Pair())
    assert harness.input_bits == 4
    bits = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1]
    seen = []

    async def bench(ctx):
        for bit in bits:
            ctx.set(harness.rx, bit)
            await ctx.tick()
            seen.append((ctx.get(harness.core.a), ctx.get(harness.core.b), ctx.get(harness.tx)))

    sim = Simulator(harness)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    shift = 0
    parity_before = 0
    for i, bit in enumerate(bits):
        # The register after the edge: the new bit at the bottom, the oldest falls off the top.
        shift = ((shift << 1) | bit) & 0b1111
        a, b, tx = seen[i]
        assert (a, b) == (shift & 0b111, shift >> 3)
        assert tx == parity_before
        parity_before = bin(shift).count("1") % 2


def test_design_clock_is_the_constrained_one():
    clocks = {"$PACKER_GND_NET_$glb_clk": {"achieved_mhz": 313.28, "constraint_mhz": 12.0},
              "clk": {"achieved_mhz": 15.42, "constraint_mhz": 24.0015}}
    assert build.design_clock(clocks, 24.0)["achieved_mhz"] == 15.42
    with pytest.raises(BoardError, match="no clock constrained to 50 MHz"):
        build.design_clock(clocks, 50.0)


def test_tool_failures_are_board_errors(tmp_path):
    with pytest.raises(BoardError, match="no-such-tool-xyz not found; install the board tools"):
        run_tool("no-such-tool-xyz", [], cwd=tmp_path, timeout=5)
    with pytest.raises(BoardError, match=r"python failed \(exit 3\):\nlast words"):
        run_tool("python", ["-c", "import sys; print('last words'); sys.exit(3)"],
                 cwd=tmp_path, timeout=30)
    with pytest.raises(BoardError, match="python ran longer than 0.5 s and was stopped"):
        run_tool("python", ["-c", "import time; time.sleep(30)"], cwd=tmp_path, timeout=0.5)
    assert run_tool("python", ["-c", "print('ok')"], cwd=tmp_path, timeout=30) == "ok\n"


def test_wrapper_constrains_the_pll_clock_and_uses_the_uart_pins():
    cfg = load_board("icebreaker")
    platform = build._platform(cfg)
    pll = build.board_pll(cfg, platform)
    plan = platform.prepare(build.BoardWrapper(cfg, DevelopmentHarness(_Pair()), pll),
                            name="top")
    pcf = plan.files["top.pcf"]
    assert "clk 24.0" in pcf     # the PLL's output (nextpnr also derives it from the PLL)
    for pin in ("set_io uart_0__rx__io 6", "set_io uart_0__tx__io 9", "clk12_0__io 35"):
        assert pin in pcf
    assert "SB_PLL40_PAD" in plan.files["top.il"]


def test_make_core_is_the_board_top_or_a_labelled_harness():
    cfg = load_board("icebreaker")
    core = build.make_core(cfg, "board_top", 24e6)
    assert type(core).__name__ == "BoardTop"
    assert core.identity.clock_hz == 24_000_000 and core.identity.slots == cfg.slots
    assert isinstance(build.make_core(cfg, "router", 24e6), DevelopmentHarness)


@pytest.mark.parametrize("board", ["icebreaker", "ulx3s-85f"])
def test_board_top_and_its_twin_differ_only_in_bit_time_and_spram_model(board):
    """The board's top keeps its slots in the board's memory kind with the SPRAM primitive;
    the Verilator twin (host.board_sim) is the same top, reporting the same IDENTIFY, with
    its own UART divisor and ACK timeout and the SPRAM simulation model."""
    from moefpga.host.board_sim import TWIN_ACK_TIMEOUT, TWIN_DIVISOR, twin_for_board
    from moefpga.rtl.single_port_memory import SpramModel

    cfg = load_board(board)
    top, twin = build.make_core(cfg, "board_top", cfg.target_mhz * 1e6), twin_for_board(board)
    assert top.identity == twin.identity
    assert top.layer.slot_memory == twin.layer.slot_memory == cfg.memory
    assert top.layer.spram_model is None
    assert twin.layer.spram_model is (SpramModel if cfg.memory == "spram" else None)
    assert top.link.divisor == round(cfg.target_mhz * 1e6 / cfg.baud)
    assert (twin.link.divisor, twin.link.tx_side.ack_timeout) == (TWIN_DIVISOR, TWIN_ACK_TIMEOUT)


def test_survey_units_build_and_unknown_ones_are_errors():
    cfg = load_board("icebreaker")
    assert [type(unit(name, cfg)).__name__ for name in UNITS] == [
        "SparseMatmulEngine", "ExpertFFN", "ExpertSlots", "Router", "MoeLayer"]
    with pytest.raises(BoardError, match="unknown unit 'alu'"):
        unit("alu", cfg)


#: nextpnr-ice40's utilisation table from the iCEBreaker board top of commit 9180c39.
UP5K_OVERFULL_LOG = """Info: Device utilisation:
Info: \t         ICESTORM_LC:   19726/   5280   373%
Info: \t        ICESTORM_RAM:      46/     30   153%
Info: \t               SB_IO:       5/     39    12%
Info: \t               SB_GB:       8/      8   100%
Info: \t        ICESTORM_DSP:      44/      8   550%
Info: \t      ICESTORM_SPRAM:       4/      4   100%
ERROR: Unable to place cell 'x_DSP', no BELs remaining to implement cell type 'ICESTORM_DSP'
"""


def test_overused_names_what_the_device_lacks():
    assert build.overused(UP5K_OVERFULL_LOG) == [
        ("ICESTORM_LC", 19726, 5280), ("ICESTORM_RAM", 46, 30), ("ICESTORM_DSP", 44, 8)]
    assert build.overused(UP5K_OVERFULL_LOG.replace("19726", "5280").replace(
        "46/", "30/").replace("44/", "8/")) == []


def test_a_design_that_does_not_fit_is_one_error_naming_the_resources(tmp_path, monkeypatch):
    def tools(name, args, *, cwd, timeout, **kwargs):
        if "nextpnr" in name:
            (cwd / "top.tim").write_text(UP5K_OVERFULL_LOG)
            raise BoardError(f"{name} failed (exit 1):\nERROR: Unable to place cell")
        return ""

    monkeypatch.setattr(build, "run_tool", tools)
    monkeypatch.setattr(build, "make_core", lambda cfg, name, hz: DevelopmentHarness(_Pair()))
    with pytest.raises(BoardError) as error:
        build.build(load_board("icebreaker"), root=tmp_path, log=lambda *a, **k: None)
    assert str(error.value).startswith(
        "icebreaker: the board top does not fit the iCE40UP5K: ICESTORM_LC 19726/5280 (373 %), "
        "ICESTORM_RAM 46/30 (153 %), ICESTORM_DSP 44/8 (550 %); see docs/boards.md")
