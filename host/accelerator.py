# amaranth: UnusedElaboratable=no
"""One session with an accelerator over the host link: a board on a serial port, or its
Verilator twin on a pseudo-terminal, through the same :class:`~.link.Link` and pyserial code.

:class:`Accelerator` says HELLO, refuses a device whose IDENTIFY does not fit the model (naming
every mismatch), and runs MoE layers on it: ROUTER when the layer changes, RUN TOKENS in batches
of at most T_max tokens, every REQUEST answered with the packed record (:mod:`.pack`). The
host's mirror of the slots (:class:`~.expert_cache.ExpertCache`) and a next-layer predictor
(:mod:`.predictor`) choose the records sent as PREFETCH EXPERT after a layer's last batch, so
the next layer's loads happen outside its batches. :func:`open_accelerator` opens either
backend. docs/link.md ("The accelerator session") and docs/cache.md describe the flow.
"""

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace

import numpy as np
from amaranth.lib import data

from ..hls_models import intmodel
from ..hls_models.errors import MoefpgaError
from ..hls_models.intmodel import IntLayer
from ..rtl.expert_ffn_params import ExpertFfnParams
from ..rtl.expert_stream import SHARED_EXPERT, VERSION
from ..rtl.moe_layer import COUNTER_BITS, MoeLayer
from .expert_cache import ExpertCache, make_policy
from .link import LINK_VERSION, MAX_PAYLOAD, Identity, Link, Type
from .pack import pack_layer
from .predictor import PredictionScore, make_predictor, rank_batch

__all__ = ["AcceleratorStats", "Accelerator", "BACKENDS", "open_accelerator",
           "router_message", "token_message", "requirements", "check_fits"]

#: The backends :func:`open_accelerator` opens.
BACKENDS = ("board-sim", "serial")
#: Seconds the host waits for the device's next message within a batch (compute included).
REPLY_TIMEOUT = 120.0


@dataclass
class AcceleratorStats:
    """What a session did, summed over its :meth:`Accelerator.run_layer` calls.

    ``cycles``, ``compute``, ``stall``, ``loads``, ``hits``, ``evictions`` are the device's
    counters (docs/moe_layer.md). ``requests`` are the REQUESTs answered, ``prefetches`` the
    PREFETCH EXPERT records sent, ``bytes_streamed`` the bytes of both. ``predicted`` is the
    total number of the predictor's expert guesses: ``top_k`` per token of each call whose
    layer has a next layer in the session (none with the ``none`` predictor). ``picks`` are
    the next-layer picks scored against the guesses and ``predicted_correct`` those that were
    guessed: prediction accuracy is ``predicted_correct / picks``.
    ``mirror_differences`` counts batches whose REQUESTs differed from the loads the host's
    mirror expected. ``resent`` and ``bad_frames`` are the host link's retransmissions
    and broken frames received.
    """
    tokens: int = 0
    batches: int = 0
    cycles: int = 0
    compute: int = 0
    stall: int = 0
    loads: int = 0
    hits: int = 0
    evictions: int = 0
    requests: int = 0
    prefetches: int = 0
    bytes_streamed: int = 0
    predicted: int = 0
    picks: int = 0
    predicted_correct: int = 0
    mirror_differences: int = 0
    resent: int = 0
    bad_frames: int = 0

    @property
    def hit_rate(self) -> float | None:
        """Hits over lookups (hits and loads), None before any lookup."""
        lookups = self.hits + self.loads
        return self.hits / lookups if lookups else None

    @property
    def accuracy(self) -> float | None:
        """Prediction accuracy, None when nothing was scored."""
        return self.predicted_correct / self.picks if self.picks else None

    def summary(self) -> str:
        """The report lines: counters, cache, prediction and link."""
        cycles = max(self.cycles, 1)
        tokens = max(self.tokens, 1)
        hit_rate = "-" if self.hit_rate is None else f"{self.hit_rate:.1%}"
        accuracy = ("- (no next-layer picks scored)" if self.accuracy is None else
                    f"{self.accuracy:.1%} ({self.predicted_correct} of {self.picks} next-layer "
                    f"picks)")
        return "\n".join([
            f"counters: cycles {self.cycles}, compute {self.compute} "
            f"({self.compute / cycles:.1%}), stall {self.stall} ({self.stall / cycles:.1%}), "
            f"loads {self.loads}, hits {self.hits}, evictions {self.evictions}",
            f"per token: cycles {self.cycles / tokens:.0f}, stall {self.stall / tokens:.0f}; "
            f"{self.tokens} tokens in {self.batches} batches",
            f"cache: hit rate {hit_rate}, {self.requests} requested records and "
            f"{self.prefetches} prefetched, {self.bytes_streamed} bytes streamed",
            f"prediction accuracy: {accuracy}",
            f"link: {self.resent} frames resent, {self.bad_frames} broken frames received; "
            f"the slot mirror differed from the device's requests in "
            f"{self.mirror_differences} batches",
        ])


