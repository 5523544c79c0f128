"""The M:N sparse matmul engine: integer matrix-vector products of a batch of tokens.

Equal bit for bit to :func:`moefpga.hls_models.intmodel.matvec`. The stream formats and the
parameters are in :mod:`.sparse_matmul_params`; docs/engine.md describes both.
"""

from amaranth import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .sparse_matmul_params import SparseMatmulParams

__all__ = ["ActivationSelect", "LaneStep", "MacLane", "SparseMatmulEngine"]


class ActivationSelect(wiring.Component):
    """Picks the ``n`` activations a lane's compressed weights multiply out of a group of ``m``.

    Combinational. When ``n == m`` (dense) the positions are absent and the selection is the
    identity.

    Parameters
    ----------
    params : SparseMatmulParams

    Members
    -------
    acts : In(ArrayLayout(signed(act_bits), m))
        The activations of one group of ``m`` columns.
    pos : In(ArrayLayout(unsigned(pos_bits), n))
        The column, within the group, of each of the lane's ``n`` weights.
    selected : Out(ArrayLayout(signed(act_bits), n))
        ``selected[i] == acts[pos[i]]`` (``acts[i]`` when dense).
    """

    def __init__(self, params):
        self.params = params
        super().__init__({
            "acts":     In(params.activation_beat),
            "pos":      In(data.ArrayLayout(unsigned(params.pos_bits), params.n)),
            "selected": Out(data.ArrayLayout(params.activation_beat.elem_shape, params.n)),
        })

    def elaborate(self, platform):
        m = Module()
        for i in range(self.params.n):
            source = self.acts[self.pos[i]] if self.params.pos_bits else self.acts[i]
            m.d.comb += self.selected[i].eq(source)
        return m


class LaneStep(data.Struct):
    """Where a weight beat stands in the loops of a run; travels down the lane pipeline.

    Members
    -------
    valid : 1
        The stage holds a beat.
    group_first, group_last : 1
        First / last beat of a quantization group.
    row_first, row_last : 1
        In the first / last quantization group of a token's row.
    """
    valid:       1
    group_first: 1
    group_last:  1
    row_first:   1
    row_last:    1


#: Weights of at most this many bits multiply in logic (a sum of shifted activations), not in
#: a hardware multiplier: Yosys puts every ``*`` into a DSP tile, a whole SB_MAC16 on iCE40.
LOGIC_PRODUCT_BITS = 4


def weight_product(weight, act):
    """``weight * act``; for weights of at most :data:`LOGIC_PRODUCT_BITS` bits as the sum of
    ``act`` shifted by each set weight bit (the sign bit's term subtracted)."""
    bits = weight.shape().width
    if bits > LOGIC_PRODUCT_BITS:
        return weight * act
    terms = [Mux(weight[i], act << i, 0) for i in range(bits - 1)]
    return sum(terms, Const(0, signed(1))) - Mux(weight[bits - 1], act << (bits - 1), 0)


