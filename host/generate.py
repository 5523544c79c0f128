"""Whole-model inference: ``moefpga logits`` and ``moefpga generate``, and the MoE backends.

The host runs the transformer of :mod:`moefpga.hls_models.transformer` in NumPy and hands every
MoE layer to a backend (docs/inference.md). A backend is a :class:`MoEBackend`: built once for a
checkpoint and a :class:`QuantSpec`, it prepares every MoE layer before the first token (so bad
shapes are refused before any work) and exposes one callable per layer. The accelerator backends
subclass :class:`ModelBackend` through :class:`AcceleratorBackend`, overriding
:meth:`AcceleratorBackend.run_hardware`, and report their counters at the end of the run
(:class:`HardwareTally`); ``sim`` runs each layer on the Verilated MoE layer top.
"""

import contextlib
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ..hls_models import intmodel
from ..hls_models.calibrate import QuantSpec, prune_layer, quantize_layer
from ..hls_models.checkpoint import Checkpoint
from ..hls_models.errors import MoefpgaError
from ..hls_models.quant import GROUP_SIZES, quantize_activations
from ..hls_models.transformer import (
    MoEFunction,
    Transformer,
    check_ids,
    check_supported,
    generate,
    load_weights,
)
from .backend_options import (
    BAUD,
    SIM_CLOCK_MHZ,
    BackendOptions,
    add_backend_options,
    backend_options,
)
from .cli import (
    _positive_int,
    _progress,
    _spec_from_args,
    _warn_rails,
    check_output,
    check_run,
    default_calibration,
    run_layer,
    save_array,
)
from .extras import require
from .pack import pack_layer
from .sim_options import SimOptions

__all__ = ["MoEBackend", "ReferenceBackend", "ModelBackend", "AcceleratorBackend", "SimBackend",
           "BoardBackend", "BoardSimBackend", "SerialBackend", "HardwareTally", "BACKENDS",
           "SIM_CLOCK_MHZ", "backend_class",
           "make_backend", "add_commands", "load_ids", "parse_ids",
           "stop_ids", "load_tokenizer"]


class MoEBackend:
    """The MoE layers of one model on one backend.

    Contract: the constructor prepares every MoE layer of ``checkpoint`` under ``spec`` and
    raises :class:`MoefpgaError` for anything it cannot run, before any token runs.
    ``layers[i]`` is the :data:`MoEFunction` of decoder layer ``i``: float32 ``(T, d)``
    normalized hidden states in, float32 ``(T, d)`` out. The transformer calls the layers in
    order, with all prompt tokens at once (prefill), then with one token at a time (decode).
    :meth:`finish` ends a run that went well: it reports on standard error. :meth:`close`
    releases what the backend holds (a device session); call it however the run ends.
    """

    name = ""

    def __init__(self, checkpoint: Checkpoint, spec: QuantSpec):
        self.spec = spec
        self.layers: dict[int, MoEFunction] = {
            i: self._layer(checkpoint, i) for i in checkpoint.config.moe_layers}

    def _layer(self, checkpoint: Checkpoint, index: int) -> MoEFunction:
        raise NotImplementedError

    def describe(self) -> str:
        """The numerics of the run, for the progress line."""
        return str(self.spec)

    def finish(self) -> None:
        """End of run: nothing to report by default."""

    def close(self) -> None:
        """Release what the backend holds: nothing by default. Safe to call twice."""


class ReferenceBackend(MoEBackend):
    """The float reference MoE (:mod:`moefpga.hls_models.reference`), on the experts pruned
    M:N once when ``spec.sparsity`` asks for it; the quantization settings do not apply."""

    name = "reference"

    def _layer(self, checkpoint, index):
        weights = checkpoint.moe_layer(index)
        check_run(weights, self.name, self.spec, None)
        pruned = prune_layer(weights, self.spec.sparsity)
        # Pruned already: run_layer's dense spec runs the reference on them as they are.
        return lambda x: run_layer(pruned, x, self.name, QuantSpec(), None)

    def describe(self):
        return f"float32 {self.spec.sparsity}"