def _multiplier(m):
    """A Multiplier as ROUTER sends it: ``mult`` u16, ``shift`` s8 (zeros for None)."""
    if m is None:
        return bytes(3)
    return m.mult.to_bytes(2, "little") + m.shift.to_bytes(1, "little", signed=True)


def router_message(int_layer: IntLayer, layer: int) -> bytes:
    """The ROUTER payload of ``int_layer`` as layer ``layer`` (docs/link.md, "Messages")."""
    rows = [int_layer.router] + ([int_layer.shared_gate[None]]
                                 if int_layer.shared_gate is not None else [])
    return (_multiplier(int_layer.router_mult) + _multiplier(int_layer.shared_gate_mult)
            + bytes([int(int_layer.normalize)]) + layer.to_bytes(2, "little")
            + np.concatenate(rows).astype("<i2").tobytes())


def token_message(xq: np.ndarray, exp: np.ndarray) -> bytes:
    """The RUN TOKENS payload: per token and element, the int16 value and the token's int8
    exponent (docs/moe_layer.md, "Token beats")."""
    beats = np.empty((*np.shape(xq), 3), np.uint8)
    beats[..., :2] = np.asarray(xq, "<i2")[..., None].view(np.uint8)
    beats[..., 2] = np.asarray(exp, np.int8).view(np.uint8)[:, None]
    return beats.tobytes()


def _shared_code(int_layer):
    return 0 if int_layer.shared is None else 1 if int_layer.shared_gate is None else 2


def requirements(identity: Identity, int_layers: Mapping[int, IntLayer],
                 num_layers: int) -> list[str]:
    """Every way the device of ``identity`` does not fit the layers, as ``"field: device X,
    needed Y"``: the fields that must be equal through :meth:`Identity.mismatches`, then
    those with a bound (FFN size, weight width, layers, groups, lanes, the frame payload the
    host can send) and the N:M pattern (``sparsity``, as ``2:4`` or ``dense``)."""
    first = next(iter(int_layers.values()))
    experts = [e for layer in int_layers.values() for e in (*layer.experts, layer.shared) if e]
    matrices = [m for e in experts for m in (e.gate, e.up, e.down)]
    hidden, ffns = first.router.shape[1], sorted({e.gate.q.shape[0] for e in experts})
    ffn, sizes = ffns[-1], sorted({hidden, *ffns})
    sparsity = first.experts[0].gate.sparsity
    problems = identity.mismatches(link_version=LINK_VERSION, record_version=VERSION,
                                   hidden=hidden, experts=first.num_experts, top_k=first.top_k,
                                   shared=_shared_code(first))
    bounds = [("ffn", identity.ffn >= ffn, f"at least {ffn}"),
              ("weight_bits", identity.weight_bits >= max(m.bits for m in matrices),
               f"at least {max(m.bits for m in matrices)}"),
              ("layers", identity.layers >= max(max(int_layers) + 1, num_layers),
               f"at least {max(max(int_layers) + 1, num_layers)}"),
              ("group_size", all(m.group_size % max(identity.group_size, 1) == 0
                                 for m in matrices),
               f"a divisor of {sorted({m.group_size for m in matrices})}"),
              ("lanes", all(size % max(identity.lanes, 1) == 0 for size in sizes),
               f"a divisor of {sizes}"),
              ("max_payload", 1 <= identity.max_payload <= MAX_PAYLOAD, f"1 to {MAX_PAYLOAD}")]
    if sparsity.is_dense:
        bounds.append(("sparsity", identity.m == identity.n, "dense"))
    else:
        bounds.append(("sparsity", (identity.m, identity.n) == (sparsity.m, sparsity.n),
                       f"{sparsity.n}:{sparsity.m}"))
    device = {"sparsity": "dense" if identity.m == identity.n else f"{identity.n}:{identity.m}"}
    problems += [f"{name}: device {device.get(name, getattr(identity, name, None))}, "
                 f"needed {needed}" for name, ok, needed in bounds if not ok]
    return problems


