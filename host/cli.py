"""The ``moefpga`` command line.

Every mistake in what the user gives (a path, an option, a checkpoint, an input array) ends in one
line ``moefpga: error: ...`` on standard error and exit status 2; progress goes to standard
error, results to standard output.
"""

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from ..hls_models import intmodel, reference
from ..hls_models.calibrate import (
    QuantSpec,
    calibration_tokens,
    check_shapes,
    prune_layer,
    quantize_layer,
)
from ..hls_models.checkpoint import Checkpoint
from ..hls_models.errors import MoefpgaError
from ..hls_models.quant import GROUP_SIZES, quantize_activations
from ..hls_models.sparsity import parse_sparsity
from ..hls_models.synthetic import DEFAULT_MODEL, ensure_default_model
from .extras import require
from .storage import layer_storage_table

BACKENDS = ("reference", "model", "sim", "board-sim", "serial")
#: The backends that run on the accelerator over the host link (host/accelerator.py).
LINK_BACKENDS = ("board-sim", "serial")

#: What ``moefpga eval`` compares when no ``--setting`` is given.
DEFAULT_SETTINGS = ("int8", "int8/2:4", "int4/g32", "int4/g32/2:4")


def parse_setting(text):
    """A :class:`QuantSpec` from ``int8|int4[/gG][/dense|N:M]``, e.g. ``int4/g32/2:4``."""
    parts = text.split("/")
    if parts[0] not in ("int8", "int4"):
        raise MoefpgaError(f"setting {text!r} must start with int8 or int4")
    spec = {"bits": int(parts[0][3:])}
    for part in parts[1:]:
        key = "group_size" if part.startswith("g") and part[1:].isdigit() else "sparsity"
        if key in spec:
            raise MoefpgaError(f"setting {text!r} gives the {key.replace('_', ' ')} twice")
        spec[key] = _group_size(int(part[1:])) if key == "group_size" else parse_sparsity(part)
    return QuantSpec(**spec)


def _group_size(value):
    if value not in GROUP_SIZES:
        raise MoefpgaError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                           f"not {value}")
    return value


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text!r}")
    return value


def _spec_from_args(args):
    return QuantSpec(bits=int(args.quant[3:]),
                     group_size=None if args.group_size is None else _group_size(args.group_size),
                     sparsity=parse_sparsity(args.sparsity))


def _progress(message):
    print(message, file=sys.stderr, flush=True)


def load_tokens(path, hidden_size, what="input"):
    """A float32 (tokens, hidden) array from a ``.npy`` file, or a :class:`MoefpgaError`."""
    path = Path(path)
    if not path.exists():
        raise MoefpgaError(f"{what} file {path} does not exist")
    if not path.is_file():
        raise MoefpgaError(f"{what} {path} is not a file")
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise MoefpgaError(f"{what} file {path} is not a readable .npy array ({exc})") from None
    if x.ndim != 2 or x.shape[1] != hidden_size or x.shape[0] == 0:
        raise MoefpgaError(f"{what} {path} has shape {x.shape}; expected (tokens, {hidden_size})")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise MoefpgaError(f"{what} {path} holds {x.dtype} values; expected real numbers")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise MoefpgaError(f"{what} {path} has NaN or Inf in token {bad[0]}")
    big = np.flatnonzero((np.abs(x) > np.finfo(np.float32).max).any(axis=1))
    if big.size:
        raise MoefpgaError(f"{what} {path} has values beyond the float32 range in token {big[0]}")
    return x.astype(np.float32)


def check_output(path):
    """Refuse an output path whose folder does not exist, before any work is done."""
    path = Path(path)
    if not path.parent.is_dir():
        raise MoefpgaError(f"output folder {path.parent} does not exist")
    if path.is_dir():
        raise MoefpgaError(f"output {path} is a folder; give a file name such as Y.npy")
    try:
        _partial(path).touch()
        _partial(path).unlink()
    except OSError as exc:
        raise MoefpgaError(f"cannot write {path}: {exc.strerror}") from None
    return path


def _partial(path):
    return path.with_name(path.name + ".partial")


