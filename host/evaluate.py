"""``moefpga eval``: fidelity of the integer datapath against the float reference.

Two tables. Per MoE layer (the default): the integer model against the float reference on the
same pruned experts, on synthetic RMSNorm-shaped tokens (:func:`format_eval`). The whole model
(``--whole-model``): the logits of one forward pass over a sequence of token ids with the MoE
layers on the ``model`` backend (or an accelerator backend), against the same pass with the
float reference's MoE layers, both on the same pruned experts and on the dense float model
(:func:`whole_model_fidelity`). docs/inference.md describes the second.
"""

import contextlib
from dataclasses import dataclass

import numpy as np

from ..hls_models.calibrate import QuantSpec, calibration_tokens
from ..hls_models.checkpoint import Checkpoint
from ..hls_models.errors import MoefpgaError
from ..hls_models.fidelity import evaluate_layer, relative_l2
from ..hls_models.transformer import Transformer, check_ids, check_supported, load_weights
from .backend_options import add_backend_options, backend_options
from .cli import DEFAULT_SETTINGS, _positive_int, _progress, parse_setting
from .generate import ReferenceBackend, backend_class, load_ids, make_backend

__all__ = ["LogitFidelity", "format_eval", "whole_model_fidelity", "format_whole_model",
           "default_ids", "add_commands", "WHOLE_MODEL_BACKENDS"]

#: Evaluation tokens per layer, and the length of the whole model's sequence, by default.
LAYER_TOKENS, SEQUENCE_TOKENS = 256, 16
#: Backends the whole-model table can measure.
WHOLE_MODEL_BACKENDS = ("model", "sim", "board-sim", "serial")


@dataclass(frozen=True)
class LogitFidelity:
    """Logits ``(T, vocab)`` against reference logits of the same ids.

    Members
    -------
    top1 : float
        Share of positions whose largest logit is at the same token id.
    rel_l2 : float
        ``||test - ref|| / ||ref||`` over all logits.
    max_abs : float
        Largest ``|test - ref|``.
    """
    top1:    float
    rel_l2:  float
    max_abs: float

    @classmethod
    def of(cls, test, ref):
        return cls(top1=float(np.mean(test.argmax(axis=1) == ref.argmax(axis=1))),
                   rel_l2=relative_l2(test, ref), max_abs=float(np.max(np.abs(test - ref))))


def format_eval(checkpoint, layers, specs, tokens):
    """The per-layer fidelity table: integer model against the float reference on the pruned
    weights. Evaluation tokens and calibration tokens are drawn apart (different seeds)."""
    hidden = checkpoint.config.hidden_size
    lines = [f"{'layer':>5}  {'setting':<22}{'cosine':>9}{'rel L2':>9}{'routing':>9}"]
    for n, layer in enumerate(layers):
        weights = checkpoint.moe_layer(layer)
        norm = checkpoint.norm_weight(layer)
        x = calibration_tokens(hidden, norm, count=tokens, seed=1000 + layer)
        calibration = calibration_tokens(hidden, norm, seed=layer)
        for spec in specs:
            _progress(f"eval: layer {layer} ({n + 1}/{len(layers)}), {spec}")
            f = evaluate_layer(weights, spec, x, calibration)
            lines.append(f"{layer:>5}  {str(spec):<22}{f.cosine:>9.5f}{f.rel_l2:>9.5f}"
                         f"{f.routing_agreement:>8.1%}")
    return "\n".join(lines)


def default_ids(config, count, seed=0):
    """``count`` token ids drawn uniformly from the vocabulary (seeded)."""
    return np.random.default_rng(seed).integers(config.vocab_size, size=count)


def whole_model_fidelity(checkpoint, specs, ids, backend="model", options=None):
    """Per spec, the :class:`LogitFidelity` of backend ``backend`` (built with the accelerator
    ``options``, see :func:`.generate.make_backend`) against the float reference on the same
    pruned experts, and against the dense float model: a list of ``(spec, same, dense)``.

    Raises
    ------
    MoefpgaError
        As the backends and :meth:`Transformer.forward` do.
    """
    cls = backend_class(backend)
    check_supported(checkpoint.config)
    check_ids(ids, checkpoint.config)
    weights = load_weights(checkpoint)
    references = {}

    def logits(moe_backend):
        with contextlib.closing(moe_backend):
            out = Transformer(checkpoint.config, weights, moe_backend.layers).forward(ids)
            moe_backend.finish()
        return out

    def reference(sparsity):
        if sparsity not in references:
            _progress(f"eval: the float reference, {sparsity}")
            references[sparsity] = logits(ReferenceBackend(checkpoint,
                                                           QuantSpec(sparsity=sparsity)))
        return references[sparsity]

    rows = []
    for spec in specs:
        _progress(f"eval: the whole model on backend {backend}, {spec}")
        test = logits(make_backend(cls, checkpoint, spec, options))
        rows.append((spec, LogitFidelity.of(test, reference(spec.sparsity)),
                     LogitFidelity.of(test, reference(QuantSpec().sparsity))))
    return rows