class ModelBackend(MoEBackend):
    """The bit-accurate integer model, as ``moefpga run --backend model`` runs one layer.

    Each layer is pruned, quantized and calibrated once (on the synthetic RMSNorm-shaped tokens
    ``run`` uses by default); on each call the tokens become int16 with a power-of-two scale per
    token, :meth:`run_integer` gives the int32 outputs, and those are scaled back to float32.
    """

    name = "model"

    def __init__(self, checkpoint, spec):
        self.rails = Counter()
        self.int_layers = {}
        super().__init__(checkpoint, spec)

    def _layer(self, checkpoint, index):
        weights = checkpoint.moe_layer(index)
        calibration = default_calibration(checkpoint, index)
        check_run(weights, self.name, self.spec, calibration)
        self._fit(index, weights)
        int_layer = self.int_layers[index] = quantize_layer(weights, self.spec, calibration)

        def moe(x):
            xq, exp = quantize_activations(x)
            y = self.run_integer(index, int_layer, xq, exp)
            return (y * int_layer.out_scale).astype(np.float32)
        return moe

    def _fit(self, index, weights):
        """Refuse layer ``index`` if this backend cannot run it (before it is quantized)."""

    def run_integer(self, index, int_layer, xq, exp):
        """int32 outputs ``(T, d)`` of MoE layer ``index`` for int16 tokens ``xq`` with
        exponents ``exp``; the accelerator backends override this with the hardware."""
        return intmodel.moe_layer(xq, exp, int_layer, rails=self.rails)

    def finish(self):
        _warn_rails(self.rails)


class HardwareTally:
    """The accelerator's counters summed over a run, apart for prefill and decode.

    The first call of each MoE layer is its prefill (all prompt tokens); later calls decode
    (one token each). :meth:`add` takes a call's token count and counters (``cycles``,
    ``compute``, ``stall``, ``loads``, ``hits``, ``batches`` and, where the hardware counts
    them, ``multiplies``, ``bytes_min`` and ``bytes_max`` (bounds of the bytes streamed),
    ``picks``, ``predicted_correct`` and ``prefetches``).
    """

    PHASES = ("prefill", "decode")

    def __init__(self, layers: int):
        self.layers = layers
        self.seen: set[int] = set()
        self.tokens = Counter()                       # token-layer passes per phase
        self.counts = {phase: Counter() for phase in self.PHASES}

    def add(self, layer: int, tokens: int, counts: dict) -> None:
        phase = "decode" if layer in self.seen else "prefill"
        self.seen.add(layer)
        self.tokens[phase] += tokens
        self.counts[phase].update(counts)

    def report(self, title: str, clock_hz: float, clock_source: str,
               multipliers: int | None = None, prediction: str = "") -> str:
        """Lines for standard error: per phase the tokens, cycles per token per layer and
        tokens per second at ``clock_hz`` (from ``clock_source``; MoE layers only); then over
        the run the shares of cycles computing and stalled, multiplier use (``multiplies`` over
        ``cycles`` times ``multipliers``), loads, hits, hit rate, bytes streamed and
        ``prediction`` (else the next-layer picks that were predicted, and the prefetches)."""
        lines = [f"{title}: the MoE layers' cycles at {clock_hz / 1e6:g} MHz ({clock_source}); "
                 "host work (attention, norms, LM head) not counted"]
        for phase in self.PHASES:
            passes, c = self.tokens[phase], self.counts[phase]
            if not passes:
                continue
            tokens, cycles = passes // self.layers, c["cycles"]
            rate = f"{tokens * clock_hz / cycles:,.1f} tokens/s" if cycles else "no cycles"
            lines.append(f"  {phase:<8}{tokens} tokens x {self.layers} MoE layers, "
                         f"{c['batches']} batches: {cycles:,} cycles, "
                         f"{cycles / passes:,.0f} per token per layer; {rate}")
        total = sum(self.counts.values(), Counter())
        cycles = max(total["cycles"], 1)
        use = (f"; multipliers busy {total['multiplies'] / (cycles * multipliers):.1%} "
               f"({total['multiplies']:,} multiplies, {multipliers} multipliers)"
               if multipliers and "multiplies" in total else "")
        lines.append(f"  cycles  computing {total['compute'] / cycles:.1%}, stalled on expert "
                     f"loads {total['stall'] / cycles:.1%}{use}")
        lookups = total["loads"] + total["hits"]
        rate = f"hit rate {total['hits'] / lookups:.1%}" if lookups else "no lookups"
        lines.append(f"  experts {total['loads']:,} loads, {total['hits']:,} hits: {rate}; "
                     + _bytes(total))
        if not prediction:
            right = (f"{total['predicted_correct'] / total['picks']:.1%}" if total["picks"]
                     else "-")
            prediction = (f"accuracy {right} ({total['predicted_correct']:,} of "
                          f"{total['picks']:,} next-layer picks predicted); "
                          f"{total['prefetches']:,} records prefetched")
        lines.append("  predict " + prediction)
        return "\n".join(lines)