def save_array(path, array):
    """Write ``array`` to ``path`` (.npy) through a temporary file, so a failure loses nothing."""
    path = check_output(path)
    try:
        with open(_partial(path), "wb") as f:
            np.save(f, array)
        _partial(path).replace(path)
    except OSError as exc:
        _partial(path).unlink(missing_ok=True)
        raise MoefpgaError(f"cannot write {path}: {exc.strerror}") from None


def check_run(weights, backend, spec, calibration):
    """Refuse, before any work, a run whose shapes or calibration tokens cannot serve."""
    quantized = backend != "reference"
    check_shapes(weights, spec if quantized else QuantSpec(sparsity=spec.sparsity))
    if quantized and not np.any(calibration):
        raise MoefpgaError("the calibration tokens are all zero; they cannot set scales")


def run_layer(weights, x, backend, spec, calibration, simulate=None):
    """The float32 output of an MoE layer's ``weights`` for tokens ``x`` on ``backend``.

    The model backend warns (standard error) when requantized values sit at the limits of
    their widths, the sign that the calibration tokens did not cover these inputs. The sim
    backend calls ``simulate(int_layer, xq, exp)`` for the int32 outputs and scales them as the
    model backend does; so do the link backends (board-sim, serial). Call :func:`check_run`
    first.
    """
    if backend == "reference":
        y = reference.moe_layer(x, prune_layer(weights, spec.sparsity))
        bad = np.flatnonzero(~np.isfinite(y).all(axis=1))
        if bad.size:
            raise MoefpgaError(f"the float reference overflowed float32 in token {bad[0]}")
        return y
    int_layer = quantize_layer(weights, spec, calibration)
    xq, exp = quantize_activations(x)
    if simulate is not None:
        y = simulate(int_layer, xq, exp)
    else:
        rails = Counter()
        y = intmodel.moe_layer(xq, exp, int_layer, rails=rails)
        _warn_rails(rails)
    return (y * int_layer.out_scale).astype(np.float32)


#: Fraction of a stage's values at its limits above which ``run`` warns.
RAIL_WARNING = 0.001


def _warn_rails(rails):
    for stage in intmodel.RAIL_STAGES:
        share = rails[stage] / max(1, rails[stage, "values"])
        if share > RAIL_WARNING:
            _progress(f"moefpga: warning: {share:.1%} of the {stage} values saturated; the "
                      "calibration tokens are smaller than these inputs (see --calibration)")


def default_calibration(checkpoint, layer):
    """Synthetic calibration tokens shaped by the layer's RMSNorm weight."""
    return calibration_tokens(checkpoint.config.hidden_size, checkpoint.norm_weight(layer))


def cmd_info(args):
    checkpoint = Checkpoint.open(args.checkpoint)
    print(format_info(checkpoint))


def format_info(checkpoint):
    """The summary ``moefpga info`` prints: architecture, parameter counts and storage."""
    cfg = checkpoint.config
    shared = (f"; a shared expert of ffn {cfg.shared_expert_ffn_size}"
              if cfg.shared_expert_ffn_size else "")
    routed = 3 * cfg.hidden_size * cfg.expert_ffn_size * cfg.num_experts
    shared_params = 3 * cfg.hidden_size * cfg.shared_expert_ffn_size
    router = cfg.hidden_size * (cfg.num_experts + (1 if cfg.shared_expert_ffn_size else 0))
    per_layer = routed + shared_params + router
    lines = [
        f"checkpoint    {checkpoint.path}",
        f"family        {cfg.family}",
        f"layers        {cfg.num_layers}, MoE layers: {_ranges(cfg.moe_layers)}",
        f"hidden size   {cfg.hidden_size}",
        f"experts       {cfg.num_experts} routed, top-{cfg.top_k}, routing weights "
        f"{'renormalized' if cfg.norm_topk_prob else 'not renormalized'}{shared}",
        f"expert ffn    {cfg.expert_ffn_size}",
        f"parameters    per MoE layer {per_layer:,}: routed experts {routed:,}, shared expert "
        f"{shared_params:,}, router {router:,}; all {len(cfg.moe_layers)} MoE layers "
        f"{per_layer * len(cfg.moe_layers):,}",
        "",
        "storage per MoE layer (routed and shared experts, payload and scales):",
    ]
    lines += ["  " + row for row in layer_storage_table(cfg)]
    return "\n".join(lines)


