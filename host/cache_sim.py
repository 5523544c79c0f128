"""``moefpga cache-sim``: the expert cache and the predictors replayed on a model's real routing.

The whole model runs once on the bit-accurate integer model (whose router the hardware equals bit
for bit), one token at a time as decoding does, and every MoE layer's hidden state and picks are
recorded (:func:`record_trace`). Each configuration (policy, predictor, slots) then replays that
same trace through an :class:`~.expert_cache.ExpertCache` (:func:`replay`), so every row of the
table sees the same input. Record sizes are those :func:`~.pack.pack_expert` gives for the
hardware the sim backend would build for the quantization setting. docs/cache.md.
"""

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..hls_models import intmodel
from ..hls_models.checkpoint import Checkpoint
from ..hls_models.errors import MoefpgaError
from ..hls_models.transformer import Transformer, check_ids, check_supported, load_weights
from .cli import _positive_int, _progress, _spec_from_args
from .expert_cache import POLICIES, SHARED_EXPERT, CacheStats, ExpertCache
from .generate import ModelBackend, _backend_args
from .predictor import PREDICTORS, PredictionScore, make_predictor, rank_batch

__all__ = ["LayerStep", "Trace", "RunResult", "record_trace", "record_sizes", "replay",
           "format_table", "add_commands"]


@dataclass(frozen=True, eq=False)
class LayerStep:
    """One MoE layer's batch: the float input of its MoE block ``(T, d)`` and the integer
    router's picks ``(T, k)``."""
    layer: int
    hidden: np.ndarray
    picks: np.ndarray


@dataclass(frozen=True, eq=False)
class Trace:
    """The MoE steps of each token in order, and what replaying them needs."""
    tokens: list[list[LayerStep]]
    routers: dict[int, np.ndarray]
    num_experts: int
    top_k: int
    shared: bool
    record_bytes: Callable[[int, int], int]


class _TracingBackend(ModelBackend):
    """The integer model backend, recording each MoE call's input and picks in ``steps``."""

    def __init__(self, checkpoint, spec):
        self.steps: list[LayerStep] = []
        self.int_layers = {}
        super().__init__(checkpoint, spec)

    def _layer(self, checkpoint, index):
        moe = super()._layer(checkpoint, index)

        def traced(x):
            self._hidden = x
            return moe(x)
        return traced

    def run_integer(self, index, int_layer, xq, exp):
        out, picks, _ = intmodel.moe_layer(xq, exp, int_layer, return_routing=True,
                                           rails=self.rails)
        self.int_layers[index] = int_layer
        self.steps.append(LayerStep(index, self._hidden, picks))
        return out