class MacLane(wiring.Component):
    """One output row: N multipliers, the group partial sum, the mantissa scale, the accumulator.

    A four-stage pipeline that advances when ``en`` is high and holds every register otherwise.
    For each beat it multiplies the ``n`` weights by the activations they select and adds the
    products to the partial sum of the quantization group; on the group's last beat it
    multiplies the partial sum by the mantissa and adds that to the accumulator, saturating to
    ``acc_bits`` (``acc = saturate(acc + psum * mant)`` as in the integer model).

    Parameters
    ----------
    params : SparseMatmulParams

    Members
    -------
    en : In(1)
        Advance the pipeline.
    step : In(LaneStep)
        Control of the beat at the input.
    acts : In(activation_beat)
        The beat's group of ``m`` activations.
    entries : In(ArrayLayout(entry, n))
        The lane's ``n`` compressed weights of the beat.
    mant : In(unsigned(9))
        The lane's mantissa of the quantization group; read on the group's last beat only.
    acc : Out(signed(acc_bits))
        The accumulator; when ``done`` it holds a finished row of a token.
    done : Out(1)
        ``acc`` holds a finished result. Results leave four enabled cycles after their last beat
        entered.
    """

    def __init__(self, params):
        self.params = params
        super().__init__({
            "en":      In(1),
            "step":    In(LaneStep),
            "acts":    In(params.activation_beat),
            "entries": In(data.ArrayLayout(params.entry, params.n)),
            "mant":    In(params.MANT_BITS),
            "acc":     Out(params.output_beat.elem_shape),
            "done":    Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        p = self.params
        m.submodules.select = select = ActivationSelect(p)
        m.d.comb += select.acts.eq(self.acts)
        for i in range(p.n):
            m.d.comb += select.pos[i].eq(self.entries[i].pos)

        # Stage 1: products of the weights and their activations.
        product_shape = data.ArrayLayout(
            (self.entries[0].value * select.selected[0]).shape(), p.n)
        products  = Signal(product_shape)
        step1     = Signal(LaneStep)
        mant1     = Signal.like(self.mant)
        # Stage 2: the running partial sum and the finished one of a quantization group.
        psum      = Signal(p.psum_shape)
        group_sum = Signal(p.psum_shape)
        mant2     = Signal.like(self.mant)
        step2     = Signal(LaneStep)
        # Stage 3: the group's contribution to the accumulator.
        scaled    = Signal((group_sum * mant2).shape())
        step3     = Signal(LaneStep)

        beat_sum  = sum(products[i] for i in range(p.n))
        psum_next = Mux(step1.group_first, 0, psum) + beat_sum
        acc_sum   = Mux(step3.row_first, 0, self.acc) + scaled
        acc_max   = (1 << (p.acc_bits - 1)) - 1
        acc_min   = -(1 << (p.acc_bits - 1))
        acc_next  = Mux(acc_sum > acc_max, acc_max, Mux(acc_sum < acc_min, acc_min, acc_sum))

        with m.If(self.en):
            m.d.sync += [
                step1.eq(self.step),
                mant1.eq(self.mant),
                step2.eq(step1),
                step2.valid.eq(step1.valid & step1.group_last),
                step3.eq(step2),
                self.done.eq(step3.valid & step3.row_last),
            ]
            for i in range(p.n):
                m.d.sync += products[i].eq(weight_product(self.entries[i].value,
                                                          select.selected[i]))
            with m.If(step1.valid):
                m.d.sync += psum.eq(psum_next)
            with m.If(step1.group_last):
                m.d.sync += [group_sum.eq(psum_next), mant2.eq(mant1)]
            m.d.sync += scaled.eq(group_sum * mant2)
            with m.If(step3.valid):
                m.d.sync += self.acc.eq(acc_next)
        return m


class SparseMatmulEngine(wiring.Component):
    """Matrix-vector products of one weight matrix with a batch of tokens, M:N sparse weights.

    Commands come in on ``cmd``. A *load* command fills the activation memory with ``tokens``
    token vectors of ``groups * group_size`` columns from ``x``. A *run* command then streams the
    matrix in on ``w`` (``row_blocks`` blocks of ``lanes`` rows; weight beats in the order of
    :meth:`SparseMatmulParams.weight_beats`) and, for each row block and each token, sends the
    ``lanes`` accumulators on ``o``. Each weight beat enters once and is used for every token:
    the beats of a row block are kept in a buffer while the first token consumes them from the
    stream, and the other tokens read them from there.

    Every stream may stall at any cycle. With streams that never stall the engine takes one beat,
    ``lanes * n`` multiplies, per cycle: a run of ``R`` rows, ``C`` columns and ``T`` tokens
    sends its last result :data:`LATENCY` cycles after ``R * C * T / (lanes * m)`` cycles of
    beats, counted from accepting its command; the next command is accepted one cycle after the
    last beat, so back-to-back runs take one cycle more than their beats.

    Parameters
    ----------
    **kwargs
        The parameters of :class:`SparseMatmulParams`.

    Attributes
    ----------
    params : SparseMatmulParams

    Members
    -------
    cmd : In(stream.Signature(params.command))
        Commands; one is accepted only when the previous one has issued its last beat.
    x : In(stream.Signature(params.activation_beat))
        Activations of a load command, token by token, ``m`` columns a beat.
    w : In(stream.Signature(params.weight_beat))
        Weights of a run command.
    o : Out(stream.Signature(params.output_beat))
        Results of a run command: per row block, per token, the ``lanes`` rows.
    issue : Out(1)
        A weight beat enters the lanes in this cycle: ``lanes * n`` multiplies.
    """

    #: Cycles from accepting a run command to sending its last result, beyond one per beat.
    LATENCY = 6

    def __init__(self, **kwargs):
        self.params = p = SparseMatmulParams(**kwargs)
        super().__init__({
            "cmd": In(stream.Signature(p.command)),
            "x":   In(stream.Signature(p.activation_beat)),
            "w":   In(stream.Signature(p.weight_beat)),
            "o":   Out(stream.Signature(p.output_beat)),
            "issue": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        p = self.params
        groups_max = p.max_cols // p.group_size

        m.submodules.acts = acts = Memory(shape=p.activation_beat, init=[],
                                          depth=p.max_tokens * p.max_cols // p.m)
        m.submodules.weights = weights = Memory(shape=p.weight_beat.members["entries"], init=[],
                                                depth=p.max_cols // p.m)
        m.submodules.mants = mants = Memory(shape=p.weight_beat.members["mant"], init=[],
                                            depth=groups_max)
        acts_w, acts_r = acts.write_port(), acts.read_port()
        weights_w, weights_r = weights.write_port(), weights.read_port()
        mants_w, mants_r = mants.write_port(), mants.read_port()

        command = Signal(p.command)
        beat    = Signal(range(p.beats_per_group))   # beat within the quantization group
        group   = Signal(range(groups_max))          # quantization group within the row
        column  = Signal(range(p.max_cols // p.m))   # beat within the row
        token   = Signal(range(p.max_tokens))
        block   = Signal.like(command.row_blocks)
        address = Signal(range(p.max_tokens * p.max_cols // p.m))   # activation word

        last_beat  = beat == p.beats_per_group - 1
        last_group = last_beat & (group == command.groups - 1)
        last_token = last_group & (token == command.tokens - 1)
        last_block = last_token & (block == command.row_blocks - 1)
        advance = Signal()
        with m.If(advance):
            m.d.sync += [
                beat.eq(Mux(last_beat, 0, beat + 1)),
                column.eq(Mux(last_group, 0, column + 1)),
                address.eq(Mux(last_token, 0, address + 1)),
            ]
            with m.If(last_beat):
                m.d.sync += group.eq(Mux(last_group, 0, group + 1))
            with m.If(last_group):
                m.d.sync += token.eq(Mux(last_token, 0, token + 1))
            with m.If(last_token):
                m.d.sync += block.eq(block + 1)

        # The lanes' pipeline stalls while a result waits on `o`.
        en = Signal()
        m.d.comb += en.eq(~self.o.valid | self.o.ready)
        issue = self.issue
        first_token = token == 0

        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    m.d.sync += [command.eq(self.cmd.payload), block.eq(0)]
                    with m.If(self.cmd.payload.load):
                        m.next = "LOAD"
                    with m.Else():
                        m.next = "RUN"
            with m.State("LOAD"):
                m.d.comb += [
                    self.x.ready.eq(1),
                    advance.eq(self.x.valid),
                    acts_w.en.eq(self.x.valid),
                ]
                with m.If(self.x.valid & last_token):
                    m.next = "IDLE"
            with m.State("RUN"):
                m.d.comb += [
                    issue.eq(en & (self.w.valid | ~first_token)),
                    self.w.ready.eq(en & first_token),
                    advance.eq(issue),
                    weights_w.en.eq(self.w.valid & self.w.ready),
                    mants_w.en.eq(self.w.valid & self.w.ready & last_beat),
                ]
                with m.If(issue & last_block):
                    m.next = "IDLE"

        m.d.comb += [
            acts_w.addr.eq(address),
            acts_w.data.eq(self.x.payload),
            weights_w.addr.eq(column),
            weights_w.data.eq(self.w.payload.entries),
            mants_w.addr.eq(group),
            mants_w.data.eq(self.w.payload.mant),
            acts_r.addr.eq(address),
            weights_r.addr.eq(column),
            mants_r.addr.eq(group),
            acts_r.en.eq(en),
            weights_r.en.eq(en),
            mants_r.en.eq(en),
        ]

        # Stage 0 registers, alongside the memories' read registers.
        step     = Signal(LaneStep)
        streamed = Signal()
        w_beat   = Signal(p.weight_beat)
        with m.If(en):
            m.d.sync += [
                step.valid.eq(issue),
                step.group_first.eq(beat == 0),
                step.group_last.eq(last_beat),
                step.row_first.eq(group == 0),
                step.row_last.eq(last_group),
                streamed.eq(first_token),
                w_beat.eq(self.w.payload),
            ]

        # Stage 0': the activations and the beat's weights registered, which keeps the memories'
        # clock-to-out and the streamed-or-buffered select off the multipliers' path.
        lane_step = Signal(LaneStep)
        lane_acts = Signal.like(acts_r.data)
        entries   = Signal(weights.shape)
        mant      = Signal(mants.shape)
        with m.If(en):
            m.d.sync += [
                lane_step.eq(step),
                lane_acts.eq(acts_r.data),
                entries.eq(Mux(streamed, w_beat.entries, weights_r.data)),
                mant.eq(Mux(streamed, w_beat.mant, mants_r.data)),
            ]

        lanes = [MacLane(p) for _ in range(p.lanes)]
        for lane_index, lane in enumerate(lanes):
            m.submodules[f"lane{lane_index}"] = lane
            m.d.comb += [
                lane.en.eq(en),
                lane.step.eq(lane_step),
                lane.acts.eq(lane_acts),
                lane.entries.eq(entries[lane_index]),
                lane.mant.eq(mant[lane_index]),
                self.o.payload[lane_index].eq(lane.acc),
            ]
        m.d.comb += self.o.valid.eq(lanes[0].done)
        return m
