"""Whole-model inference: ``moefpga logits`` and ``moefpga generate``, and the MoE backends.

The host runs the transformer of :mod:`moefpga.hls_models.transformer` in NumPy and hands every
MoE layer to a backend (docs/inference.md). A backend is a :class:`MoEBackend`: built once for a
checkpoint and a :class:`QuantSpec`, it prepares every MoE layer before the first token (so bad
shapes are refused before any work) and exposes one callable per layer. The accelerator backends
subclass :class:`ModelBackend` through :class:`AcceleratorBackend`, overriding
:meth:`AcceleratorBackend.run_hardware`, and report their counters at the end of the run
(:class:`HardwareTally`); ``sim`` runs each layer on the Verilated MoE layer top.
"""

import argparse
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
from .pack import pack_layer
from .sim_options import SimOptions

__all__ = ["MoEBackend", "ReferenceBackend", "ModelBackend", "AcceleratorBackend", "SimBackend",
           "HardwareTally", "BACKENDS", "PLANNED_BACKENDS", "SIM_CLOCK_MHZ", "backend_class",
           "make_backend", "add_commands", "accelerator_args", "load_ids", "parse_ids",
           "stop_ids", "load_tokenizer"]

#: The sim backend's default clock: the iCEBreaker board top's PLL clock (docs/boards.md).
SIM_CLOCK_MHZ = 24.0


class MoEBackend:
    """The MoE layers of one model on one backend.

    Contract: the constructor prepares every MoE layer of ``checkpoint`` under ``spec`` and
    raises :class:`MoefpgaError` for anything it cannot run, before any token runs.
    ``layers[i]`` is the :data:`MoEFunction` of decoder layer ``i``: float32 ``(T, d)``
    normalized hidden states in, float32 ``(T, d)`` out. The transformer calls the layers in
    order, with all prompt tokens at once (prefill), then with one token at a time (decode).
    :meth:`finish` ends the run: it reports on standard error and releases what the backend
    holds.
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
        """End of run: nothing to report or release by default."""


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
        super().__init__(checkpoint, spec)

    def _layer(self, checkpoint, index):
        weights = checkpoint.moe_layer(index)
        calibration = default_calibration(checkpoint, index)
        check_run(weights, self.name, self.spec, calibration)
        self._fit(index, weights)
        int_layer = quantize_layer(weights, self.spec, calibration)

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
    them, ``multiplies``, ``bytes``, ``predicted``, ``predicted_correct``).
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
        ``prediction`` (else the ``predicted`` counters)."""
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
                     f"{_bytes(total)} streamed")
        if prediction or total["predicted"]:
            right = total["predicted_correct"] / max(total["predicted"], 1)
            lines.append("  predict " + (prediction or f"{total['predicted']:,} experts "
                                         f"predicted, {right:.1%} of them used"))
        return "\n".join(lines)


def _bytes(total):
    """Bytes streamed: exact (``bytes``), or bounds (``bytes_min``, ``bytes_max``)."""
    if total["bytes_min"] != total["bytes_max"]:
        return (f"{total['bytes_min']:,} to {total['bytes_max']:,} bytes (records differ in "
                "size and the hardware counts loads, not bytes)")
    return f"{total['bytes_min']:,} bytes"


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


def _sim_modules():
    """``host.sim``, after checking that Verilator is installed; a MoefpgaError otherwise."""
    try:
        from . import sim  # needs the simulation extras (amaranth), only for this backend
        from .sim_build import verilator_root
    except ImportError as exc:
        raise MoefpgaError(f"the sim backend needs the simulation extras ({exc}); install "
                           "them: pip install 'moefpga[sim]'") from None
    verilator_root()
    return sim


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
        self.sim = _sim_modules()
        self.options, self.clock_hz = options or SimOptions(), clock_hz
        self.num_layers = checkpoint.config.num_layers
        self.hardware = None
        self.record_sizes: dict[int, list[int]] = {}
        super().__init__(checkpoint, spec)
        self.executable = self.sim.build(self.hardware, _progress)

    @classmethod
    def check_available(cls):
        _sim_modules()

    @classmethod
    def from_args(cls, checkpoint, spec, args):
        options = SimOptions(lanes=args.lanes, max_tokens=args.max_tokens, slots=args.slots)
        return cls(checkpoint, spec, options, clock_hz=args.clock_mhz * 1e6)

    def _fit(self, index, weights):
        # Every MoE layer has the checkpoint's sizes (checked on reading), so the hardware
        # sized for the first serves all.
        if self.hardware is None:
            self.hardware = self.sim.hardware_for(weights, self.spec, num_layers=self.num_layers,
                                                  options=self.options)

    def run_hardware(self, index, int_layer, xq, exp):
        result = self.sim.run_layer(self.executable, self.hardware, int_layer, index, xq, exp)
        sizes = self.record_sizes.get(index) or self.record_sizes.setdefault(
            index, [len(r) for r in pack_layer(int_layer, index, self.hardware.params)])
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


BACKENDS = {backend.name: backend for backend in (ReferenceBackend, ModelBackend, SimBackend)}

