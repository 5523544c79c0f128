"""The Verilator twin of a board: the board top (``rtl/board_top.py``) on Verilator with its UART
bridged to a pseudo-terminal by ``board_sim.cpp``, opened by the host like a board's serial port.

The twin is built from the same :class:`~moefpga.rtl.board_top.BoardTop` a board build wraps
(``boards/build.py``), with the same parameters, except the UART divisor: the twin sends a bit in
:data:`TWIN_DIVISOR` cycles instead of ``clock / baud``, so a byte costs 10 x that many
simulated cycles. Its function (messages, framing, the MoE layer) is identical; only the bit
time, and with it the device's ACK timeout in cycles, differ. docs/link.md, "The Verilator twin".

:func:`twin_for_board` sizes it as a board's YAML file does (for the default model);
:func:`twin_for_layers` sizes it for a model's quantized layers as ``moefpga run --backend sim``
sizes its top (:func:`.sim.hardware_for`); :func:`build` makes the executable (cached);
:class:`BoardSim` runs it and gives the pseudo-terminal's path.
"""

import gc
import signal
import subprocess
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from ..hls_models.calibrate import QuantSpec
from ..hls_models.errors import MoefpgaError
from ..rtl.board_top import BoardTop
from ..rtl.expert_ffn_params import ExpertFfnParams
from ..rtl.single_port_memory import SpramModel
from .sim_build import build_executable
from .sim_options import SimOptions

__all__ = ["TOP", "TWIN_DIVISOR", "TWIN_ACK_TIMEOUT", "START_TIMEOUT", "TwinSizes",
           "twin_sizes", "twin_for_board", "twin_for_layers", "build", "BoardSim"]

#: Verilog module name of the board top (the driver includes ``V<TOP>.h``).
TOP = "board_top"
#: Clock cycles per UART bit in the twin (a board uses clock / baud, e.g. 208 at 24 MHz).
TWIN_DIVISOR = 4
#: The twin's ACK timeout in cycles: a full frame's encoder backlog (``(257 + 11) * 10 *
#: divisor`` cycles, docs/link.md "FrameTx") and tens of milliseconds of host reaction.
TWIN_ACK_TIMEOUT = 100_000
#: Seconds to wait for a started twin to print its pseudo-terminal.
START_TIMEOUT = 30.0
_DRIVER = Path(__file__).with_name("board_sim.cpp")


def _board_top(layer_params, *, hidden, experts, top_k, slots, shared, shared_gate, layers,
               macs, clock_hz):
    return BoardTop(layer_params, hidden=hidden, experts=experts, top_k=top_k, slots=slots,
                    shared=shared, shared_gate=shared_gate, layers=layers, macs=macs,
                    divisor=TWIN_DIVISOR, clock_hz=clock_hz, ack_timeout=TWIN_ACK_TIMEOUT)


def twin_for_board(board):
    """The :class:`BoardTop` of board ``board`` (a name or YAML path, ``boards.config``) as
    ``boards/build.py`` builds it (sized for the default model, the board's target clock in
    IDENTIFY), with the twin's divisor and ACK timeout."""
    from ..boards.build import board_top
    from ..boards.config import BoardError, load_board

    try:
        cfg = load_board(board)
    except BoardError as error:
        raise MoefpgaError(str(error)) from None
    return board_top(cfg, cfg.target_mhz * 1e6, divisor=TWIN_DIVISOR,
                     ack_timeout=TWIN_ACK_TIMEOUT,
                     spram_model=SpramModel if cfg.memory == "spram" else None)


def _spec_of(int_layer):
    """The :class:`QuantSpec` ``int_layer`` was quantized with (from its gate matrix)."""
    gate = int_layer.experts[0].gate
    per_channel = gate.group_size == gate.q.shape[1]
    return QuantSpec(bits=gate.bits, group_size=None if per_channel else gate.group_size,
                     sparsity=gate.sparsity, acc_bits=int_layer.acc_bits)


def _shapes_of(int_layer):
    """The shapes :func:`.sim.hardware_for` reads from a layer's weights, from ``int_layer``."""
    def expert(e):
        return SimpleNamespace(down=e.down.q)
    return SimpleNamespace(router=int_layer.router, experts=[expert(e) for e in int_layer.experts],
                           shared=None if int_layer.shared is None else expert(int_layer.shared),
                           shared_gate=int_layer.shared_gate, top_k=int_layer.top_k)


@dataclass(frozen=True)
class TwinSizes:
    """The parameters of the MoE layer top :func:`.sim.hardware_for` sizes, which a twin's
    :class:`BoardTop` takes."""
    params:      ExpertFfnParams
    hidden:      int
    experts:     int
    top_k:       int
    slots:       int
    shared:      bool
    shared_gate: bool
    layers:      int
    macs:        int