def check_fits(identity: Identity, int_layers: Mapping[int, IntLayer], num_layers: int,
               device: str = "the device") -> None:
    """Raise :class:`MoefpgaError` ``"<device> does not fit this model: ..."``, naming every
    mismatch of :func:`requirements`, unless the hardware of ``identity`` fits the layers."""
    problems = requirements(identity, int_layers, num_layers)
    if problems:
        raise MoefpgaError(f"{device} does not fit this model: " + "; ".join(problems))


class Accelerator:
    """A session with the device on ``link`` for the MoE layers ``int_layers`` (layer index to
    :class:`IntLayer`) of a model of ``num_layers`` decoder layers.

    The constructor says HELLO and raises :class:`MoefpgaError` ("the device does not fit this
    model: lanes: device 4, needed 8; ...") unless the device fits every layer; from then on
    the link's frames carry at most the device's ``max_payload`` bytes. ``policy``
    (``lru``/``lfu``) and ``predictor`` (``gate``/``history``/``none``) drive prefetching: after
    the last batch of a layer, the records of the next layer in ``int_layers`` that the
    predictor guesses for these tokens (and its shared expert) are sent as PREFETCH EXPERT,
    where the host policy allows (docs/cache.md). ``progress`` gets a line per batch.
    ``reply_timeout`` bounds each wait for the device's next message within a batch.
    """

    def __init__(self, link: Link, int_layers: Mapping[int, IntLayer], *, num_layers: int,
                 policy: str = "lru", predictor: str = "none",
                 progress: Callable[[str], None] | None = None,
                 reply_timeout: float = REPLY_TIMEOUT):
        if not int_layers:
            raise MoefpgaError("the accelerator needs at least one MoE layer")
        self.link = link
        self.int_layers = dict(sorted(int_layers.items()))
        self.progress = progress or (lambda line: None)
        self.reply_timeout = reply_timeout
        first = next(iter(self.int_layers.values()))
        make_policy(policy)                   # an unknown policy is refused before HELLO
        self.predictor = make_predictor(
            predictor, routers={i: layer.router.astype(np.float64)
                                for i, layer in self.int_layers.items()},
            num_experts=first.num_experts, k=first.top_k)
        self.identity = link.hello()
        check_fits(self.identity, self.int_layers, num_layers)
        i = self.identity
        link.max_payload = i.max_payload
        try:
            self.params = ExpertFfnParams(
                lanes=i.lanes, m=i.m, n=i.n, weight_bits=i.weight_bits, group_size=i.group_size,
                max_tokens=i.max_tokens, hidden=i.hidden, ffn=i.ffn, acc_bits=first.acc_bits)
            self._layout = MoeLayer(self.params, hidden=i.hidden, experts=i.experts,
                                    top_k=i.top_k, slots=i.slots, shared=i.shared > 0,
                                    shared_gate=i.shared == 2, layers=i.layers).counters_layout
        except (TypeError, ValueError) as error:
            raise MoefpgaError(f"the device's IDENTIFY describes hardware that cannot be "
                               f"built ({error}): not a moefpga board top") from None
        self._records = {}
        self.cache = ExpertCache(i.slots, policy, shared=first.shared is not None,
                                 record_bytes=lambda layer, e: len(self._record(layer, e)))
        self._score = PredictionScore()
        self._stats = AcceleratorStats()
        self._router_layer = None
        self._pending = None                  # (layer, picks, next layer, guesses)
        self._counters = self._read_counters()

    # -- the public interface ------------------------------------------------------------------

    @property
    def stats(self) -> AcceleratorStats:
        """A snapshot of the session's statistics (a copy: later calls do not change it)."""
        link = self.link.stats
        return replace(self._stats, resent=link["retransmitted"], bad_frames=link["bad"],
                       predicted_correct=self._score.predicted, picks=self._score.picks)

    def run_layer(self, layer: int, xq: np.ndarray, exp: np.ndarray) -> np.ndarray:
        """The int32 outputs ``(T, hidden)`` (as int64) of MoE layer ``layer`` for int16 tokens
        ``xq`` with exponents ``exp``: ``intmodel.moe_layer`` bit for bit, from the device.

        Raises
        ------
        MoefpgaError
            ``layer`` is not one of the session's, the device stops answering, flags a batch
            malformed, or answers with a message that does not belong.
        """
        if layer not in self.int_layers:
            raise MoefpgaError(f"layer {layer} is not an MoE layer of this session "
                               f"({', '.join(map(str, self.int_layers))})")
        int_layer = self.int_layers[layer]
        xq, exp = np.asarray(xq), np.asarray(exp)
        if xq.ndim != 2 or xq.shape[1] != self.identity.hidden or len(exp) != len(xq):
            raise MoefpgaError(f"tokens of shape {xq.shape} with {len(exp)} exponents do not "
                               f"fit hidden size {self.identity.hidden}")
        if layer != self._router_layer:
            self.link.send(Type.ROUTER, router_message(int_layer, layer))
            self._router_layer = layer
        picks, _ = intmodel.softmax_topk(intmodel.router_logits(xq, exp, int_layer),
                                         int_layer.top_k, int_layer.normalize)
        self._score_prediction(layer, picks)
        next_layer = next((i for i in self.int_layers if i > layer), None)
        guesses = None
        if next_layer is not None and len(xq):
            hidden = xq.astype(np.float64) * np.exp2(exp.astype(np.float64))[:, None]
            guesses = self.predictor.predict(layer, next_layer, hidden, picks)
        t_max = self.identity.max_tokens
        starts = range(0, len(xq), t_max)
        outputs = []
        for n, start in enumerate(starts):
            end = min(start + t_max, len(xq))
            last = n == len(starts) - 1
            predicted = rank_batch(guesses) if last and guesses is not None else None
            loads = self.cache.step(layer, sorted(set(picks[start:end].ravel().tolist())),
                                    next_layer, predicted)
            outputs.append(self._batch(layer, xq[start:end], exp[start:end], loads,
                                       f"{n + 1}/{len(starts)}"))
        self._stats.tokens += len(xq)
        self._stats.batches += len(starts)
        if guesses is not None:
            self._stats.predicted += guesses.size
        self._pending = (layer, picks, next_layer, guesses)
        self._update_counters()
        if not outputs:
            return np.zeros((0, self.identity.hidden), np.int64)
        return np.concatenate(outputs)

    def close(self) -> None:
        """End the session: closes the link's transport."""
        self.link.transport.close()

    # -- one batch -----------------------------------------------------------------------------

    def _batch(self, layer, xq, exp, loads, label):
        """Send one batch, answer its REQUESTs, return its outputs; then send its prefetches."""
        self.link.send(Type.RUN_TOKENS, token_message(xq, exp))
        requested = []
        while True:
            message = self.link.receive(self.reply_timeout)
            if message.type == Type.REQUEST:
                tag = (int.from_bytes(message.payload[:2], "little"),
                       int.from_bytes(message.payload[2:4], "little"))
                requested.append(tag)
                self._send_record(Type.LOAD_EXPERT, *tag)
                self._stats.requests += 1
            elif message.type == Type.RESULTS:
                break
            else:
                raise MoefpgaError(f"the device sent {Type(message.type).name} during a batch")
        payload = message.payload
        if len(payload) != 1 + 4 * xq.size:
            raise MoefpgaError(f"the device's RESULTS hold {len(payload)} bytes, not "
                               f"{1 + 4 * xq.size} for {len(xq)} tokens")
        if payload[0]:
            raise MoefpgaError(f"the device flagged batch {label} of layer {layer} as malformed "
                               "or abandoned")
        expected = [(load.layer, load.expert) for load in loads if load.kind == "demand"]
        self._stats.mirror_differences += requested != expected
        prefetch = [load for load in loads if load.kind == "prefetch"]
        for load in prefetch:
            self._send_record(Type.PREFETCH_EXPERT, load.layer, load.expert)
            self._stats.prefetches += 1
        self.progress(f"  layer {layer} batch {label}: {len(xq)} tokens, {len(requested)} "
                      f"records requested, {len(prefetch)} prefetched")
        return np.frombuffer(payload[1:], "<i4").reshape(xq.shape).astype(np.int64)

    def _record(self, layer, expert):
        """The packed record of ``expert`` (:data:`SHARED_EXPERT` the shared one) of ``layer``."""
        if layer not in self._records:
            self._records[layer] = pack_layer(self.int_layers[layer], layer, self.params)
        records = self._records[layer]
        if expert == SHARED_EXPERT and self.int_layers[layer].shared is not None:
            return records[-1]
        if expert < self.int_layers[layer].num_experts:
            return records[expert]
        raise MoefpgaError(f"the device asked for expert {expert:#x} of layer {layer}, which "
                           "the model does not have")

    def _send_record(self, kind, layer, expert):
        if layer not in self.int_layers:
            raise MoefpgaError(f"the device asked for an expert of layer {layer}, not a layer "
                               "of this session")
        record = self._record(layer, expert)
        self.link.send(kind, record)
        self._stats.bytes_streamed += len(record)

    # -- prediction and counters ---------------------------------------------------------------

    def _score_prediction(self, layer, picks):
        """Score the guesses made for ``layer`` by the previous call, if it ran the same
        tokens through the layer before, and teach the predictor the transition."""
        if self._pending is None:
            return
        previous, previous_picks, next_layer, guesses = self._pending
        self._pending = None
        if next_layer != layer or len(previous_picks) != len(picks):
            return
        if guesses is not None:
            self._score.add(guesses, picks)
        self.predictor.observe(previous, previous_picks, layer, picks)

    def _read_counters(self):
        self.link.send(Type.READ_COUNTERS)
        message = self.link.receive(self.reply_timeout)
        if message.type != Type.COUNTERS or len(message.payload) * 8 != self._layout.size:
            raise MoefpgaError(f"the device answered READ COUNTERS with "
                               f"{Type(message.type).name} of {len(message.payload)} bytes")
        view = data.Const(self._layout, int.from_bytes(message.payload, "little"))
        return {name: int(view[name]) for name in self._layout.members}

    def _update_counters(self):
        counters = self._read_counters()
        for f in fields(AcceleratorStats):
            if f.name in counters:
                delta = (counters[f.name] - self._counters[f.name]) % (1 << COUNTER_BITS)
                setattr(self._stats, f.name, getattr(self._stats, f.name) + delta)
        self._counters = counters