def _bytes(total):
    """Bytes streamed: ``bytes_min`` when it equals ``bytes_max``, else the two bounds."""
    if total["bytes_min"] != total["bytes_max"]:
        return (f"{total['bytes_min']:,} to {total['bytes_max']:,} bytes streamed (records "
                "differ in size and the hardware counts loads, not bytes)")
    return f"{total['bytes_min']:,} bytes streamed"


class AcceleratorBackend(ModelBackend):
    """The integer model's quantized layers run on an accelerator, with its counters tallied.

    Subclasses implement :meth:`run_hardware` and :meth:`report`; :meth:`finish` prints the
    report on standard error.
    """

    def __init__(self, checkpoint, spec):
        self.tally = HardwareTally(len(checkpoint.config.moe_layers))
        super().__init__(checkpoint, spec)

    @classmethod
    def check_available(cls) -> None:
        """Refuse, before any work, a backend whose tools are not installed."""

    def run_integer(self, index, int_layer, xq, exp):
        outputs, counts = self.run_hardware(index, int_layer, xq, exp)
        self.tally.add(index, len(xq), counts)
        return outputs

    def run_hardware(self, index, int_layer, xq, exp) -> tuple[np.ndarray, dict]:
        """The int32 outputs of :meth:`ModelBackend.run_integer` from the hardware, and the
        call's counters (see :class:`HardwareTally`)."""
        raise NotImplementedError

    def report(self) -> str:
        raise NotImplementedError

    def finish(self):
        super().finish()
        if self.tally.seen:
            _progress(self.report())


def _sim_module():
    """``host.sim``, after checking that Verilator is installed; a MoefpgaError otherwise."""
    return require("sim", "the sim backend", verilator=True)


class SimBackend(AcceleratorBackend):
    """Every MoE layer on the Verilated MoE layer top of ``moefpga run --backend sim``.

    One hardware configuration (:func:`host.sim.hardware_for`, from ``options``) serves every
    layer; it is built (or taken from the cache) once, after every layer has been sized and
    quantized. Each call is one simulation: the tokens in batches of at most
    ``options.max_tokens``, the slots empty at its start. Cycles become time at ``clock_hz``.
    """

    name = "sim"

    def __init__(self, checkpoint, spec, options: SimOptions | None = None,
                 clock_hz: float = SIM_CLOCK_MHZ * 1e6):
        self.sim = _sim_module()
        self.options, self.clock_hz = options or SimOptions(), clock_hz
        self.num_layers = checkpoint.config.num_layers
        self.hardware = None
        self.record_sizes: dict[int, list[int]] = {}
        super().__init__(checkpoint, spec)
        self.executable = self.sim.build(self.hardware, _progress)

    @classmethod
    def check_available(cls):
        _sim_module()

    @classmethod
    def from_options(cls, checkpoint, spec, options: BackendOptions):
        return cls(checkpoint, spec, options.sim, clock_hz=options.clock_mhz * 1e6)

    def _fit(self, index, weights):
        # Every MoE layer has the checkpoint's sizes (checked on reading), so the hardware
        # sized for the first serves all.
        if self.hardware is None:
            self.hardware = self.sim.hardware_for(weights, self.spec, num_layers=self.num_layers,
                                                  options=self.options)

    def run_hardware(self, index, int_layer, xq, exp):
        result = self.sim.run_layer(self.executable, self.hardware, int_layer, index, xq, exp)
        if index not in self.record_sizes:
            records = pack_layer(int_layer, index, self.hardware.params)
            self.record_sizes[index] = [len(record) for record in records]
        sizes = self.record_sizes[index]
        loads = result.counters["loads"]
        return result.outputs, {**result.counters, "batches": result.batches,
                                "bytes_min": loads * min(sizes), "bytes_max": loads * max(sizes)}

    def describe(self):
        p = self.hardware.params
        return (f"{self.spec}; simulated top with {p.lanes} lanes of {p.engine.n}:{p.m}, "
                f"T_max {p.max_tokens}, {self.hardware.slots} slots")

    def report(self):
        p = self.hardware.params
        return self.tally.report(
            "sim", self.clock_hz, "--clock-mhz; default the iCEBreaker board top's clock",
            multipliers=p.lanes * p.engine.n,
            prediction="none: the host does not prefetch on this backend, and each call "
                       "starts with empty slots")