def twin_sizes(weights, spec, *, num_layers, options=None) -> TwinSizes:
    """The sizes :func:`.sim.hardware_for` gives the top for ``weights`` (a checkpoint layer,
    or anything with its shapes) quantized by ``spec``, refusing as it does (a
    :class:`MoefpgaError`) shapes it cannot take.

    ``hardware_for`` builds a :class:`~moefpga.rtl.moe_layer.MoeLayer`; only its sizes are
    read and it is collected here, within a filter that ignores amaranth's "created but never
    used" warning, so the warning is silenced for this call only.
    """
    from amaranth.hdl import UnusedElaboratable

    from .sim import hardware_for

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)
        hw = hardware_for(weights, spec, num_layers=num_layers, options=options or SimOptions())
        sizes = TwinSizes(params=hw.params, hidden=hw.hidden, experts=hw.experts,
                          top_k=hw.top_k, slots=hw.slots, shared=hw.shared,
                          shared_gate=hw.shared_gate, layers=hw.layers, macs=hw.macs)
        del hw
        gc.collect()                   # it is in reference cycles: collected inside the filter
    return sizes


def twin_for_layers(int_layers, *, num_layers, options=None, clock_hz=24_000_000):
    """The :class:`BoardTop` for a model's quantized MoE layers (``int_layers``, a mapping of
    layer index to :class:`~moefpga.hls_models.intmodel.IntLayer`), sized as
    :func:`.sim.hardware_for` sizes the sim backend's top (``options``: lanes, T_max, slots,
    router MACs); every layer must need the same hardware."""
    layers = [twin_sizes(_shapes_of(layer), _spec_of(layer), num_layers=num_layers,
                         options=options) for layer in int_layers.values()]

    def shape(sizes):
        p = sizes.params
        return (p.lanes, p.m, p.engine.n, p.engine.weight_bits, p.group_size, p.max_tokens,
                p.hidden, p.ffn, p.acc_bits, sizes.hidden, sizes.experts, sizes.top_k,
                sizes.shared, sizes.shared_gate)

    first = layers[0]
    for index, other in zip(int_layers, layers, strict=True):
        if shape(other) != shape(first):
            raise MoefpgaError(f"MoE layer {index} needs other hardware than the first; one "
                               "board top serves every layer")
    return _board_top(first.params, hidden=first.hidden, experts=first.experts,
                      top_k=first.top_k, slots=first.slots, shared=first.shared,
                      shared_gate=first.shared_gate, layers=first.layers, macs=first.macs,
                      clock_hz=clock_hz)


def build(top, progress=None):
    """The twin's executable for ``top`` (a :class:`BoardTop`), built unless cached."""
    from amaranth.back import verilog

    if progress:
        progress("generating the Verilog of the board top...")
    text = verilog.convert(top, name=TOP, emit_src=False)
    return build_executable(text, TOP, {_DRIVER.name: _DRIVER.read_text()},
                            defines=[f"DIVISOR={TWIN_DIVISOR}"], progress=progress)


class BoardSim:
    """A running twin: starts ``executable`` and waits (at most ``timeout`` seconds) for its
    pseudo-terminal, whose path is :attr:`port`. :meth:`stop` ends it and returns its
    summary (``cycles``, ``rx_bytes``, ``tx_bytes``, ``tx_framing_errors``). A context manager.

    Raises
    ------
    MoefpgaError
        The twin does not start, fails, or prints no pseudo-terminal within ``timeout``.
    """

    def __init__(self, executable, timeout=START_TIMEOUT):
        try:
            self._process = subprocess.Popen([str(executable)], stdin=subprocess.DEVNULL,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True)
        except OSError as error:
            raise MoefpgaError(f"cannot start the board twin {executable}: "
                               f"{error.strerror}") from None
        self._stderr = []
        self.summary = None
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()
        self.port = self._read_port(timeout)

    def _drain(self):
        for line in self._process.stderr:
            self._stderr.append(line.strip())

    def _read_port(self, timeout):
        line = []
        reader = threading.Thread(target=lambda: line.append(self._process.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        if not line or not line[0].startswith("pty "):
            self.stop()
            detail = self.error or f"no pseudo-terminal within {timeout:g} s"
            raise MoefpgaError(f"the board twin did not start: {detail}")
        return line[0].split(maxsplit=1)[1].strip()

    def stop(self, timeout=10.0):
        """End the twin (SIGTERM, then SIGKILL after ``timeout`` s); its summary, or None."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._drainer.join(timeout)          # standard error ends with the process
        line = next((line for line in self._stderr if line.startswith("cycles ")), None)
        if line:
            fields = line.split()
            self.summary = {k: int(v) for k, v in zip(fields[::2], fields[1::2], strict=True)}
        return self.summary

    @property
    def pid(self):
        """The twin's process id."""
        return self._process.pid

    @property
    def error(self):
        """The twin's last ``error: ...`` line, or None."""
        return next((line for line in reversed(self._stderr) if line.startswith("error:")),
                    None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

