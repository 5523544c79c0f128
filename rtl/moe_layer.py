"""The MoE layer top: router, expert loader, expert slots and expert FFN behind AXI-Stream ports.

docs/moe_layer.md describes the ports, the formats of every stream and the schedule.
"""

from amaranth import Array, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for

from ..hls_models.intmodel import ACT_BITS, OUT_BITS, PROB_FRAC_BITS, TOKEN_BITS
from .expert_ffn import ExpertFFN
from .expert_loader import AXIS_BYTES, ExpertLoader, StatusKind
from .expert_slots import ExpertSlots
from .expert_stream import SHARED_EXPERT
from .requant import Multiplier, saturated
from .router import Router, TokenBeat

__all__ = ["MoeLayer", "RequestBeat", "COUNTER_BITS"]

#: Width of each performance counter (wrapping).
COUNTER_BITS = 32


class RequestBeat(data.Struct):
    """One expert request on ``m_request``: the layer and the expert's index in the header's
    numbering (``SHARED_EXPERT``, 0xFFFF, for the shared expert)."""
    layer:  unsigned(16)
    expert: unsigned(16)


def _axis(width, last=True, user=False):
    """An AXI-Stream source signature of ``width`` data bits, with ``tlast`` if ``last`` and a
    1-bit ``tuser`` if ``user``."""
    members = {"tdata": Out(width), "tvalid": Out(1), "tready": In(1)}
    if last:
        members["tlast"] = Out(1)
    if user:
        members["tuser"] = Out(1)
    return wiring.Signature(members)