class BoardBackend(AcceleratorBackend):
    """Every MoE layer on a board top through the host link (:mod:`.accelerator`): a board on
    a serial port (``serial``) or its Verilator twin (``board-sim``).

    The session opens after every layer is quantized (the device must fit them all, its
    IDENTIFY is checked) and stays open for the run; the host's slot mirror and predictor
    (``policy``, ``predictor``) send prefetches. Cycles become time at the clock the device
    reports in IDENTIFY. :meth:`close` ends the session (and stops the twin).
    """

    def __init__(self, checkpoint, spec, *, port=None, baud=BAUD, board=None, options=None,
                 policy="lru", predictor="none"):
        from .accelerator import open_accelerator  # needs the simulation extras (amaranth)

        self.options, self.board = options, board
        self.num_layers = checkpoint.config.num_layers
        self.predictor = predictor
        super().__init__(checkpoint, spec)
        self._session = contextlib.ExitStack()
        with self._session:                       # closed here only if opening fails
            self.accelerator = self._session.enter_context(open_accelerator(
                self.name, self.int_layers, num_layers=self.num_layers, port=port, baud=baud,
                board=board, options=options, policy=policy, predictor=predictor,
                progress=_progress))
            self._session = self._session.pop_all()

    @classmethod
    def check_available(cls):
        # The twin also needs Verilator.
        require("accelerator", f"the {cls.name} backend", verilator=cls.name == "board-sim")

    @classmethod
    def from_options(cls, checkpoint, spec, options: BackendOptions):
        return cls(checkpoint, spec, port=options.port, baud=options.baud, board=options.board,
                   options=options.sim, policy=options.policy, predictor=options.predictor)

    def run_hardware(self, index, int_layer, xq, exp):
        before = self.accelerator.stats
        outputs = self.accelerator.run_layer(index, xq, exp)
        after = self.accelerator.stats
        counts = {name: getattr(after, name) - getattr(before, name) for name in _SESSION_COUNTS}
        counts["bytes_min"] = counts["bytes_max"] = counts.pop("bytes_streamed")
        return outputs, counts

    def describe(self):
        i = self.accelerator.identity
        return (f"{self.spec}; device with {i.lanes} lanes of {i.n}:{i.m}, T_max "
                f"{i.max_tokens}, {i.slots} slots, clock {i.clock_hz / 1e6:g} MHz")

    def report(self):
        prediction = ("none (--predictor none): only demanded records are streamed"
                      if self.predictor == "none" else "")
        stats = self.accelerator.stats
        return (self.tally.report(self.name, self.accelerator.identity.clock_hz,
                                  self._clock_source(), prediction=prediction)
                + f"\n  link    {stats.requests:,} records requested, {stats.resent:,} frames "
                f"resent, {stats.bad_frames:,} broken frames received")

    def _clock_source(self):
        return ("the clock the device reports in IDENTIFY; records arrive over its serial "
                "link during the cycles")

    def close(self):
        self._session.close()


#: The :class:`~.accelerator.AcceleratorStats` counters a :class:`BoardBackend` tallies.
_SESSION_COUNTS = ("cycles", "compute", "stall", "loads", "hits", "batches", "bytes_streamed",
                   "picks", "predicted_correct", "prefetches")