def _ranges(indices):
    """``0-3, 5`` for (0, 1, 2, 3, 5)."""
    out, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            out.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ", ".join(out) or "none"


def cmd_run(args):
    from .backend_options import backend_options  # it imports this module

    options = backend_options(args, args.backend)
    check_output(args.output)
    checkpoint = Checkpoint.open(args.checkpoint)
    spec = _spec_from_args(args)
    x = load_tokens(args.input, checkpoint.config.hidden_size)
    calibration = (load_tokens(args.calibration, checkpoint.config.hidden_size, "calibration")
                   if args.calibration else default_calibration(checkpoint, args.layer))
    weights = checkpoint.moe_layer(args.layer)
    check_run(weights, args.backend, spec, calibration)
    simulate = (_simulator(args.layer, options, checkpoint, weights, spec)
                if args.backend == "sim" else
                _accelerator(args.backend, args.layer, options, checkpoint)
                if args.backend in LINK_BACKENDS else None)
    setting = spec if args.backend != "reference" else f"float32 {spec.sparsity}"
    _progress(f"layer {args.layer}: {x.shape[0]} tokens on backend {args.backend}, {setting}")
    y = run_layer(weights, x, args.backend, spec, calibration, simulate)
    save_array(args.output, y)
    print(f"wrote {args.output}: {y.shape[0]} x {y.shape[1]} float32")


def _simulator(layer, options, checkpoint, weights, spec):
    """The sim backend's ``simulate(int_layer, xq, exp)`` for ``run_layer``: sizes the MoE
    layer top for the layer with ``options`` (:class:`.backend_options.BackendOptions`),
    refusing shapes it cannot take before any work, builds it (or takes it from the cache) and
    runs it, printing the counters summary."""
    sim = require("sim", "the sim backend", verilator=True)   # before any work
    hw = sim.hardware_for(weights, spec, num_layers=checkpoint.config.num_layers,
                          options=options.sim)

    def simulate(int_layer, xq, exp):
        executable = sim.build(hw, _progress)
        _progress(f"simulating {len(xq)} tokens in batches of at most {options.max_tokens}")
        result = sim.run_layer(executable, hw, int_layer, layer, xq, exp, _progress)
        print(f"simulated layer {layer}: {len(xq)} tokens in {result.batches} batches")
        print(sim.format_counters(result.counters, len(xq)))
        return result.outputs

    return simulate


def _accelerator(backend, layer, options, checkpoint):
    """The link backends' ``simulate(int_layer, xq, exp)`` for ``run_layer``: one session with
    the twin (board-sim) or the board on ``options.port`` (serial) through host/accelerator.py,
    printing the device, the counters and the cache report. Missing extras are refused before
    any work."""
    accelerator = require("accelerator", f"the {backend} backend",
                          verilator=backend == "board-sim")

    def simulate(int_layer, xq, exp):
        with accelerator.open_accelerator(
                backend, {layer: int_layer}, num_layers=checkpoint.config.num_layers,
                port=options.port, baud=options.baud, board=options.board, options=options.sim,
                policy=options.policy, predictor=options.predictor,
                progress=_progress) as session:
            print(format_identity(session.identity))
            y = session.run_layer(layer, xq, exp)
            stats = session.stats
        print(f"{backend} layer {layer}: {stats.tokens} tokens in {stats.batches} "
              f"batches, policy {options.policy}, predictor {options.predictor}")
        print(stats.summary())
        return y

    return simulate


def format_identity(identity):
    """One line describing the device from its IDENTIFY."""
    i = identity
    sparsity = "dense" if i.m == i.n else f"{i.n}:{i.m}"
    fmax = f"Fmax {i.fmax_khz / 1000:g} MHz" if i.fmax_khz else "Fmax unknown"
    return (f"device: {i.lanes} lanes, {sparsity} int{i.weight_bits} G={i.group_size}, hidden "
            f"{i.hidden}, ffn {i.ffn}, {i.experts} experts top-{i.top_k}, {i.slots} slots, "
            f"T_max {i.max_tokens}, clock {i.clock_hz / 1e6:g} MHz, {fmax}")


