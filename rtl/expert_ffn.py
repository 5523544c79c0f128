"""The expert FFN datapath: SwiGLU experts on the sparse matmul engine, and the weighted combine.

Equal bit for bit to :func:`moefpga.hls_models.intmodel.expert_ffn` followed by
:func:`~moefpga.hls_models.intmodel.combine`. The stream formats and the parameters are in
:mod:`.expert_ffn_params`; docs/ffn.md describes both, the schedule and the cycle counts.
"""

from amaranth import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..hls_models.intmodel import ACT_BITS, OUT_BITS, PROB_FRAC_BITS, UP_BITS
from .expert_ffn_params import COMBINE_BITS, SILU_ENTRIES, WEIGHT_BITS, ExpertFfnParams
from .requant import SHIFT_BITS, Requantizer, saturated
from .skid_buffer import SkidBuffer
from .sparse_matmul import SparseMatmulEngine

__all__ = ["Combiner", "ExpertFFN", "read_stage"]


def read_stage(m, en, valid, ready, want, *, accepted=1):
    """Drive a synchronous memory read whose data register feeds a stream.

    The read data register (and ``valid``) advance only when the stream is empty or
    transferring (``~valid | ready``); in such a cycle a read is requested if ``want``, and
    ``valid`` follows ``want & accepted``, so the data appears one cycle later and holds until
    taken. A memory that may refuse a read request (``accepted`` low, as a single-port memory
    in a cycle with a write) leaves ``valid`` low and the address unchanged for a retry.

    Parameters
    ----------
    m : Module
        Where the logic goes.
    en : Signal
        The memory's read enable (a read port's ``en``), driven here; the caller drives its
        address.
    valid, ready : Signal
        The stream the port's ``data`` feeds (``valid`` is driven here, synchronously).
    want : Value
        The caller has an address to read.
    accepted : Value
        The memory accepts a read request in this cycle.

    Returns
    -------
    Value
        True in the cycles a read is issued and accepted: the caller advances its address then.
    """
    advance = ~valid | ready
    m.d.comb += en.eq(advance)
    with m.If(advance):
        m.d.sync += valid.eq(want & accepted)
    return advance & want & accepted