class BoardSimBackend(BoardBackend):
    """The board top's Verilator twin on a pseudo-terminal; sized as the ``sim`` backend's
    top (``--lanes``, ``--max-tokens``, ``--slots``) unless ``--board`` names a board."""

    name = "board-sim"

    def _clock_source(self):
        from .board_sim import TWIN_DIVISOR

        board = self.accelerator.identity.clock_hz / BAUD
        return (f"the clock the twin reports in IDENTIFY; its UART sends a bit in "
                f"{TWIN_DIVISOR} cycles, a board's at {BAUD} baud in {board:.0f}, so records "
                f"arrive {board / TWIN_DIVISOR:.0f} times faster than on the board and the "
                "stalls are the twin's")

    def _fit(self, index, weights):
        # The twin is sized as the sim backend's top; sizing the first layer refuses shapes
        # it cannot take before anything is quantized.
        if self.board is None and not self.int_layers:
            from .board_sim import twin_sizes

            twin_sizes(weights, self.spec, num_layers=self.num_layers, options=self.options)


class SerialBackend(BoardBackend):
    """A board on ``--port``."""

    name = "serial"


BACKENDS = {backend.name: backend for backend in (ReferenceBackend, ModelBackend, SimBackend,
                                                  BoardSimBackend, SerialBackend)}


def backend_class(name: str) -> type[MoEBackend]:
    """The backend called ``name``; a MoefpgaError if its tools are not installed."""
    cls = BACKENDS[name]
    if issubclass(cls, AcceleratorBackend):
        cls.check_available()
    return cls


def make_backend(cls, checkpoint, spec, options: BackendOptions | None = None) -> MoEBackend:
    """Backend ``cls`` for ``checkpoint`` under ``spec``, with the accelerator ``options`` it
    takes (checked by :func:`.backend_options.backend_options`), or its defaults when
    ``options`` is None."""
    from_options = getattr(cls, "from_options", None)
    if from_options is None or options is None:
        return cls(checkpoint, spec)
    return from_options(checkpoint, spec, options)


def parse_ids(text: str) -> np.ndarray:
    """Token ids from ``1,2,3``."""
    try:
        return np.array([int(part) for part in text.split(",")], dtype=np.int64)
    except ValueError:
        raise MoefpgaError(f"--prompt-ids takes comma-separated token ids, not {text!r}") \
            from None


def load_ids(path: str | Path) -> np.ndarray:
    """A 1-D integer array of token ids from a ``.npy`` file, or a MoefpgaError."""
    path = Path(path)
    if not path.is_file():
        raise MoefpgaError(f"ids file {path} does not exist or is not a file")
    try:
        ids = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise MoefpgaError(f"ids file {path} is not a readable .npy array ({exc})") from None
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise MoefpgaError(f"ids {path} hold {ids.dtype} of shape {list(ids.shape)}; expected a "
                           "non-empty 1-D array of integer token ids")
    return ids.astype(np.int64)


def stop_ids(config) -> frozenset[int]:
    """The ``eos_token_id`` of ``config.json`` (one id or a list), empty when it has none."""
    value = config.raw.get("eos_token_id")
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise MoefpgaError(f"config.json: 'eos_token_id' must be a token id or a list of them, "
                           f"not {value!r}")
    return frozenset(values)