def cmd_demo(args):
    workdir = Path(args.workdir)
    model = ensure_default_model(workdir / "model")
    checkpoint = Checkpoint.open(model)
    print(format_info(checkpoint))
    layer = checkpoint.config.moe_layers[0]
    x = calibration_tokens(checkpoint.config.hidden_size, checkpoint.norm_weight(layer),
                           count=64, seed=7)
    save_array(workdir / "tokens.npy", x)
    spec = QuantSpec()
    calibration = default_calibration(checkpoint, layer)
    weights = checkpoint.moe_layer(layer)
    y_ref = run_layer(weights, x, "reference", spec, calibration)
    y_int = run_layer(weights, x, "model", spec, calibration)
    save_array(workdir / "y_reference.npy", y_ref)
    save_array(workdir / "y_model.npy", y_int)
    print(f"\nlayer {layer}, {x.shape[0]} tokens: wrote {workdir}/y_reference.npy and "
          f"y_model.npy ({spec})")
    print("\nfidelity of the bit-accurate integer model against the float reference:")
    from .evaluate import format_eval  # it imports this module
    print(format_eval(checkpoint, checkpoint.config.moe_layers,
                      [parse_setting(s) for s in DEFAULT_SETTINGS], tokens=256))


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line error: ``moefpga: error: ...``, exit status 2."""

    def error(self, message):
        self.exit(2, f"moefpga: error: {message} (see '{self.prog} --help')\n")


def build_parser():
    parser = _Parser(
        prog="moefpga", description="Mixture-of-Experts inference on FPGAs: models and host.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    def checkpoint_arg(p):
        p.add_argument("--checkpoint", required=True, metavar="DIR",
                       help="Hugging Face checkpoint folder (config.json, *.safetensors)")

    p = sub.add_parser("info", help="summarize a checkpoint and what each format would store")
    checkpoint_arg(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("run", help="run one MoE layer on a batch of tokens")
    checkpoint_arg(p)
    p.add_argument("--layer", type=int, required=True, help="decoder layer index (an MoE layer)")
    p.add_argument("--input", required=True, metavar="X.npy", help="float tokens x hidden")
    p.add_argument("--output", required=True, metavar="Y.npy", help="float32 MoE output")
    p.add_argument("--backend", choices=BACKENDS, default="model")
    p.add_argument("--quant", choices=("int8", "int4"), default="int8")
    p.add_argument("--group-size", type=int, metavar="G",
                   help=f"weights per scale ({', '.join(map(str, GROUP_SIZES))}); "
                        "default: one scale per output channel")
    p.add_argument("--sparsity", default="dense", help="dense or N:M, e.g. 2:4 (default dense)")
    p.add_argument("--calibration", metavar="C.npy",
                   help="tokens that set the static scales (default: synthetic RMSNorm-shaped)")
    from .backend_options import add_backend_options  # it imports this module
    add_backend_options(p, clock=False)
    p.set_defaults(func=cmd_run)

    from .evaluate import add_commands as add_eval_commands  # eval; imports this module
    add_eval_commands(sub, checkpoint_arg)

    p = sub.add_parser("demo", help="generate the default model, summarize it, measure fidelity")
    p.add_argument("--workdir", default="build/demo-model", metavar="DIR",
                   help=f"where the default model ({DEFAULT_MODEL['family']}) and outputs go")
    p.set_defaults(func=cmd_demo)

    from .generate import add_commands  # logits, generate; imported here: it imports this module
    add_commands(sub, checkpoint_arg)
    from .cache_sim import add_commands as add_cache_commands  # cache-sim; imports this module
    add_cache_commands(sub, checkpoint_arg)
    from .bench import add_commands as add_bench_commands  # bench; imports this module
    add_bench_commands(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MoefpgaError as exc:
        print(f"moefpga: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moefpga: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