def record_trace(checkpoint: Checkpoint, spec, tokens: int, seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> Trace:
    """Run ``tokens`` random token ids (seeded) through the model one at a time with a KV
    cache, the MoE layers on the integer model quantized by ``spec``, and record every step;
    ``progress`` gets one line once the input has been checked.

    Raises
    ------
    MoefpgaError
        For a model or setting the integer model or the sim backend's hardware cannot take, or
        more tokens than the model's context.
    """
    config = checkpoint.config
    check_supported(config)
    ids = np.random.default_rng(seed).integers(config.vocab_size, size=tokens)
    check_ids(ids, config)
    if progress:
        progress(f"cache-sim: {tokens} tokens through the integer model ({spec})")
    backend = _TracingBackend(checkpoint, spec)
    model = Transformer(config, load_weights(checkpoint), backend.layers)
    cache = model.new_cache()
    for token in ids:
        model.forward(np.array([token]), cache)
    backend.finish()
    per_token = len(config.moe_layers)
    steps = backend.steps
    return Trace(tokens=[steps[i:i + per_token] for i in range(0, len(steps), per_token)],
                 routers={i: checkpoint.router(i) for i in config.moe_layers},
                 num_experts=config.num_experts, top_k=config.top_k,
                 shared=bool(config.shared_expert_ffn_size),
                 record_bytes=record_sizes(checkpoint, spec, backend.int_layers))


def record_sizes(checkpoint, spec, int_layers) -> Callable[[int, int], int]:
    """``record_bytes(layer, expert)``: the packed record's size for the hardware the sim
    backend builds for ``spec`` (``sim.hardware_for``). Every routed expert of a layer packs
    to the same size (header, SiLU table, 3 d f / (P M) weight beats, CRC), so expert 0 and the
    shared expert are packed once per layer."""
    try:
        from . import sim  # needs the simulation extras (amaranth)
        from .pack import pack_expert
    except ImportError as exc:
        raise MoefpgaError(f"record sizes need the simulation extras ({exc}); install them: "
                           "pip install 'moefpga[sim]'") from None
    sizes = {}
    for index, layer in int_layers.items():
        params = sim.hardware_for(checkpoint.moe_layer(index), spec,
                                  num_layers=checkpoint.config.num_layers).params
        sizes[index, 0] = len(pack_expert(layer.experts[0], layer=index, expert=0, params=params))
        if layer.shared is not None:
            sizes[index, SHARED_EXPERT] = len(pack_expert(
                layer.shared, layer=index, expert=SHARED_EXPERT, params=params))
    return lambda layer, expert: sizes[layer, SHARED_EXPERT if expert == SHARED_EXPERT else 0]


@dataclass(frozen=True)
class RunResult:
    """One configuration's replay: its statistics, prediction accuracy (None without a
    predictor) and tokens."""
    policy: str
    predictor: str
    slots: int
    stats: CacheStats
    accuracy: float | None
    tokens: int


def replay(trace: Trace, *, slots: int, policy: str, predictor: str,
           guesses: int | None = None) -> RunResult:
    """Replay ``trace`` through a fresh cache and predictor (``guesses`` per token, default the
    model's top-k). At each MoE layer but a token's last, the predictor guesses the next MoE
    layer's experts from this layer's hidden state and picks; the guesses are scored against
    the next layer's picks and, ranked for the batch, handed to the cache as prefetches."""
    cache = ExpertCache(slots, policy, shared=trace.shared, record_bytes=trace.record_bytes)
    guesser = make_predictor(predictor, routers=trace.routers, num_experts=trace.num_experts,
                             k=guesses or trace.top_k)
    score = PredictionScore()
    for steps in trace.tokens:
        for step, following in zip(steps, [*steps[1:], None], strict=True):
            predicted = next_layer = None
            if following is not None:
                next_layer = following.layer
                guess = guesser.predict(step.layer, next_layer, step.hidden, step.picks)
                if guess is not None:
                    score.add(guess, following.picks)
                    predicted = rank_batch(guess)
            cache.step(step.layer, np.unique(step.picks).tolist(), next_layer, predicted)
            if following is not None:
                guesser.observe(step.layer, step.picks, next_layer, following.picks)
    return RunResult(policy, predictor, slots, cache.stats, score.accuracy, len(trace.tokens))


def format_table(results: list[RunResult]) -> str:
    """The table ``cache-sim`` prints, one row per run."""
    lines = [f"{'policy':<7}{'predictor':<10}{'slots':>5}{'hit rate':>10}{'routed':>8}"
             f"{'accuracy':>10}{'demand':>8}{'prefetch':>9}{'useful':>8}{'wasted':>8}"
             f"{'MB streamed':>13}{'kB/token':>10}"]
    for r in results:
        s = r.stats
        accuracy = "-" if r.accuracy is None else f"{r.accuracy:.1%}"
        lines.append(f"{r.policy:<7}{r.predictor:<10}{r.slots:>5}{s.hit_rate:>10.1%}"
                     f"{s.routed_hit_rate:>8.1%}{accuracy:>10}{s.demand_loads:>8}"
                     f"{s.prefetches:>9}{s.useful_prefetches:>8}{s.wasted_prefetches:>8}"
                     f"{s.bytes_streamed / 1e6:>13.3f}{s.bytes_streamed / r.tokens / 1e3:>10.1f}")
    return "\n".join(lines)


def _choices(allowed, what):
    """An argparse type for a comma-separated list of ``allowed`` names."""
    def parse(text):
        names = text.split(",")
        bad = [n for n in names if n not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad[0]!r}; choose from "
                                             f"{', '.join(allowed)}")
        return names
    return parse


def _slot_list(text):
    return [_positive_int(part) for part in text.split(",")]


def cmd_cache_sim(args):
    if args.backend != "model":
        raise MoefpgaError(f"cache-sim routes with the integer model, as the hardware does; "
                           f"--backend {args.backend} is not available for it")
    checkpoint = Checkpoint.open(args.checkpoint)
    if args.guesses is not None and args.guesses > checkpoint.config.num_experts:
        raise MoefpgaError(f"--guesses {args.guesses} exceeds the {checkpoint.config.num_experts}"
                           " experts of a layer")
    spec = _spec_from_args(args)
    trace = record_trace(checkpoint, spec, args.tokens, args.seed, _progress)
    results = [replay(trace, slots=slots, policy=policy, predictor=predictor,
                      guesses=args.guesses)
               for slots in args.slots for policy in args.policy for predictor in args.predictor]
    print(format_table(results))


def add_commands(sub, checkpoint_arg):
    """Add ``cache-sim`` to the ``moefpga`` subcommands ``sub``; ``checkpoint_arg(parser)``
    adds the ``--checkpoint`` option."""
    p = sub.add_parser("cache-sim", help="expert cache hit rate, prediction accuracy and bytes "
                                         "streamed, replayed on the model's routing")
    checkpoint_arg(p)
    p.add_argument("--policy", type=_choices(tuple(POLICIES), "policy"), default=["lru"],
                   metavar="lru|lfu[,...]", help="host replacement policies (default lru)")
    p.add_argument("--predictor", type=_choices(PREDICTORS, "predictor"),
                   default=list(PREDICTORS), metavar="gate|history|none[,...]",
                   help="next-layer predictors (default all three)")
    p.add_argument("--slots", type=_slot_list, default=[2], metavar="S[,S...]",
                   help="on-chip expert slots (default 2)")
    p.add_argument("--tokens", type=_positive_int, default=64, metavar="N",
                   help="random token ids run one at a time (default 64)")
    p.add_argument("--guesses", type=_positive_int, metavar="K",
                   help="guesses per token for the next layer (default the model's top-k)")
    p.add_argument("--seed", type=int, default=0, help="seed of the token ids (default 0)")
    _backend_args(p)
    p.set_defaults(func=cmd_cache_sim)