class MoeLayer(wiring.Component):
    """One MoE layer on a batch of tokens: route, load missing experts, run each picked expert
    once on all its tokens, add the shared expert, stream the combined int32 outputs.

    The result equals ``intmodel.moe_layer(x16, exp, layer)`` bit for bit when the router
    weights and multipliers are those of ``layer`` and each requested expert is answered with
    its record (``host.pack.pack_expert``).

    Schedule (sequential, one batch at a time): (1) take the batch on ``s_tokens``, each value
    into the token memory and into the router; collect the picks and shared-gate weights;
    (2) for each routed expert 0..E-1 with at least one token, then the shared expert: scan the
    picks for its tokens (one cycle per token), look it up in the slots; on a miss send a
    request on ``m_request`` and look it up again until the loader has committed it; read the
    slot into the FFN and send the FFN its command (from the loader's per-slot table), the
    tokens' metadata and their int8 values; (3) send the emit command and forward the outputs
    on ``m_result``. The next expert's scan and lookup overlap the previous expert's compute;
    a load does not (the controller waits for it before going on).

    Parameters
    ----------
    params : ExpertFfnParams
        The FFN datapath (its ``max_tokens`` is the largest batch).
    hidden : int
        The layer's hidden size d: at most ``params.hidden``, a multiple of the engine's M,
        of the lanes P and of the group size G.
    experts, top_k : int
        Routed experts of the layer and picks per token.
    slots : int
        On-chip expert slots.
    shared : bool
        The layer has a shared expert.
    shared_gate : bool
        The shared expert has a sigmoid gate (needs ``shared``); without, its weight is 32768.
    layers : int
        Layers whose experts the slots may hold (the ``layer`` port's range).
    macs : int
        Multiply-accumulate units of the router.

    Members
    -------
    s_router : In(AXI-Stream, 16 data bits, no tlast)
        Router weights, int16, row by row (``experts`` rows, then the gate's), ``hidden`` each;
        only between batches.
    router_mult : In(Multiplier)
    gate_mult : In(Multiplier)
        (with ``shared_gate`` only.)
    normalize : In(1)
    layer : In(16)
        The layer of the batch; part of the expert tags. Held while a batch runs.
    s_tokens : In(AXI-Stream, 24 data bits)
        The batch: ``TokenBeat`` (value, int16, bits 0-15; exponent, signed 8, bits 16-23), one
        beat per value, token by token, ``hidden`` beats per token, ``tlast`` on the batch's
        last beat. At most ``params.max_tokens`` tokens. A malformed batch (``tlast`` inside a
        token, which is then completed with zeros for the router, or beats beyond
        ``params.max_tokens`` tokens, which are dropped) runs no expert: its outputs are zeros,
        flagged on ``m_result.tuser``, and it counts in ``malformed``.
    s_expert : In(AXI-Stream, 8 data bits)
        Packed expert records, to the ``ExpertLoader``.
    m_request : Out(AXI-Stream, 32 data bits)
        ``RequestBeat``: one beat (``tlast`` set) per expert the batch needs that is not
        resident.
    m_result : Out(AXI-Stream, ``32 * lanes`` data bits)
        The outputs, token by token, ``lanes`` int32 elements a beat (element ``b * lanes + p``
        in lane p of beat b), ``tlast`` on the batch's last beat, ``tuser`` set on every beat of
        a malformed batch.
    busy : Out(1)
        A batch is in flight (from its first token beat to its last result beat).
    counters : Out(StructLayout({"cycles", "compute", "stall", "loads", "hits", "rejected",
        "malformed"}))
        32-bit wrapping counts since reset: cycles with ``busy``, cycles in which the FFN runs
        an expert command, cycles in which the FFN is idle while the controller waits for a
        requested expert (request and lookups until it is committed), requests sent,
        experts found resident at their first lookup, loader records not ``OK``, and
        malformed batches.
    """

    def __init__(self, params, *, hidden, experts, top_k, slots, shared=True, shared_gate=True,
                 layers=1, macs=1):
        p = params
        if not isinstance(hidden, int) or not 0 < hidden <= p.hidden or any(
                hidden % q for q in (p.m, p.lanes, p.group_size)):
            raise ValueError(f"hidden = {hidden!r} does not fit: at most {p.hidden}, a multiple "
                             f"of M = {p.m}, P = {p.lanes} and G = {p.group_size}")
        if shared_gate and not shared:
            raise ValueError("A shared-expert gate needs a shared expert")
        self.params      = p
        self.hidden      = hidden
        self.experts     = experts
        self.top_k       = top_k
        self.slots       = slots
        self.shared      = shared
        self.shared_gate = shared_gate
        self.layers      = layers
        self.macs        = macs
        self.counters_layout = data.StructLayout({
            name: unsigned(COUNTER_BITS)
            for name in ("cycles", "compute", "stall", "loads", "hits", "rejected",
                         "malformed")})
        members = {
            "s_router":    In(_axis(TOKEN_BITS, last=False)),
            "router_mult": In(Multiplier),
            "normalize":   In(1),
            "layer":       In(16),
            "s_tokens":    In(_axis(TokenBeat.as_shape().size)),
            "s_expert":    In(AXIS_BYTES),
            "m_request":   Out(_axis(RequestBeat.as_shape().size)),
            "m_result":    Out(_axis(OUT_BITS * p.lanes, user=True)),
            "busy":        Out(1),
            "counters":    Out(self.counters_layout),
        }
        if shared_gate:
            members["gate_mult"] = In(Multiplier)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        p, d, E, K = self.params, self.hidden, self.experts, self.top_k
        T, M, P = p.max_tokens, p.m, p.lanes
        words = d // M                                # token-memory words (beats) per token

        m.submodules.router = router = Router(hidden=d, experts=E, top_k=K, macs=self.macs,
                                              shared_gate=self.shared_gate)
        m.submodules.loader = loader = ExpertLoader(p, layers=self.layers, experts=E,
                                                    slots=self.slots)
        m.submodules.slots = slots = ExpertSlots(p, slots=self.slots, layers=self.layers,
                                                 experts=E + 1)
        m.submodules.ffn = ffn = ExpertFFN(
            lanes=P, m=M, n=p.engine.n, weight_bits=p.engine.weight_bits,
            group_size=p.group_size, max_tokens=T, hidden=p.hidden, ffn=p.ffn,
            acc_bits=p.acc_bits)
        wiring.connect(m, loader=loader.load, slots=slots.load)
        wiring.connect(m, slots=slots.silu, ffn=ffn.silu)
        wiring.connect(m, slots=slots.w, ffn=ffn.w)
        wiring.connect(m, wiring.flipped(self.s_expert), loader.s_axis)
        m.d.comb += [
            loader.load_slot.eq(slots.load_slot),
            router.load.payload.eq(self.s_router.tdata),
            router.load.valid.eq(self.s_router.tvalid),
            self.s_router.tready.eq(router.load.ready),
            router.router_mult.eq(self.router_mult),
            router.normalize.eq(self.normalize),
            slots.event.ready.eq(1),                  # events are only counted by the slots
            loader.status.ready.eq(1),
        ]
        if self.shared_gate:
            m.d.comb += router.gate_mult.eq(self.gate_mult)

        count = self.counters
        with m.If(loader.status.valid & (loader.status.payload.kind != StatusKind.OK)):
            m.d.sync += count.rejected.eq(count.rejected + 1)

        # The batch: int16 values in words of M, exponents and routing results per token.
        n_tokens = Signal(range(T + 1))              # tokens taken
        tok_bits  = max(1, bits_for(T - 1))
        m.submodules.mem = mem = Memory(shape=unsigned(TOKEN_BITS * M), depth=T * words,
                                        init=[])
        wr, rd = mem.write_port(granularity=TOKEN_BITS), mem.read_port()
        exps     = Array(Signal(signed(8), name=f"exp{t}") for t in range(T))
        pick_e   = Array(Array(Signal(8, name=f"pick{t}_{j}") for j in range(K))
                         for t in range(T))
        pick_w   = Array(Array(Signal(PROB_FRAC_BITS + 1, name=f"weight{t}_{j}")
                               for j in range(K)) for t in range(T))
        gates    = Array(Signal(PROB_FRAC_BITS + 1, name=f"gate{t}") for t in range(T))
        routed   = Signal(range(T + 1))               # tokens whose routing is complete
        pick_j   = Signal(range(K))

        tokens = self.s_tokens
        beat   = TokenBeat(tokens.tdata)
        value  = Signal(range(d))                     # value of the token being taken
        word   = Signal(range(T * words))
        taking = Signal()
        full   = Signal()                             # T_max tokens taken: later beats dropped
        pad    = Signal()                             # zeros complete a token cut by tlast
        bad    = Signal()                             # the batch is malformed
        m.d.comb += [
            full.eq(n_tokens == T),
            router.i.payload.eq(Mux(pad, 0, tokens.tdata)),
            router.i.valid.eq(pad | (tokens.tvalid & taking & ~full)),
            tokens.tready.eq(taking & (router.i.ready | full)),
            wr.addr.eq(word),
            wr.data.eq(beat.value.as_unsigned().replicate(M)),
        ]
        with m.If(tokens.tvalid & tokens.tready):
            m.d.sync += self.busy.eq(1)
            with m.If(full):
                m.d.sync += bad.eq(1)
            with m.Else():
                m.d.comb += wr.en.eq(Const(1, M) << (value % M))
                with m.If(value == 0):
                    m.d.sync += exps[n_tokens].eq(beat.exp)
                with m.If(value % M == M - 1):
                    m.d.sync += word.eq(word + 1)
            with m.If(tokens.tlast):
                m.d.sync += taking.eq(0)
                with m.If(~full & (value != d - 1)):
                    m.d.sync += [pad.eq(1), bad.eq(1)]
        with m.If(router.i.valid & router.i.ready):
            m.d.sync += value.eq(value + 1)
            with m.If(value == d - 1):
                m.d.sync += [value.eq(0), n_tokens.eq(n_tokens + 1), pad.eq(0)]

        m.d.comb += router.o.ready.eq(1)
        with m.If(router.o.valid):
            m.d.sync += [pick_e[routed][pick_j].eq(router.o.payload.expert),
                         pick_w[routed][pick_j].eq(router.o.payload.weight),
                         pick_j.eq(pick_j + 1)]
            with m.If(pick_j == K - 1):
                m.d.sync += pick_j.eq(0)
                if not self.shared_gate:
                    m.d.sync += routed.eq(routed + 1)
        if self.shared_gate:
            m.d.comb += router.shared.ready.eq(1)
            with m.If(router.shared.valid):
                m.d.sync += [gates[routed].eq(router.shared.payload), routed.eq(routed + 1)]

        # One expert's share of the batch: its tokens (list) and their weights.
        expert   = Signal(range(E + 1))               # E is the shared expert
        scan     = Signal(range(T + 1))
        n_list   = Signal(range(T + 1))
        list_tok = Array(Signal(tok_bits, name=f"list_tok{i}") for i in range(T))
        list_w   = Array(Signal(PROB_FRAC_BITS + 1, name=f"list_w{i}") for i in range(T))
        match    = Signal()
        weight   = Signal(PROB_FRAC_BITS + 1)
        with m.If(expert == E):
            m.d.comb += [match.eq(1),
                         weight.eq(gates[scan] if self.shared_gate else 1 << PROB_FRAC_BITS)]
        with m.Else():
            for j in range(K):
                with m.If(pick_e[scan][j] == expert):
                    m.d.comb += [match.eq(1), weight.eq(pick_w[scan][j])]
        last_expert = E if self.shared else E - 1

        slot      = Signal.like(slots.read.payload)
        requested = Signal()                          # the expert was requested: a load
        stalled   = Signal()
        request   = RequestBeat(self.m_request.tdata)
        emitted   = Signal()
        m.d.comb += [
            slots.lookup.payload.layer.eq(self.layer),
            slots.lookup.payload.expert.eq(expert),
            loader.info_slot.eq(slot),
            slots.read.payload.eq(slot),
        ]

        # Feeding one expert: meta beats and the int8 tokens from the token memory.
        meta_n = Signal(range(T + 1))
        x_n    = Signal(range(T + 1))
        x_word = Signal(range(words + 1))
        x_valid = Signal()
        info = loader.info
        m.d.comb += [
            ffn.meta.payload.slot.eq(list_tok[meta_n]),
            ffn.meta.payload.exp.eq(exps[list_tok[meta_n]] + (TOKEN_BITS - ACT_BITS)),
            ffn.meta.payload.weight.eq(list_w[meta_n]),
            ffn.x.valid.eq(x_valid),
        ]
        half = 1 << (TOKEN_BITS - ACT_BITS - 1)
        for lane in range(M):
            x16 = rd.data[lane * TOKEN_BITS:(lane + 1) * TOKEN_BITS].as_signed()
            m.d.comb += ffn.x.payload[lane].eq(
                saturated((x16 + half) >> (TOKEN_BITS - ACT_BITS), ACT_BITS))

        out_token  = Signal(range(T))
        out_block  = Signal(range(d // P))
        expert_cmd = ffn.cmd.payload
        with m.FSM():
            with m.State("IDLE"):
                m.d.sync += [n_tokens.eq(0), routed.eq(0), word.eq(0), value.eq(0),
                             expert.eq(0), emitted.eq(0), taking.eq(1), bad.eq(0)]
                m.next = "TAKE"
            with m.State("TAKE"):
                with m.If(~taking & ~pad & (routed == n_tokens)):
                    m.d.sync += [scan.eq(0), n_list.eq(0)]
                    with m.If(bad):
                        m.d.sync += count.malformed.eq(count.malformed + 1)
                        m.next = "EMIT"
                    with m.Else():
                        m.next = "SCAN"
            with m.State("SCAN"):
                with m.If(scan == n_tokens):
                    with m.If(n_list != 0):
                        m.d.sync += requested.eq(0)
                        m.next = "LOOKUP"
                    with m.Elif(expert == last_expert):
                        m.next = "EMIT"
                    with m.Else():
                        m.d.sync += [expert.eq(expert + 1), scan.eq(0)]
                with m.Else():
                    m.d.sync += scan.eq(scan + 1)
                    with m.If(match):
                        m.d.sync += [list_tok[n_list].eq(scan), list_w[n_list].eq(weight),
                                     n_list.eq(n_list + 1)]
            with m.State("LOOKUP"):
                m.d.comb += [slots.lookup.valid.eq(1), stalled.eq(requested)]
                with m.If(slots.lookup.ready):
                    m.next = "FOUND"
            with m.State("FOUND"):
                m.d.comb += [slots.found.ready.eq(1), stalled.eq(requested)]
                with m.If(slots.found.valid):
                    with m.If(slots.found.payload.hit):
                        m.d.sync += slot.eq(slots.found.payload.slot)
                        with m.If(~requested):
                            m.d.sync += count.hits.eq(count.hits + 1)
                        m.next = "READ"
                    with m.Elif(requested):
                        m.next = "LOOKUP"
                    with m.Else():
                        m.next = "REQUEST"
            with m.State("REQUEST"):
                m.d.comb += [
                    stalled.eq(1),
                    self.m_request.tvalid.eq(1),
                    self.m_request.tlast.eq(1),
                    request.layer.eq(self.layer),
                    request.expert.eq(Mux(expert == E, SHARED_EXPERT, expert)),
                ]
                with m.If(self.m_request.tready):
                    m.d.sync += [requested.eq(1), count.loads.eq(count.loads + 1)]
                    m.next = "LOOKUP"
            with m.State("READ"):
                m.d.comb += slots.read.valid.eq(1)
                with m.If(slots.read.ready):
                    m.next = "COMMAND"
            with m.State("COMMAND"):
                m.d.comb += [
                    ffn.cmd.valid.eq(1),
                    expert_cmd.tokens.eq(n_list),
                    expert_cmd.hidden_groups.eq(info.hidden // p.group_size),
                    expert_cmd.hidden_blocks.eq(info.hidden // P),
                    expert_cmd.ffn_groups.eq(info.ffn // p.group_size),
                    expert_cmd.ffn_blocks.eq(info.ffn // P),
                    expert_cmd.gate_mult.eq(info.gate_mult),
                    expert_cmd.up_mult.eq(info.up_mult),
                    expert_cmd.hidden_mult.eq(info.hidden_mult),
                    expert_cmd.down_mult.eq(info.down_mult),
                ]
                with m.If(ffn.cmd.ready):
                    m.d.sync += [meta_n.eq(0), x_n.eq(0), x_word.eq(0)]
                    m.next = "FEED"
            with m.State("FEED"):
                m.d.comb += ffn.meta.valid.eq(meta_n != n_list)
                with m.If(ffn.meta.valid & ffn.meta.ready):
                    m.d.sync += meta_n.eq(meta_n + 1)
                with m.If(~x_valid | ffn.x.ready):
                    m.d.comb += rd.addr.eq(list_tok[x_n] * words + x_word)
                    m.d.sync += x_valid.eq(x_n != n_list)
                    with m.If(x_n != n_list):
                        m.d.sync += x_word.eq(x_word + 1)
                        with m.If(x_word == words - 1):
                            m.d.sync += [x_word.eq(0), x_n.eq(x_n + 1)]
                with m.If((meta_n == n_list) & (x_n == n_list) & ~x_valid):
                    m.d.sync += [scan.eq(0), n_list.eq(0)]
                    with m.If(expert == last_expert):
                        m.next = "EMIT"
                    with m.Else():
                        m.d.sync += expert.eq(expert + 1)
                        m.next = "SCAN"
            with m.State("EMIT"):
                m.d.comb += [
                    ffn.cmd.valid.eq(1),
                    expert_cmd.emit.eq(1),
                    expert_cmd.tokens.eq(n_tokens),
                    expert_cmd.hidden_blocks.eq(d // P),
                ]
                with m.If(ffn.cmd.ready):
                    m.d.sync += [emitted.eq(1), out_token.eq(0), out_block.eq(0)]
                    m.next = "RESULT"
            with m.State("RESULT"):
                m.d.comb += [
                    self.m_result.tdata.eq(ffn.o.payload),
                    self.m_result.tvalid.eq(ffn.o.valid),
                    self.m_result.tuser.eq(bad),
                    self.m_result.tlast.eq((out_token == n_tokens - 1)
                                           & (out_block == d // P - 1)),
                    ffn.o.ready.eq(self.m_result.tready),
                ]
                with m.If(ffn.o.valid & ffn.o.ready):
                    m.d.sync += out_block.eq(out_block + 1)
                    with m.If(out_block == d // P - 1):
                        m.d.sync += [out_block.eq(0), out_token.eq(out_token + 1)]
                    with m.If(self.m_result.tlast):
                        m.d.sync += self.busy.eq(0)
                        m.next = "IDLE"

        m.d.comb += rd.en.eq(~x_valid | ffn.x.ready)
        with m.If(self.busy):
            m.d.sync += count.cycles.eq(count.cycles + 1)
        computing = Signal()
        m.d.comb += computing.eq(self.busy & ~ffn.cmd.ready & ~emitted)
        with m.If(computing):
            m.d.sync += count.compute.eq(count.compute + 1)
        with m.If(stalled & ~computing):
            m.d.sync += count.stall.eq(count.stall + 1)
        return m