def format_whole_model(rows, ids, backend):
    """The whole-model table of :func:`whole_model_fidelity`'s rows."""
    lines = [f"whole model, {len(ids)} tokens, logits of backend {backend} against the float "
             "reference:",
             f"{'':<22}{'same pruned experts':^27}  {'dense float':^16}",
             f"{'setting':<22}{'top-1':>8}{'rel L2':>9}{'max abs':>10}  {'top-1':>7}"
             f"{'rel L2':>9}"]
    for spec, same, dense in rows:
        lines.append(f"{str(spec):<22}{same.top1:>8.1%}{same.rel_l2:>9.5f}{same.max_abs:>10.5f}"
                     f"  {dense.top1:>7.1%}{dense.rel_l2:>9.5f}")
    return "\n".join(lines)


def cmd_eval(args):
    if args.whole_model:
        backend = args.backend or "model"
        options = backend_options(args, backend)
    else:
        for option in ("ids", "backend"):
            if getattr(args, option) is not None:
                raise MoefpgaError(f"--{option} applies to --whole-model")
        backend_options(args, None, where="--whole-model with ")   # refuses every one given
    checkpoint = Checkpoint.open(args.checkpoint)
    specs = [parse_setting(s) for s in args.setting or DEFAULT_SETTINGS]
    if not args.whole_model:
        print(format_eval(checkpoint, _eval_layers(checkpoint, args.layers), specs,
                          args.tokens or LAYER_TOKENS))
        return
    if args.layers is not None:
        raise MoefpgaError("--layers applies to the per-layer table, not to --whole-model")
    if args.ids is not None and args.tokens is not None:
        raise MoefpgaError("give --ids or --tokens, not both")
    ids = (load_ids(args.ids) if args.ids is not None
           else default_ids(checkpoint.config, args.tokens or SEQUENCE_TOKENS))
    rows = whole_model_fidelity(checkpoint, specs, ids, backend, options)
    print(format_whole_model(rows, ids, backend))


def _eval_layers(checkpoint, text):
    if text is None:
        return checkpoint.config.moe_layers
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise MoefpgaError(f"--layers takes comma-separated layer numbers, not {text!r}") from None


def add_commands(sub, checkpoint_arg):
    """Add ``eval`` to the ``moefpga`` subcommands ``sub``; ``checkpoint_arg(parser)`` adds the
    ``--checkpoint`` option."""
    p = sub.add_parser("eval", help="fidelity of the integer model against the float reference, "
                                    "per layer or on the whole model")
    checkpoint_arg(p)
    p.add_argument("--layers", metavar="L,L,...", help="MoE layers to evaluate (default all)")
    p.add_argument("--setting", action="append", metavar="SPEC",
                   help="int8|int4[/gG][/N:M], repeatable "
                        f"(default: {' '.join(DEFAULT_SETTINGS)})")
    p.add_argument("--tokens", type=_positive_int, metavar="N",
                   help=f"evaluation tokens per layer (default {LAYER_TOKENS}); with "
                        f"--whole-model, the length of a random sequence of token ids "
                        f"(default {SEQUENCE_TOKENS}, seeded)")
    p.add_argument("--whole-model", action="store_true",
                   help="the logits of the whole model instead of each layer: top-1 agreement "
                        "and logit error against the float reference")
    p.add_argument("--ids", metavar="IDS.npy",
                   help="with --whole-model: the token ids (1-D integer .npy) instead of a "
                        "random sequence")
    p.add_argument("--backend", choices=WHOLE_MODEL_BACKENDS,
                   help="with --whole-model: where the quantized MoE layers run (default model)")
    add_backend_options(p)
    p.set_defaults(func=cmd_eval)