class Combiner(wiring.Component):
    """Weighted accumulation of expert outputs per token, and the final rounding to int32.

    Holds one ``COMBINE_BITS``-bit accumulator per output slot (``max_tokens``) and hidden
    element (``hidden``), in words of ``lanes`` elements. A beat on ``y`` adds ``weight *
    value`` to the accumulator of slot ``slot``, element ``block * lanes + lane`` (exact: a
    48-bit product, sums of up to 9 of them; one multiplier and one adder serve every lane). An
    accumulator starts at, and is cleared to, ``2**14``, the rounding's half, so that the emit
    is a shift and a saturation without an adder: after a reset the Combiner writes that to
    every accumulator, one word a cycle (``max_tokens * hidden / lanes`` cycles), before it
    takes anything on ``y`` or ``cmd``. A command on ``cmd`` sends, for slots
    ``0..tokens-1`` in order and blocks ``0..blocks-1`` in order, ``saturate(round_shift(sum,
    15), 32)`` of each block's ``lanes`` sums on ``o`` and clears their accumulators: that is
    ``intmodel.combine``.

    ``y`` is ready in every cycle except during that sweep (``clearing`` high; the ExpertFFN
    takes no command then) and while a command runs; a command is taken once the
    accumulations in flight are written (in the third cycle after the last ``y`` beat) and no
    ``y`` beat is offered with it; ``o`` may be
    back-pressured at any cycle. An accumulation takes three steps (read, register, add and
    write), so accumulating into the same element in consecutive cycles is exact by
    forwarding the write of the step before (the read port is transparent to the one before
    that).

    Parameters
    ----------
    lanes : int
        Elements per word and per ``o`` beat.
    max_tokens : int
        Output slots.
    hidden : int
        Elements per slot, a multiple of ``lanes``.

    Members
    -------
    y : In(stream.Signature(StructLayout({"slot", "block", "lane", "weight", "value"})))
        ``value``: a signed 32-bit expert output; ``weight``: unsigned Q1.15.
    cmd : In(stream.Signature(StructLayout({"tokens", "blocks"})))
    o : Out(stream.Signature(ArrayLayout(signed(32), lanes)))
    clearing : Out(1)
        High during the sweep after a reset.
    """

    def __init__(self, *, lanes, max_tokens, hidden):
        self.lanes      = lanes
        self.max_tokens = max_tokens
        self.blocks     = hidden // lanes
        super().__init__({
            "y": In(stream.Signature(data.StructLayout({
                "slot":   range(max_tokens),
                "block":  range(self.blocks),
                "lane":   range(lanes),
                "weight": unsigned(WEIGHT_BITS),
                "value":  signed(OUT_BITS),
            }))),
            "cmd": In(stream.Signature(data.StructLayout({
                "tokens": range(max_tokens + 1),
                "blocks": range(self.blocks + 1),
            }))),
            "o": Out(stream.Signature(data.ArrayLayout(signed(OUT_BITS), lanes))),
            "clearing": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        half = 1 << (PROB_FRAC_BITS - 1)
        depth = self.max_tokens * self.blocks
        m.submodules.accs = accs = Memory(
            shape=data.ArrayLayout(signed(COMBINE_BITS), self.lanes),
            depth=depth, init=[])
        wr = accs.write_port(granularity=1)
        rd = accs.read_port(transparent_for=(wr,))

        tokens = Signal.like(self.cmd.payload.tokens)
        blocks = Signal.like(self.cmd.payload.blocks)
        slot   = Signal(range(self.max_tokens))
        block  = Signal(range(self.blocks))
        issued = Signal()
        clear  = Signal()
        clear_addr = Signal.like(wr.addr)
        swept  = Signal.like(wr.addr)
        m.d.sync += clear.eq(0)

        # Accumulation in three steps: the element's word is read while its product is
        # registered; the word is registered; the sum is written. The one write the word read
        # cannot have seen, that of the step before, is forwarded.
        adding   = Signal()
        add_addr = Signal.like(wr.addr)
        add_lane = Signal.like(self.y.payload.lane)
        product  = Signal(signed(COMBINE_BITS))
        m.d.sync += adding.eq(self.y.valid & self.y.ready)
        with m.If(self.y.valid & self.y.ready):
            m.d.sync += [add_addr.eq(self.y.payload.slot * self.blocks + self.y.payload.block),
                         add_lane.eq(self.y.payload.lane),
                         product.eq(self.y.payload.value * self.y.payload.weight)]
        summing  = Signal()
        word     = Signal.like(rd.data)
        sum_addr = Signal.like(add_addr)
        sum_lane = Signal.like(add_lane)
        addend   = Signal.like(product)
        m.d.sync += [summing.eq(adding), word.eq(rd.data), sum_addr.eq(add_addr),
                     sum_lane.eq(add_lane), addend.eq(product)]
        last_valid = Signal()
        last_addr  = Signal.like(add_addr)
        last_lane  = Signal.like(add_lane)
        last_sum   = Signal(signed(COMBINE_BITS))
        forward = last_valid & (last_addr == sum_addr) & (last_lane == sum_lane)
        total = Mux(forward, last_sum, word[sum_lane]) + addend
        m.d.sync += [last_valid.eq(summing), last_addr.eq(sum_addr), last_lane.eq(sum_lane),
                     last_sum.eq(total)]

        with m.FSM():
            with m.State("SWEEP"):                # after reset, every accumulator to the half
                m.d.comb += self.clearing.eq(1)
                m.d.sync += [clear.eq(1), clear_addr.eq(swept), swept.eq(swept + 1)]
                with m.If(swept == depth - 1):
                    m.next = "ADD"
            with m.State("ADD"):
                m.d.comb += [
                    self.cmd.ready.eq(~adding & ~summing & ~self.y.valid),
                    self.y.ready.eq(1),
                    rd.en.eq(1),
                    rd.addr.eq(self.y.payload.slot * self.blocks + self.y.payload.block),
                ]
                with m.If(self.cmd.valid & self.cmd.ready):
                    m.d.sync += [tokens.eq(self.cmd.payload.tokens),
                                 blocks.eq(self.cmd.payload.blocks),
                                 slot.eq(0), block.eq(0), issued.eq(0)]
                    m.next = "EMIT"
            with m.State("EMIT"):
                last_block = block == blocks - 1
                last = last_block & (slot == tokens - 1)
                issue = read_stage(m, rd.en, self.o.valid, self.o.ready, ~issued)
                m.d.comb += rd.addr.eq(slot * self.blocks + block)
                with m.If(issue):
                    m.d.sync += [
                        block.eq(Mux(last_block, 0, block + 1)),
                        clear.eq(1),
                        clear_addr.eq(rd.addr),
                        issued.eq(last),
                    ]
                    with m.If(last_block):
                        m.d.sync += slot.eq(slot + 1)
                with m.If(issued & (~self.o.valid | self.o.ready)):
                    m.next = "ADD"

        for p in range(self.lanes):
            m.d.comb += [
                self.o.payload[p].eq(saturated(rd.data[p] >> PROB_FRAC_BITS, OUT_BITS)),
                wr.data[p].eq(Mux(clear, half, total)),
                wr.en[p].eq(clear | (summing & (sum_lane == p))),
            ]
        m.d.comb += wr.addr.eq(Mux(clear, clear_addr, sum_addr))
        return m


class ExpertFFN(wiring.Component):
    """SwiGLU experts on a batch of tokens, scaled by routing weights and combined per token.

    An *expert* command on ``cmd`` runs one expert on ``tokens`` tokens, ``intmodel.expert_ffn``
    bit for bit, and adds each token's ``weight * y`` to the accumulators of its output slot. It
    takes, in any interleaving of the streams: ``tokens`` beats on ``meta`` (slot, exponent,
    weight of each token), the 256 entries of the expert's SiLU table on ``silu``, the int8
    tokens on ``x`` (the engine's activation beats, token by token), then the expert's weights
    on ``w`` (gate and up row blocks interleaved, then down; see
    :meth:`.ExpertFfnParams.weight_beats`). The multipliers ride in the command.

    Schedule: the engine loads the tokens, then runs gate and up as one matrix of interleaved
    row blocks. Each gate result ``g = rq(gacc, M_g, s_g - t, 8)`` indexes the SiLU table and
    its ``s`` waits in a buffer of one row block; the up result of the same rows and token,
    ``u = rq(uacc, M_u, s_u - t, 16)``, meets it: ``h = rq(s * u, M_h, s_h, 8)`` goes to the
    token-by-FFN hidden buffer. That buffer is then loaded as the engine's activations and the
    down projection runs: ``y = rq(dacc, M_d, s_d, 32)`` goes to the :class:`Combiner`. One
    pair of requantizers serves every lane: the engine's ``lanes`` results of a row block and
    token pass through them one lane a cycle, so the engine waits only when a row is shorter
    than ``lanes`` beats (``hidden`` or ``ffn`` below ``lanes * m``).

    An *emit* command sends ``saturate(round_shift(sum, 15), 32)`` for slots ``0..tokens-1`` on
    ``o`` (``lanes`` elements a beat, slot by slot, through a :class:`.skid_buffer.SkidBuffer`)
    and clears those accumulators (``intmodel.combine`` over every expert run since the last
    emit).

    Every input may stall and ``o`` may be back-pressured at any cycle; the next command is
    accepted once an expert's last output is accumulated, or once an emit has passed its last
    beat to the output buffer. After a reset the first command waits for ``clearing`` to fall.
    The tokens of one expert command must go to distinct slots.

    Parameters
    ----------
    **kwargs
        The parameters of :class:`.ExpertFfnParams`.

    Attributes
    ----------
    params : ExpertFfnParams

    Members
    -------
    cmd : In(stream.Signature(params.command))
    meta : In(stream.Signature(params.meta))
    silu : In(stream.Signature(signed(8)))
    x : In(stream.Signature(params.engine.activation_beat))
    w : In(stream.Signature(params.engine.weight_beat))
    o : Out(stream.Signature(params.output_beat))
    issue : Out(1)
        The engine's ``issue``: ``lanes * n`` multiplies in this cycle.
    clearing : Out(1)
        High while the Combiner clears its accumulators after a reset (``T_max * hidden /
        lanes`` cycles); ``cmd`` is not ready then.
    """

    #: Cycles of an expert command beyond its loads, the engine's beats and the two runs'
    #: last results passing the serializer, ``lanes`` cycles each (docs/ffn.md).
    OVERHEAD = 31

    def __init__(self, **kwargs):
        self.params = p = ExpertFfnParams(**kwargs)
        super().__init__({
            "cmd":  In(stream.Signature(p.command)),
            "meta": In(stream.Signature(p.meta)),
            "silu": In(stream.Signature(signed(ACT_BITS))),
            "x":    In(stream.Signature(p.engine.activation_beat)),
            "w":    In(stream.Signature(p.engine.weight_beat)),
            "o":    Out(stream.Signature(p.output_beat)),
            "issue": Out(1),
            "clearing": Out(1),
        })

    def cycles(self, tokens, hidden, ffn):
        """Cycles from accepting an expert command to accepting the next command, with streams
        that never stall, when the 256-entry SiLU load is at least as long as the token load.

        The SiLU table (or the tokens), the engine's ``3 * hidden * ffn * tokens / (lanes * m)``
        beats, the hidden activations loaded into the engine, ``lanes`` cycles for each run's
        last results to pass the serializer, and :data:`OVERHEAD`. Where a row is shorter than
        ``lanes`` beats, every result of the run but the last waits for the serializer, which
        takes ``lanes`` cycles a result.
        """
        p = self.params
        gate_up_wait = (2 * ffn * tokens // p.lanes - 1) * max(0, p.lanes - hidden // p.m)
        down_wait = (hidden * tokens // p.lanes - 1) * max(0, p.lanes - ffn // p.m)
        return (max(SILU_ENTRIES, tokens * hidden // p.m)
                + 3 * hidden * ffn * tokens // (p.lanes * p.m) + tokens * ffn // p.m
                + 2 * p.lanes + self.OVERHEAD + gate_up_wait + down_wait)

    def elaborate(self, platform):
        m = Module()
        p = self.params
        P, W = p.lanes, p.h_width
        h_words = p.ffn // W                     # hidden-buffer words per token

        m.submodules.engine = engine = SparseMatmulEngine(**p.engine_kwargs)
        m.submodules.combiner = combiner = Combiner(lanes=P, max_tokens=p.max_tokens,
                                                    hidden=p.hidden)
        wiring.connect(m, wiring.flipped(self.w), engine.w)
        m.d.comb += [self.issue.eq(engine.issue), self.clearing.eq(combiner.clearing)]
        # The emitted sums leave through registers: the accumulator memory's read, the rounding
        # and the saturation are a path of their own.
        m.submodules.o_buffer = o_buffer = SkidBuffer(p.output_beat)
        wiring.connect(m, combiner.o, o_buffer.i)
        wiring.connect(m, o_buffer.o, wiring.flipped(self.o))
        m.submodules.rq_acc = rq1 = Requantizer(p.acc_bits, OUT_BITS, SHIFT_BITS + 1,
                                                pipelined=True)
        m.submodules.rq_hidden = rq2 = Requantizer(ACT_BITS + UP_BITS, ACT_BITS, SHIFT_BITS,
                                                   pipelined=True)
        L = rq1.latency             # stages: results at 0, requantized at L, h at 2 L + 1
        m.d.comb += [rq1.o.ready.eq(1), rq2.o.ready.eq(1)]

        m.submodules.meta = meta = Memory(shape=p.meta, depth=p.max_tokens, init=[])
        m.submodules.silu = silu = Memory(shape=signed(ACT_BITS), depth=SILU_ENTRIES, init=[])
        m.submodules.sbuf = sbuf = Memory(shape=signed(ACT_BITS), depth=p.max_tokens * P,
                                          init=[])
        m.submodules.hbuf = hbuf = Memory(shape=data.ArrayLayout(signed(ACT_BITS), W),
                                          depth=p.max_tokens * h_words, init=[])
        meta_w, meta_r = meta.write_port(), meta.read_port()
        silu_w = silu.write_port()
        silu_r = silu.read_port()
        sbuf_w = sbuf.write_port()
        sbuf_r = sbuf.read_port(transparent_for=(sbuf_w,))
        hbuf_w = hbuf.write_port(granularity=1)
        hbuf_r = hbuf.read_port()

        cmd = Signal(p.command)     # the expert command being run
        tokens_mode = Signal()       # engine.x takes the tokens from `x`
        hidden_mode = Signal()       # engine.x takes the hidden buffer

        # Loading an expert: token metadata and the SiLU table, alongside the tokens.
        meta_count = Signal(range(p.max_tokens + 1))
        silu_count = Signal(range(SILU_ENTRIES + 1))
        loaded = (meta_count == cmd.tokens) & (silu_count == SILU_ENTRIES)
        m.d.comb += [
            self.meta.ready.eq(tokens_mode & (meta_count != cmd.tokens)),
            meta_w.en.eq(self.meta.valid & self.meta.ready),
            meta_w.addr.eq(meta_count),
            meta_w.data.eq(self.meta.payload),
            self.silu.ready.eq(tokens_mode & (silu_count != SILU_ENTRIES)),
            silu_w.en.eq(self.silu.valid & self.silu.ready),
            silu_w.addr.eq(silu_count),
            silu_w.data.eq(self.silu.payload),
        ]
        with m.If(meta_w.en):
            m.d.sync += meta_count.eq(meta_count + 1)
        with m.If(silu_w.en):
            m.d.sync += silu_count.eq(silu_count + 1)

        # Where the engine's current result stands: token, row block, gate or up half.
        tag_layout = data.StructLayout({
            "gate": 1, "up": 1, "down": 1, "last": 1,
            "token":  range(p.max_tokens),
            "block":  range(max(p.ffn, p.hidden) // P),
            "lane":   range(P),
            "slot":   p.meta["slot"].shape,
            "weight": p.meta["weight"].shape,
        })
        down_phase = Signal()
        half       = Signal()
        token      = Signal(range(p.max_tokens))
        block      = Signal(tag_layout["block"].shape)
        last_token = token == cmd.tokens - 1
        blocks     = Mux(down_phase, cmd.hidden_blocks, cmd.ffn_blocks)

        # The serializer: the engine's results, one lane a cycle; a result is taken in the
        # cycle the last lane of the one before it goes on.
        vector   = Signal.like(engine.o.payload)
        vec_tag  = Signal(tag_layout)
        vec_mult = Signal.like(rq1.i.payload.mult)
        vec_shift = Signal.like(rq1.i.payload.shift)
        lane     = Signal(range(P))
        held     = Signal()
        last_lane = lane == P - 1
        fire = engine.o.valid & engine.o.ready
        m.d.comb += [
            engine.o.ready.eq(~held | last_lane),
            meta_r.addr.eq(Mux(fire, Mux(last_token, 0, token + 1), token)),
        ]
        with m.If(fire):
            m.d.sync += token.eq(Mux(last_token, 0, token + 1))
            with m.If(last_token):
                m.d.sync += half.eq(~half & ~down_phase)
                with m.If(down_phase | half):
                    m.d.sync += block.eq(block + 1)

        exp = meta_r.data.exp
        with m.If(fire):
            m.d.sync += [
                vector.eq(engine.o.payload),
                vec_tag.gate.eq(~down_phase & ~half),
                vec_tag.up.eq(~down_phase & half),
                vec_tag.down.eq(down_phase),
                vec_tag.last.eq(last_token & (block == blocks - 1)),
                vec_tag.token.eq(token),
                vec_tag.block.eq(block),
                vec_tag.slot.eq(meta_r.data.slot),
                vec_tag.weight.eq(meta_r.data.weight),
                vec_mult.eq(Mux(down_phase, cmd.down_mult.mult,
                                Mux(half, cmd.up_mult.mult, cmd.gate_mult.mult))),
                vec_shift.eq(Mux(down_phase, cmd.down_mult.shift,
                                 Mux(half, cmd.up_mult.shift, cmd.gate_mult.shift) - exp)),
                lane.eq(0),
                held.eq(1),
            ]
        with m.Elif(held):
            m.d.sync += [lane.eq(lane + 1), held.eq(~last_lane)]

        tags = [Signal(tag_layout, name=f"tag{stage}") for stage in range(2 * L + 2)]
        m.d.comb += [
            tags[0].eq(vec_tag),
            tags[0].gate.eq(held & vec_tag.gate),
            tags[0].up.eq(held & vec_tag.up),
            tags[0].down.eq(held & vec_tag.down),
            tags[0].last.eq(vec_tag.last & last_lane),
            tags[0].lane.eq(lane),
        ]
        m.d.sync += [later.eq(earlier) for earlier, later in zip(tags, tags[1:], strict=False)]
        rq_tag, silu_tag, h_tag = tags[L], tags[L + 1], tags[2 * L + 1]

        # Stage 0: one lane's accumulator into the requantizer, with the token's exponent.
        m.d.comb += [
            rq1.i.valid.eq(held),
            rq1.i.payload.value.eq(vector[lane]),
            rq1.i.payload.mult.eq(vec_mult),
            rq1.i.payload.shift.eq(vec_shift),
        ]

        # Stage L: g indexes the SiLU table, u reads the lane's SiLU output; y is combined.
        u = Signal(signed(UP_BITS))
        g = saturated(rq1.o.payload, ACT_BITS)
        m.d.comb += [
            silu_r.addr.eq(g.as_unsigned() ^ (1 << (ACT_BITS - 1))),
            sbuf_r.addr.eq(rq_tag.token * P + rq_tag.lane),
            combiner.y.valid.eq(rq_tag.down),
            combiner.y.payload.slot.eq(rq_tag.slot),
            combiner.y.payload.block.eq(rq_tag.block),
            combiner.y.payload.lane.eq(rq_tag.lane),
            combiner.y.payload.weight.eq(rq_tag.weight),
            combiner.y.payload.value.eq(rq1.o.payload),
        ]
        m.d.sync += u.eq(saturated(rq1.o.payload, UP_BITS))

        # Stage L + 1: keep a gate lane's SiLU output; an up lane's product to requantize.
        m.d.comb += [
            sbuf_w.en.eq(silu_tag.gate),
            sbuf_w.addr.eq(silu_tag.token * P + silu_tag.lane),
            sbuf_w.data.eq(silu_r.data),
            rq2.i.valid.eq(silu_tag.up),
            rq2.i.payload.value.eq(sbuf_r.data * u),
            rq2.i.payload.mult.eq(cmd.hidden_mult.mult),
            rq2.i.payload.shift.eq(cmd.hidden_mult.shift),
        ]

        # Stage 2 L + 1: h into the hidden buffer, token by token, `W` columns a word.
        ratio = W // P
        offset = h_tag.block & (ratio - 1)
        m.d.comb += hbuf_w.addr.eq(h_tag.token * h_words + h_tag.block // ratio)
        for column in range(W):
            m.d.comb += [
                hbuf_w.data[column].eq(rq2.o.payload),
                hbuf_w.en[column].eq(h_tag.up & (offset == column // P)
                                     & (h_tag.lane == column % P)),
            ]

        # The hidden buffer as the engine's activations: `m` columns a beat, token by token.
        h_valid  = Signal()
        h_token  = Signal(range(p.max_tokens))
        h_word   = Signal(range(h_words))
        h_sub    = Signal(range(W // p.m))
        h_slice  = Signal.like(h_sub)
        h_issued = Signal()
        h_last_word = h_word == (cmd.ffn_blocks if W == P
                                 else cmd.ffn_groups * (p.group_size // p.m)) - 1
        h_last_sub = h_sub == W // p.m - 1
        h_last = h_last_sub & h_last_word & (h_token == cmd.tokens - 1)
        h_issue = read_stage(m, hbuf_r.en, h_valid, engine.x.ready, hidden_mode & ~h_issued)
        m.d.comb += hbuf_r.addr.eq(h_token * h_words + h_word)
        with m.If(h_issue):
            m.d.sync += [h_slice.eq(h_sub), h_sub.eq(Mux(h_last_sub, 0, h_sub + 1)),
                         h_issued.eq(h_last)]
            with m.If(h_last_sub):
                m.d.sync += h_word.eq(Mux(h_last_word, 0, h_word + 1))
                with m.If(h_last_word):
                    m.d.sync += h_token.eq(h_token + 1)
        h_beat = hbuf_r.data.as_value().word_select(h_slice, p.m * ACT_BITS)
        m.d.comb += [
            engine.x.valid.eq(Mux(hidden_mode, h_valid, self.x.valid & tokens_mode)),
            engine.x.payload.eq(Mux(hidden_mode, h_beat, self.x.payload)),
            self.x.ready.eq(engine.x.ready & tokens_mode),
        ]

        # Sequencing.
        sent = Signal()              # the engine took this state's command

        def start_run(down):
            m.d.sync += [token.eq(0), block.eq(0), half.eq(0), down_phase.eq(down)]

        def engine_command(valid, *, groups, load=0, row_blocks=0):
            m.d.comb += [
                engine.cmd.valid.eq(valid),
                engine.cmd.payload.load.eq(load),
                engine.cmd.payload.groups.eq(groups),
                engine.cmd.payload.row_blocks.eq(row_blocks),
            ]

        with m.If(engine.cmd.valid & engine.cmd.ready):
            m.d.sync += sent.eq(1)
        m.d.comb += [
            combiner.cmd.payload.tokens.eq(self.cmd.payload.tokens),
            combiner.cmd.payload.blocks.eq(self.cmd.payload.hidden_blocks),
            engine.cmd.payload.tokens.eq(cmd.tokens),
        ]
        with m.FSM():
            with m.State("IDLE"):
                emit = self.cmd.payload.emit
                m.d.comb += [
                    self.cmd.ready.eq(Mux(emit, combiner.cmd.ready, ~combiner.clearing)),
                    combiner.cmd.valid.eq(self.cmd.valid & emit),
                ]
                with m.If(self.cmd.valid & self.cmd.ready & emit):
                    m.next = "EMIT"
                with m.Elif(self.cmd.valid & self.cmd.ready):
                    m.d.sync += [cmd.eq(self.cmd.payload), meta_count.eq(0),
                                 silu_count.eq(0)]
                    m.next = "LOAD"
            with m.State("EMIT"):
                with m.If(combiner.cmd.ready):
                    m.next = "IDLE"
            with m.State("LOAD"):
                m.d.comb += tokens_mode.eq(1)
                engine_command(1, load=1, groups=cmd.hidden_groups)
                with m.If(engine.cmd.ready):
                    m.next = "GATE_UP"
            with m.State("GATE_UP"):
                m.d.comb += tokens_mode.eq(1)
                engine_command(loaded, groups=cmd.hidden_groups, row_blocks=cmd.ffn_blocks * 2)
                with m.If(loaded & engine.cmd.ready):
                    start_run(down=0)
                    m.next = "GATE_UP_WAIT"
            with m.State("GATE_UP_WAIT"):
                with m.If(h_tag.up & h_tag.last):
                    m.d.sync += [h_token.eq(0), h_word.eq(0), h_sub.eq(0), h_issued.eq(0),
                                 sent.eq(0)]
                    m.next = "HIDDEN_LOAD"
            with m.State("HIDDEN_LOAD"):
                m.d.comb += hidden_mode.eq(1)
                engine_command(~sent, load=1, groups=cmd.ffn_groups)
                with m.If(h_issued & (~h_valid | engine.x.ready)):
                    m.next = "DOWN"
            with m.State("DOWN"):
                engine_command(1, groups=cmd.ffn_groups, row_blocks=cmd.hidden_blocks)
                with m.If(engine.cmd.ready):
                    start_run(down=1)
                    m.next = "DOWN_WAIT"
            with m.State("DOWN_WAIT"):
                with m.If(rq_tag.down & rq_tag.last):
                    m.next = "IDLE"
        return m
