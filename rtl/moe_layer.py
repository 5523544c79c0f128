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
from .expert_slots import EventKind, ExpertSlots
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

    Schedule (one batch at a time): (1) take the batch on ``s_tokens``, each value into the
    token memory and into the router; collect the picks, the shared-gate weights and the set of
    experts the batch needs; (2) run each needed expert once, those resident at that point
    first, then the others, each group in index order with the shared expert last. A *fetcher*
    walks that order one expert ahead of the FFN: a claiming lookup reads a resident expert out
    of its slot (queued behind the running read); a missing one is requested on ``m_request``
    and looked up until the loader has committed it, so its load overlaps the compute of the
    expert before it. A *feeder* takes each fetched expert, scans the picks for its tokens and
    sends the FFN its command (from the loader's per-slot table), the tokens' metadata and
    their int8 values; (3) send the emit command and forward the outputs on ``m_result``.

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
    slot_memory : str
        Where the slots keep weight beats: ``"ebr"`` (block RAM) or ``"spram"`` (iCE40 SPRAM);
        see :class:`.expert_slots.ExpertSlots`'s ``memory``.
    spram_model : type or None
        With ``slot_memory="spram"``, the simulation model of ``SB_SPRAM256KA`` to build instead
        of the primitive (:class:`.single_port_memory.SpramModel`; a board build leaves it None).

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
    load_timeout : In(32)
        Idle cycles after which a wait for a requested expert abandons the batch (its outputs
        are then zeros flagged on ``m_result.tuser``, and it counts in ``timeouts``); 0 waits
        forever. Idle: no byte is offered on ``s_expert`` since the request was taken or the
        last byte was; so a slow but steady host, or a load waiting for a slot, never times
        out. (A request, once offered on ``m_request``, is held until taken, as AXI-Stream
        requires: the wait for ``tready`` is not timed.)
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
        in lane p of beat b), ``tlast`` on the batch's last beat. On every beat of a malformed
        or abandoned batch ``tuser`` is set and the data are zeros.
    busy : Out(1)
        A batch is in flight (from its first token beat to its last result beat).
    counters : Out(StructLayout({"cycles", "compute", "stall", "loads", "hits", "rejected",
        "malformed", "multiplies", "timeouts", "evictions"}))
        32-bit wrapping counts since reset: cycles with ``busy``; cycles in which the FFN runs
        an expert command; cycles in which the FFN is idle, the feeder has no expert and the
        fetcher waits for a requested record; requests sent; experts found resident at their
        first lookup; loader records not ``OK``; malformed batches; multiplies the engine did
        (``lanes * n`` per engine beat); batches abandoned on ``load_timeout``; resident
        experts evicted by loads.
    """

    def __init__(self, params, *, hidden, experts, top_k, slots, shared=True, shared_gate=True,
                 layers=1, macs=1, slot_memory="ebr", spram_model=None):
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
        self.slot_memory = slot_memory
        self.spram_model = spram_model
        self.counters_layout = data.StructLayout({
            name: unsigned(COUNTER_BITS)
            for name in ("cycles", "compute", "stall", "loads", "hits", "rejected",
                         "malformed", "multiplies", "timeouts", "evictions")})
        members = {
            "s_router":    In(_axis(TOKEN_BITS, last=False)),
            "router_mult": In(Multiplier),
            "normalize":   In(1),
            "layer":       In(16),
            "load_timeout": In(COUNTER_BITS),
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
                                                 experts=E + 1, memory=self.slot_memory,
                                                 spram_model=self.spram_model)
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
            slots.event.ready.eq(1),                  # events are only counted
            loader.status.ready.eq(1),
        ]
        if self.shared_gate:
            m.d.comb += router.gate_mult.eq(self.gate_mult)

        count = self.counters
        with m.If(slots.event.valid & (slots.event.payload.kind == EventKind.EVICT)):
            m.d.sync += count.evictions.eq(count.evictions + 1)
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

        need = Signal(E + 1)                          # experts the batch runs
        m.d.comb += router.o.ready.eq(1)
        with m.If(router.o.valid):
            m.d.sync += [need.bit_select(router.o.payload.expert, 1).eq(1),
                         pick_e[routed][pick_j].eq(router.o.payload.expert),
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

        # The schedule: each needed expert runs once; those resident when the batch is routed
        # first, then the others, each group in index order (E, the shared expert, last).
        resident = Signal(E + 1)
        m.d.comb += slots.resident_layer.eq(self.layer)

        # The fetcher walks the experts in that order: a claiming lookup reads a resident one
        # out into the FFN (queued behind the running read) and hands it to the feeder; a
        # missing one is requested, then looked up until the loader has committed it. A claim
        # waits until the feeder has taken the previous hand-off, so the fetcher runs at most
        # one expert ahead of the FFN: the load of the next expert overlaps the current one.
        fetch_left = Signal(E + 1)                    # experts not yet handed off
        fetching   = Signal(range(E + 1))
        first_pick = Signal(E + 1)
        m.d.comb += first_pick.eq(Mux((fetch_left & resident).any(), fetch_left & resident,
                                      fetch_left))
        next_item = Signal(range(E + 1))
        for e in reversed(range(E + 1)):
            with m.If(first_pick[e]):
                m.d.comb += next_item.eq(e)
        handed    = Signal()                          # the hand-off register is full
        hand_item = Signal(range(E + 1))
        hand_slot = Signal.like(slots.found.payload.slot)
        requested = Signal()                          # the expert being fetched was requested
        idle      = Signal(COUNTER_BITS)              # idle cycles of the wait for it
        timed_out = Signal()
        abandoned = Signal()                          # a requested record did not come in time
        start_fetch = Signal()
        fetch_done  = Signal()
        waiting     = Signal()                        # on a requested record
        request     = RequestBeat(self.m_request.tdata)
        lookup      = slots.lookup.payload
        m.d.comb += [
            lookup.tag.layer.eq(self.layer),
            lookup.tag.expert.eq(fetching),
            lookup.claim.eq(1),
            request.layer.eq(self.layer),
            request.expert.eq(Mux(fetching == E, SHARED_EXPERT, fetching)),
            self.m_request.tlast.eq(1),
        ]
        m.d.comb += timed_out.eq((self.load_timeout != 0) & (idle >= self.load_timeout))
        with m.If(self.s_expert.tvalid & self.s_expert.tready):
            m.d.sync += idle.eq(0)
        with m.Elif(requested & ~self.s_expert.tvalid):
            m.d.sync += idle.eq(idle + 1)
        with m.FSM(name="fetch"):
            with m.State("IDLE"):
                with m.If(start_fetch):
                    m.next = "NEXT"
            with m.State("NEXT"):
                m.d.sync += [fetching.eq(next_item), requested.eq(0), idle.eq(0)]
                with m.If(fetch_left == 0):
                    m.next = "DONE"
                with m.Else():
                    m.next = "LOOKUP"
            with m.State("LOOKUP"):
                m.d.comb += [slots.lookup.valid.eq(~handed), waiting.eq(requested)]
                with m.If(slots.lookup.valid & slots.lookup.ready):
                    m.next = "FOUND"
            with m.State("FOUND"):
                m.d.comb += [slots.found.ready.eq(1), waiting.eq(requested)]
                with m.If(slots.found.valid & slots.found.payload.hit):
                    m.d.sync += [handed.eq(1), hand_item.eq(fetching),
                                 hand_slot.eq(slots.found.payload.slot),
                                 fetch_left.bit_select(fetching, 1).eq(0)]
                    with m.If(~requested):
                        m.d.sync += count.hits.eq(count.hits + 1)
                    m.next = "NEXT"
                with m.Elif(slots.found.valid & ~requested):
                    m.next = "REQUEST"
                with m.Elif(slots.found.valid & timed_out):
                    m.next = "ABANDON"
                with m.Elif(slots.found.valid):
                    m.next = "LOOKUP"
            with m.State("REQUEST"):
                m.d.comb += [self.m_request.tvalid.eq(1), waiting.eq(1)]
                with m.If(self.m_request.tready):
                    m.d.sync += [requested.eq(1), idle.eq(0), count.loads.eq(count.loads + 1)]
                    m.next = "LOOKUP"
            with m.State("ABANDON"):
                m.d.sync += [abandoned.eq(1), count.timeouts.eq(count.timeouts + 1)]
                m.next = "DONE"
            with m.State("DONE"):
                m.d.comb += fetch_done.eq(1)
                m.d.sync += requested.eq(0)
                with m.If(start_fetch):
                    m.next = "NEXT"

        # The feeder: for each handed-off expert, its tokens (list) and their weights.
        expert   = Signal(range(E + 1))               # E is the shared expert
        slot     = Signal.like(hand_slot)
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
        emitted = Signal()
        starved = Signal()                            # the feeder waits for a hand-off
        flagged = Signal()                            # the batch's outputs are not valid
        m.d.comb += [loader.info_slot.eq(slot), flagged.eq(bad | abandoned)]

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
                             need.eq(int(self.shared) << E), emitted.eq(0), taking.eq(1),
                             bad.eq(0), abandoned.eq(0)]
                m.next = "TAKE"
            with m.State("TAKE"):
                with m.If(~taking & ~pad & (routed == n_tokens)):
                    with m.If(bad):
                        m.d.sync += count.malformed.eq(count.malformed + 1)
                        m.next = "EMIT"
                    with m.Else():
                        m.d.comb += start_fetch.eq(1)
                        m.d.sync += [fetch_left.eq(need), resident.eq(slots.resident & need)]
                        m.next = "NEXT"
            with m.State("NEXT"):
                m.d.comb += starved.eq(~handed)
                with m.If(handed):
                    m.d.sync += [handed.eq(0), expert.eq(hand_item), slot.eq(hand_slot),
                                 scan.eq(0), n_list.eq(0)]
                    m.next = "SCAN"
                with m.Elif(fetch_done):
                    m.next = "EMIT"
            with m.State("SCAN"):
                with m.If(scan == n_tokens):
                    m.next = "COMMAND"
                with m.Else():
                    m.d.sync += scan.eq(scan + 1)
                    with m.If(match):
                        m.d.sync += [list_tok[n_list].eq(scan), list_w[n_list].eq(weight),
                                     n_list.eq(n_list + 1)]
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
                    m.next = "NEXT"
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
                    self.m_result.tdata.eq(Mux(flagged, 0, ffn.o.payload.as_value())),
                    self.m_result.tvalid.eq(ffn.o.valid),
                    self.m_result.tuser.eq(flagged),
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
        m.d.comb += computing.eq(self.busy & ~ffn.cmd.ready & ~emitted & ~ffn.clearing)
        with m.If(computing):
            m.d.sync += count.compute.eq(count.compute + 1)
        with m.If(starved & waiting & ~computing):
            m.d.sync += count.stall.eq(count.stall + 1)
        with m.If(ffn.issue):
            m.d.sync += count.multiplies.eq(count.multiplies + P * p.engine.n)
        return m