@contextlib.contextmanager
def open_accelerator(backend: str, int_layers: Mapping[int, IntLayer], *, num_layers: int,
                     port: str | None = None, baud: int = 115200, board: str | None = None,
                     options=None, policy: str = "lru", predictor: str = "none",
                     progress: Callable[[str], None] | None = None,
                     link_timeout: float | None = None, wrap=None):
    """An :class:`Accelerator` on ``backend``, closed (and the twin stopped) on exit.

    ``serial`` opens ``port`` at ``baud``. ``board-sim`` builds (once, cached) and starts the
    Verilator twin (:mod:`.board_sim`): of ``board`` (a board name or YAML file) when given,
    else sized for ``int_layers`` with ``options`` (:class:`~.sim_options.SimOptions`); then
    it opens the twin's pseudo-terminal with the same :class:`~.transport.SerialTransport`.
    A board's twin that does not fit the layers is refused before it is built. A
    :class:`MoefpgaError` while the twin runs (a link that stops answering, a port that fails)
    ends with the twin's own ``error: ...`` line when it printed one.
    ``link_timeout`` is the link's ACK timeout (default 0.5 s on a serial port, 5 s on the
    twin, whose UART runs at the simulation's speed); ``wrap``, if given, wraps the transport
    (fault injection in tests).
    """
    from .transport import SerialTransport

    if backend not in BACKENDS:
        raise MoefpgaError(f"unknown accelerator backend {backend!r}; choose from "
                           f"{', '.join(BACKENDS)}")
    twin = None
    try:
        with contextlib.ExitStack() as stack:
            if backend == "serial":
                if not port:
                    raise MoefpgaError("the serial backend needs --port (e.g. /dev/ttyUSB1)")
                timeout = link_timeout or 0.5
            else:
                from . import board_sim

                if port:
                    raise MoefpgaError("--port is for the serial backend; board-sim starts its "
                                       "own pseudo-terminal")
                if board:
                    top = board_sim.twin_for_board(board)
                    if int_layers:        # else the Accelerator refuses an empty session
                        check_fits(top.identity, int_layers, num_layers,
                                   f"the twin of board {board}")
                else:
                    top = board_sim.twin_for_layers(int_layers, num_layers=num_layers,
                                                    options=options)
                twin = stack.enter_context(board_sim.BoardSim(board_sim.build(top, progress)))
                port, timeout = twin.port, link_timeout or 5.0
            transport = SerialTransport(port, baud)
            stack.callback(transport.close)
            link = Link(wrap(transport) if wrap else transport, timeout=timeout)
            try:
                accelerator = Accelerator(link, int_layers, num_layers=num_layers,
                                          policy=policy, predictor=predictor,
                                          progress=progress)
            except MoefpgaError as error:
                if backend == "serial" and str(error).startswith("link:"):
                    raise MoefpgaError(f"no moefpga device answers on {port}: {error}") \
                        from None
                raise
            yield accelerator
    except MoefpgaError as error:
        # The twin is stopped by now, so its standard error has been read to the end.
        if twin is None or twin.error is None:
            raise
        raise MoefpgaError(f"{error} (the board twin: {twin.error})") from None
