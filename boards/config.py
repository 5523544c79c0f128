"""Board configuration files: one YAML file per board under ``boards/``, loaded and validated.

A file names the board's amaranth-boards platform, the target clock, the accelerator's
parameters (lanes, M:N, weight bits, group size, slots, largest batch, memory kind) and the
place-and-route options. docs/boards.md lists the keys.
"""

import dataclasses
from pathlib import Path

import yaml

from ..hls_models.synthetic import DEFAULT_MODEL
from ..rtl.expert_ffn_params import ExpertFfnParams

__all__ = ["BoardError", "BoardConfig", "BOARDS_DIR", "board_names", "load_board"]

#: The folder holding the boards' YAML files.
BOARDS_DIR = Path(__file__).resolve().parent

#: Memory kinds for the expert slots, per FPGA family.
MEMORY_KINDS = {"ice40": ("spram", "ebr"), "ecp5": ("ebr",)}


class BoardError(Exception):
    """A board configuration or build failed; the message is meant for the user as is."""


@dataclasses.dataclass(frozen=True)
class BoardConfig:
    """One board's build configuration (the keys of its YAML file).

    Attributes
    ----------
    name : str
        The board's name, also the YAML file's stem and the build folder's name.
    platform : str
        ``module:Class`` of the amaranth-boards platform, e.g.
        ``amaranth_boards.icebreaker:ICEBreakerPlatform``.
    family : str
        ``ice40`` or ``ecp5``.
    target_mhz : float
        The clock the design must meet; the PLL makes it from the board's oscillator.
    lanes, m, n, weight_bits, group_size, acc_bits, max_tokens : int
        The expert FFN's parameters (:class:`moefpga.rtl.expert_ffn_params.ExpertFfnParams`).
    slots : int
        On-chip expert slots.
    router_macs : int
        Multiply-accumulate units of the router.
    memory : str
        Where the expert slots live: ``spram`` or ``ebr`` (iCE40), ``ebr`` (ECP5).
    baud : int
        The UART's baud rate.
    ack_timeout_ms : int
        The host link's wait for an acknowledgement before it resends a frame.
    seed : int
        nextpnr's placement seed.
    nextpnr_options : tuple of str
        Extra nextpnr arguments.
    timeout_s : int
        Longest run of one tool, in seconds, before the build fails.
    """

    name: str
    platform: str
    family: str
    target_mhz: float
    lanes: int
    m: int
    n: int
    weight_bits: int
    group_size: int
    max_tokens: int
    slots: int
    memory: str
    seed: int
    baud: int = 115200
    ack_timeout_ms: int = 100
    acc_bits: int = 40
    router_macs: int = 1
    nextpnr_options: tuple = ()
    timeout_s: int = 1800

    def ffn_kwargs(self, model=DEFAULT_MODEL):
        """The :class:`ExpertFfnParams` arguments that hold ``model``'s experts."""
        return dict(lanes=self.lanes, m=self.m, n=self.n, weight_bits=self.weight_bits,
                    group_size=self.group_size, max_tokens=self.max_tokens,
                    hidden=model["hidden_size"],
                    ffn=max(model["expert_ffn_size"], model["shared_expert_ffn_size"]),
                    acc_bits=self.acc_bits)


_INTS = ("lanes", "m", "n", "weight_bits", "group_size", "max_tokens", "slots", "seed", "baud",
         "ack_timeout_ms", "acc_bits", "router_macs", "timeout_s")


def _check(name, raw, source):
    """A :class:`BoardConfig` from the mapping ``raw`` read from ``source``; every problem is a
    :class:`BoardError` naming the file and the key."""
    if not isinstance(raw, dict):
        raise BoardError(f"{source}: expected a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(BoardConfig)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise BoardError(f"{source}: unknown key(s) {', '.join(unknown)}")
    values = {"name": name, **raw}
    missing = [key for key, f in fields.items()
               if key not in values and f.default is dataclasses.MISSING]
    if missing:
        raise BoardError(f"{source}: missing key(s) {', '.join(missing)}")
    for key in _INTS:
        if key in values and (type(values[key]) is not int or values[key] < 0
                              or values[key] == 0 and key != "seed"):
            raise BoardError(f"{source}: {key} must be a positive integer, not "
                             f"{values[key]!r}")
    target = values["target_mhz"]
    if type(target) not in (int, float) or not 0 < target <= 500:
        raise BoardError(f"{source}: target_mhz must be a number in (0, 500], not {target!r}")
    family = values["family"]
    if family not in MEMORY_KINDS:
        raise BoardError(f"{source}: family must be one of {', '.join(MEMORY_KINDS)}, "
                         f"not {family!r}")
    if values["memory"] not in MEMORY_KINDS[family]:
        raise BoardError(f"{source}: memory must be one of {', '.join(MEMORY_KINDS[family])} "
                         f"on {family}, not {values['memory']!r}")
    if not isinstance(values["platform"], str) or values["platform"].count(":") != 1:
        raise BoardError(f"{source}: platform must be 'module:Class', not "
                         f"{values['platform']!r}")
    options = values.get("nextpnr_options", [])
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise BoardError(f"{source}: nextpnr_options must be a list of strings")
    values["nextpnr_options"] = tuple(options)
    config = BoardConfig(**values)
    try:
        ExpertFfnParams(**config.ffn_kwargs())
    except (TypeError, ValueError) as exc:
        raise BoardError(f"{source}: the accelerator parameters do not hold the default "
                         f"model: {exc}") from None
    return config


def board_names():
    """The names of the boards with a YAML file in :data:`BOARDS_DIR`, sorted."""
    return sorted(path.stem for path in BOARDS_DIR.glob("*.yaml"))


def load_board(board):
    """The :class:`BoardConfig` of ``board``: a board name (``boards/<board>.yaml``) or the
    path of a YAML file.

    Raises
    ------
    BoardError
        If there is no such board or file, it is not valid YAML, or a key is missing, unknown
        or out of range.
    """
    path = Path(board)
    if path.suffix not in (".yaml", ".yml"):
        path = BOARDS_DIR / f"{board}.yaml"
        if not path.is_file():
            raise BoardError(f"unknown board {board!r}; known boards: "
                             f"{', '.join(board_names()) or 'none'}")
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise BoardError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise BoardError(f"{path}: not valid YAML ({exc})") from None
    return _check(path.stem, raw, path)
