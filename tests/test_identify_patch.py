"""The achieved Fmax in a finished bitstream's IDENTIFY (boards.build.patch_identity).

A small design, the host link alone behind the board wrapper, goes through the real
``boards.build.build`` on the iCEBreaker (iCE40 UP5K) and the ULX3S (ECP5-85F) with the YoWASP
tools; ``build`` takes it for the board top (``make_core`` is replaced). The bitstream it packs
is unpacked again and searched (``boards.build.holds_rom``: icebram or ecpbram asked to
replace the contents) for the IDENTIFY ROM of the identity with the Fmax the report names,
and for the one synthesized (Fmax 0), which differs from it in one or two bit columns only.
"""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
from amaranth import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from moefpga.boards import build
from moefpga.boards.config import BoardError, load_board
from moefpga.boards.toolchain import run_tool
from moefpga.host.link import MAX_PAYLOAD, Identity
from moefpga.rtl.link import IDENTITY_ROM_DEPTH, Link, identity_rom

IDENTITY = Identity(link_version=1, record_version=1, lanes=2, m=4, n=2, weight_bits=4,
                    group_size=16, hidden=32, ffn=32, experts=4, top_k=2, shared=2, slots=3,
                    layers=1, max_tokens=4, clock_hz=18_000_000, max_payload=MAX_PAYLOAD)
#: The boards, the iCEBreaker at 18 MHz: the link alone reaches about 25 MHz on the UP5K, and
#: this test is about the patch, not about the link's timing.
BOARDS = {"ice40": ("icebreaker", {"target_mhz": 18}), "ecp5": ("ulx3s-85f", {})}


class _LinkCore(wiring.Component):
    """The host link with ``identity`` in IDENTIFY, as :class:`moefpga.rtl.board_top.BoardTop`
    has it (``identity``, ``link``), without the MoE layer."""
    rx: In(1, init=1)
    tx: Out(1, init=1)

    def __init__(self, identity):
        self.identity = identity
        self.link = Link(divisor=156, identity=identity.to_bytes(), ack_timeout=1_800_000)
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.submodules.link = self.link
        m.d.comb += [self.link.rx.eq(self.rx), self.tx.eq(self.link.tx)]
        return m


@pytest.fixture(scope="module", params=sorted(BOARDS))
def built(request, tmp_path_factory):
    """``(family, report, folder)`` of the link built as the board top of the family's board."""
    board, changes = BOARDS[request.param]
    cfg = dataclasses.replace(load_board(board), timeout_s=300, **changes)
    root = tmp_path_factory.mktemp(board)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build, "make_core", lambda cfg, name, clock_hz: _LinkCore(IDENTITY))
        report = build.build(cfg, root=root, log=lambda *args, **kwargs: None)
    return request.param, report, root / board


def _holds(family, folder, placed, identity):
    return build.holds_rom(family, folder, placed, identity_rom(identity.to_bytes()),
                           timeout=120)


def _unpack(family, report, folder):
    """The bitstream of ``report`` unpacked into ``folder``; the file's name. (Relative names:
    the YoWASP tools see their own temporary folder at /tmp.)"""
    bitstream = Path(shutil.copy(report["bitstream"], folder)).name
    if family == "ice40":
        run_tool("yowasp-iceunpack", [bitstream, "unpacked.asc"], cwd=folder, timeout=120)
        return "unpacked.asc"
    run_tool("yowasp-ecpunpack", ["--input", bitstream, "--textcfg", "unpacked.config"],
             cwd=folder, timeout=120)
    return "unpacked.config"


