"""The options of the accelerator backends, defined once for ``run``, ``logits``, ``generate``
and ``eval --whole-model``, and the one place that decides which backend takes which.

:func:`add_backend_options` adds them to a parser with no argparse default, so an option the
user gives is told apart from one left out, even when its value is the default.
:func:`backend_options` refuses, before any work, every option given that the chosen backend does
not take (naming the option and the backends it is for), and returns the values as
:class:`BackendOptions`, defaults filled in.
"""

import argparse
from dataclasses import dataclass, fields

from ..hls_models.errors import MoefpgaError
from .cli import _positive_int
from .expert_cache import POLICIES
from .predictor import PREDICTORS
from .sim_options import SimOptions

__all__ = ["BAUD", "SIM_CLOCK_MHZ", "BackendOptions", "add_backend_options", "backend_options"]

#: The sim backend's default clock: the iCEBreaker board top's PLL clock (docs/boards.md).
SIM_CLOCK_MHZ = 24.0
#: The serial link's default baud rate (docs/link.md).
BAUD = 115200

#: Backends whose hardware the options size (board-sim only without --board).
_SIZED = ("sim", "board-sim")
#: Backends that talk to a board top over the host link.
_LINKED = ("board-sim", "serial")


@dataclass(frozen=True)
class BackendOptions:
    """The accelerator options of one run, each the user's value or its default."""
    lanes:      int = SimOptions.lanes
    max_tokens: int = SimOptions.max_tokens
    slots:      int = SimOptions.slots
    clock_mhz:  float = SIM_CLOCK_MHZ
    port:       str | None = None
    baud:       int = BAUD
    board:      str | None = None
    policy:     str = "lru"
    predictor:  str = "none"

    @property
    def sim(self) -> SimOptions:
        """The hardware choices of the simulated top (``--lanes``, ``--max-tokens``,
        ``--slots``)."""
        return SimOptions(lanes=self.lanes, max_tokens=self.max_tokens, slots=self.slots)


def _positive_mhz(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of MHz, not {text!r}")
    return value


@dataclass(frozen=True)
class _Option:
    """One option: its flag, the backends that take it, and argparse's ``add_argument``
    keywords (its ``help`` without the backends and the default, which are added)."""
    flag:     str
    backends: tuple[str, ...]
    argparse: dict

    @property
    def dest(self):
        return self.flag[2:].replace("-", "_")

    @property
    def default(self):
        return {f.name: f.default for f in fields(BackendOptions)}[self.dest]


_OPTIONS = (
    _Option("--lanes", _SIZED, dict(type=_positive_int, metavar="P", help="engine lanes P")),
    _Option("--max-tokens", _SIZED,
            dict(type=_positive_int, metavar="T", help="largest batch T_max")),
    _Option("--slots", _SIZED, dict(type=_positive_int, metavar="S", help="on-chip expert slots")),
    _Option("--clock-mhz", ("sim",),
            dict(type=_positive_mhz, metavar="F",
                 help="the clock that turns simulated cycles into time (the iCEBreaker board "
                      "top's)")),
    _Option("--port", ("serial",), dict(help="the board's serial port, e.g. /dev/ttyUSB1")),
    _Option("--baud", ("serial",), dict(type=_positive_int, metavar="B",
                                        help="the link's baud rate")),
    _Option("--board", ("board-sim",),
            dict(metavar="NAME|FILE", help="the twin of this board (a name or board YAML) "
                                           "instead of one sized by --lanes, --max-tokens, "
                                           "--slots")),
    _Option("--policy", _LINKED, dict(choices=tuple(POLICIES),
                                      help="the host's slot replacement policy")),
    _Option("--predictor", _LINKED, dict(choices=PREDICTORS,
                                         help="the next-layer predictor that prefetches")),
)
#: The options that size the hardware, which a board named by --board fixes.
_SIZING = ("lanes", "max_tokens", "slots")


def add_backend_options(parser, *, clock=True):
    """Add the accelerator options to ``parser`` (``--clock-mhz`` only with ``clock``: ``run``
    turns no cycles into time)."""
    for option in _OPTIONS:
        if option.flag == "--clock-mhz" and not clock:
            continue
        default = "" if option.default is None else f" (default {option.default})"
        kwargs = dict(option.argparse, help=f"{', '.join(option.backends)}: "
                                            f"{option.argparse['help']}{default}")
        parser.add_argument(option.flag, default=None, **kwargs)


def backend_options(args, backend, *, where="") -> BackendOptions:
    """The accelerator options in ``args`` (parsed by a parser of :func:`add_backend_options`)
    for backend ``backend``, defaults filled in.

    Raises :class:`MoefpgaError`, before any work, for an option given that ``backend`` does
    not take (``--port is for --backend serial, not model``; ``backend`` None, for a command
    that runs none, refuses every option given, prefixing the backends with ``where``), for
    ``--lanes``, ``--max-tokens`` or ``--slots`` given with ``--board``, and for ``serial``
    without ``--port``.
    """
    given = {o.dest: getattr(args, o.dest) for o in _OPTIONS
             if getattr(args, o.dest, None) is not None}
    for option in _OPTIONS:
        if option.dest in given and backend not in option.backends:
            names = " and ".join(option.backends)
            refused = f", not {backend}" if backend else ""
            raise MoefpgaError(f"{option.flag} is for {where}--backend {names}{refused}")
    if "board" in given:
        for option in _OPTIONS:
            if option.dest in _SIZING and option.dest in given:
                raise MoefpgaError(f"{option.flag} does not apply with --board: the board's "
                                   "YAML fixes the hardware")
    if backend == "serial" and "port" not in given:
        raise MoefpgaError("--backend serial needs --port (the board's serial port)")
    return BackendOptions(**given)