def load_tokenizer(folder: Path):
    """The folder's ``tokenizer.json`` as a ``tokenizers.Tokenizer``; None (with a warning when
    the file exists) when there is none or the ``tokenizers`` package cannot read it."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer  # imported only when a tokenizer is there to read
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers package raises plain Exception for a bad file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        _progress(f"moefpga: warning: {path} is not readable by the tokenizers package "
                  f"({reason}); printing token ids only")
        return None


def _open_checkpoint(args):
    """The backend class, its options and the checkpoint, refusing options the backend does
    not take, a backend whose tools are missing or an unsupported model before anything is
    read beyond ``config.json`` and the shard headers."""
    options = backend_options(args, args.backend)
    cls = backend_class(args.backend)
    checkpoint = Checkpoint.open(args.checkpoint)
    check_supported(checkpoint.config)
    return cls, options, checkpoint


@contextlib.contextmanager
def _model(cls, options, checkpoint, args):
    """The transformer around the MoE layers of backend ``cls`` (with ``options``), and the
    backend, which is closed (an accelerator session ended, a twin stopped) however the
    ``with`` block ends."""
    weights = load_weights(checkpoint)
    backend = make_backend(cls, checkpoint, _spec_from_args(args), options)
    with contextlib.closing(backend):
        _progress(f"{len(backend.layers)} MoE layers ready on backend {args.backend}, "
                  f"{backend.describe()}")
        yield Transformer(checkpoint.config, weights, backend.layers), backend


def cmd_logits(args):
    check_output(args.output)
    ids = load_ids(args.ids)
    cls, options, checkpoint = _open_checkpoint(args)
    check_ids(ids, checkpoint.config)
    with _model(cls, options, checkpoint, args) as (model, backend):
        logits = model.forward(ids)
        backend.finish()
    save_array(args.output, logits)
    print(f"wrote {args.output}: {logits.shape[0]} x {logits.shape[1]} float32")


def cmd_generate(args):
    prompt = parse_ids(args.prompt_ids)
    cls, options, checkpoint = _open_checkpoint(args)
    check_ids(prompt, checkpoint.config, extra=args.max_new_tokens)
    stops = stop_ids(checkpoint.config)
    tokenizer = load_tokenizer(checkpoint.path)
    with _model(cls, options, checkpoint, args) as (model, backend):
        print("prompt ids " + " ".join(map(str, prompt)))
        print("new ids   ", end="", flush=True)
        new, times = [], [time.perf_counter()]
        for token in generate(model, prompt, args.max_new_tokens, stops):
            print(f" {token}", end="", flush=True)
            new.append(token)
            times.append(time.perf_counter())
        print()
        if tokenizer is not None:
            print(f"new text   {tokenizer.decode(new)}")
        backend.finish()
    _progress(_timing(len(prompt), times))


def _timing(prompt_len, times):
    """``prefill ... s; decode ... tokens/s`` from the start time and each token's time."""
    line = f"prefill of {prompt_len} tokens and the first new one: {times[1] - times[0]:.3f} s"
    decoded = len(times) - 2
    if decoded:
        seconds = times[-1] - times[1]
        line += (f"; {decoded} more tokens in {seconds:.3f} s "
                 f"({decoded / seconds:.1f} tokens/s, host time)")
    return line


def _backend_args(p):
    p.add_argument("--backend", choices=BACKENDS, default="model",
                   help="where the MoE layers run (default model)")
    p.add_argument("--quant", choices=("int8", "int4"), default="int8")
    p.add_argument("--group-size", type=int, metavar="G",
                   help=f"weights per scale ({', '.join(map(str, GROUP_SIZES))}); "
                        "default: one scale per output channel")
    p.add_argument("--sparsity", default="dense", help="dense or N:M, e.g. 2:4 (default dense)")


def add_commands(sub, checkpoint_arg):
    """Add ``logits`` and ``generate`` to the ``moefpga`` subcommands ``sub``;
    ``checkpoint_arg(parser)`` adds the ``--checkpoint`` option."""
    p = sub.add_parser("logits", help="logits of one forward pass of the whole model")
    checkpoint_arg(p)
    p.add_argument("--ids", required=True, metavar="IDS.npy", help="1-D integer token ids")
    p.add_argument("--output", required=True, metavar="LOGITS.npy",
                   help="float32 logits, tokens x vocab")
    _backend_args(p)
    add_backend_options(p)
    p.set_defaults(func=cmd_logits)

    p = sub.add_parser("generate", help="greedy generation with a KV cache")
    checkpoint_arg(p)
    p.add_argument("--prompt-ids", required=True, metavar="ID,ID,...",
                   help="the prompt's token ids, comma-separated")
    p.add_argument("--max-new-tokens", type=_positive_int, required=True, metavar="N",
                   help="tokens to generate (fewer if one is the config's eos_token_id)")
    _backend_args(p)
    add_backend_options(p)
    p.set_defaults(func=cmd_generate)