def test_bitstream_reports_the_achieved_fmax(built, tmp_path):
    family, report, folder = built
    assert report["core"] == "board_top" and report["timing_met"]
    # nextpnr's unrounded figure for the PLL's clock, in kHz rounded down.
    clocks = json.loads((folder / "pnr.json").read_text())["fmax"].values()
    achieved = [c["achieved"] for c in clocks
                if abs(c["constraint"] - report["pll_mhz"]) < 0.01 * report["pll_mhz"]]
    khz = report["identify_fmax_khz"]
    assert len(achieved) == 1 and khz == math.floor(achieved[0] * 1000 + 1e-6)
    assert abs(khz / 1000 - report["fmax_mhz"]) < 0.01 and khz > 1000 * report["pll_mhz"]

    patched = dataclasses.replace(IDENTITY, fmax_khz=khz)
    unpacked = _unpack(family, report, tmp_path)
    assert _holds(family, tmp_path, unpacked, patched)
    assert not _holds(family, tmp_path, unpacked, IDENTITY)
    assert not _holds(family, tmp_path, unpacked, dataclasses.replace(patched, fmax_khz=khz + 1))
    # What nextpnr placed, the unpatched design, holds the synthesized identity only.
    placed = {"ice40": "top.asc", "ecp5": "top.config"}[family]
    shutil.copy(folder / placed, tmp_path / placed)
    assert _holds(family, tmp_path, placed, IDENTITY)
    assert not _holds(family, tmp_path, placed, patched)


def test_a_design_without_that_identity_is_an_error(built, tmp_path):
    family, _, folder = built
    placed = {"ice40": "top.asc", "ecp5": "top.config"}[family]
    shutil.copy(folder / placed, tmp_path / placed)
    stranger = dataclasses.replace(IDENTITY, clock_hz=IDENTITY.clock_hz + 1)
    with pytest.raises(BoardError, match="no block RAM of .* holds the IDENTIFY ROM"):
        build.patch_identity(family, tmp_path, stranger, 12_345, timeout=120)


def test_identity_rom_is_the_identity_then_one_fill():
    a, b = IDENTITY.to_bytes(), dataclasses.replace(IDENTITY, fmax_khz=27_456).to_bytes()
    rom_a, rom_b = identity_rom(a), identity_rom(b)
    assert len(rom_a) == IDENTITY_ROM_DEPTH == 512
    assert bytes(rom_a[:len(a)]) == a and bytes(rom_b[:len(b)]) == b
    assert rom_a[len(a):] == rom_b[len(b):]
    # The bytes that differ are the u32 at offset 28 (fmax_khz, little-endian).
    assert [i for i in range(512) if rom_a[i] != rom_b[i]] == [28, 29]
    assert rom_b[28:32] == [0x40, 0x6B, 0, 0]
    # icebram takes the bit columns in slices of 256 words, ecpbram of 512; each slice must
    # differ from every other, or the tool refuses the contents.
    for words in (256, 512):
        slices = [tuple((rom_a[i] >> bit) & 1 for i in range(start, start + words))
                  for bit in range(8) for start in range(0, 512, words)]
        assert len(set(slices)) == len(slices)


@pytest.mark.parametrize("identity", [b"", bytes(513)])
def test_identity_rom_refuses_what_does_not_fit(identity):
    with pytest.raises(ValueError, match="identity must have 1..512 bytes"):
        identity_rom(identity)


def test_fmax_khz_is_rounded_down_from_the_unrounded_report():
    pnr = {"fmax": {"clk": {"achieved": 27.456, "constraint": 24.0015},
                    "$PACKER_GND_NET": {"achieved": 300.0, "constraint": 12.0}}}
    assert build.fmax_khz(pnr, 24.0) == 27_456
    pnr["fmax"]["clk"]["achieved"] = 24.95899
    assert build.fmax_khz(pnr, 24.0) == 24_958


def test_run_tool_with_files_for_stdin_and_stdout(tmp_path):
    (tmp_path / "in.txt").write_text("abc\n")
    script = ("import sys; sys.stdout.write(sys.stdin.read().upper()); "
              "print('note', file=sys.stderr)")
    assert run_tool("python", ["-c", script], cwd=tmp_path, timeout=30, stdin="in.txt",
                    stdout="out.txt") == "note\n"
    assert (tmp_path / "out.txt").read_text() == "ABC\n"
    with pytest.raises(BoardError, match=r"python failed \(exit 2\):\nbroken"):
        run_tool("python", ["-c", "import sys; print('broken', file=sys.stderr); sys.exit(2)"],
                 cwd=tmp_path, timeout=30, stdout="out.txt")


def test_the_host_prints_the_fmax_of_identify():
    from moefpga.host.cli import format_identity

    assert format_identity(dataclasses.replace(IDENTITY, fmax_khz=24_958)).endswith(
        "clock 18 MHz, Fmax 24.958 MHz")
    assert format_identity(IDENTITY).endswith("clock 18 MHz, Fmax unknown")