#: Accelerator backends of the host link issue, refused until they plug in.
PLANNED_BACKENDS = ("board-sim", "serial")


def backend_class(name: str) -> type[MoEBackend]:
    """The backend called ``name``, or a MoefpgaError for a planned one or one whose tools
    are not installed."""
    if name in PLANNED_BACKENDS:
        raise MoefpgaError(f"backend {name!r} cannot run whole models yet; available: "
                           f"{', '.join(BACKENDS)}")
    cls = BACKENDS[name]
    if issubclass(cls, AcceleratorBackend):
        cls.check_available()
    return cls


def make_backend(cls, checkpoint, spec, args) -> MoEBackend:
    """Backend ``cls`` for ``checkpoint`` under ``spec``, with the options in ``args`` that it
    takes (see :func:`accelerator_args`)."""
    from_args = getattr(cls, "from_args", None)
    return from_args(checkpoint, spec, args) if from_args else cls(checkpoint, spec)


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
    """The backend class and the checkpoint, refusing a planned backend or an unsupported
    model before anything is read beyond ``config.json`` and the shard headers."""
    cls = backend_class(args.backend)
    checkpoint = Checkpoint.open(args.checkpoint)
    check_supported(checkpoint.config)
    return cls, checkpoint


def _build(cls, checkpoint, args):
    """The transformer around the MoE layers of backend ``cls``, and the backend."""
    weights = load_weights(checkpoint)
    backend = make_backend(cls, checkpoint, _spec_from_args(args), args)
    _progress(f"{len(backend.layers)} MoE layers ready on backend {args.backend}, "
              f"{backend.describe()}")
    return Transformer(checkpoint.config, weights, backend.layers), backend


def cmd_logits(args):
    check_output(args.output)
    ids = load_ids(args.ids)
    cls, checkpoint = _open_checkpoint(args)
    check_ids(ids, checkpoint.config)
    model, backend = _build(cls, checkpoint, args)
    logits = model.forward(ids)
    backend.finish()
    save_array(args.output, logits)
    print(f"wrote {args.output}: {logits.shape[0]} x {logits.shape[1]} float32")


def cmd_generate(args):
    prompt = parse_ids(args.prompt_ids)
    cls, checkpoint = _open_checkpoint(args)
    check_ids(prompt, checkpoint.config, extra=args.max_new_tokens)
    stops = stop_ids(checkpoint.config)
    tokenizer = load_tokenizer(checkpoint.path)
    model, backend = _build(cls, checkpoint, args)
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
    p.add_argument("--backend", choices=(*BACKENDS, *PLANNED_BACKENDS), default="model",
                   help="where the MoE layers run (default model; board-sim and serial are "
                        "planned)")
    p.add_argument("--quant", choices=("int8", "int4"), default="int8")
    p.add_argument("--group-size", type=int, metavar="G",
                   help=f"weights per scale ({', '.join(map(str, GROUP_SIZES))}); "
                        "default: one scale per output channel")
    p.add_argument("--sparsity", default="dense", help="dense or N:M, e.g. 2:4 (default dense)")


def _positive_mhz(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of MHz, not {text!r}")
    return value


def accelerator_args(p):
    """The options of the accelerator backends (the sim backend's as ``moefpga run``'s)."""
    p.add_argument("--lanes", type=_positive_int, default=SimOptions.lanes, metavar="P",
                   help="sim backend: engine lanes P (default %(default)s)")
    p.add_argument("--max-tokens", type=_positive_int, default=SimOptions.max_tokens,
                   metavar="T", help="sim backend: largest batch T_max (default %(default)s)")
    p.add_argument("--slots", type=_positive_int, default=SimOptions.slots, metavar="S",
                   help="sim backend: on-chip expert slots (default %(default)s)")
    p.add_argument("--clock-mhz", type=_positive_mhz, default=SIM_CLOCK_MHZ, metavar="F",
                   help="sim backend: the clock that turns simulated cycles into time "
                        "(default %(default)g, the iCEBreaker board top's)")


def add_commands(sub, checkpoint_arg):
    """Add ``logits`` and ``generate`` to the ``moefpga`` subcommands ``sub``;
    ``checkpoint_arg(parser)`` adds the ``--checkpoint`` option."""
    p = sub.add_parser("logits", help="logits of one forward pass of the whole model")
    checkpoint_arg(p)
    p.add_argument("--ids", required=True, metavar="IDS.npy", help="1-D integer token ids")
    p.add_argument("--output", required=True, metavar="LOGITS.npy",
                   help="float32 logits, tokens x vocab")
    _backend_args(p)
    accelerator_args(p)
    p.set_defaults(func=cmd_logits)

    p = sub.add_parser("generate", help="greedy generation with a KV cache")
    checkpoint_arg(p)
    p.add_argument("--prompt-ids", required=True, metavar="ID,ID,...",
                   help="the prompt's token ids, comma-separated")
    p.add_argument("--max-new-tokens", type=_positive_int, required=True, metavar="N",
                   help="tokens to generate (fewer if one is the config's eos_token_id)")
    _backend_args(p)
    accelerator_args(p)
    p.set_defaults(func=cmd_generate)
