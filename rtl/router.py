"""The expert router: Q12 logits, top-k and fixed-point softmax weights of int16 tokens.

It computes ``intmodel.router_logits``, ``intmodel.softmax_topk`` and, for Qwen2-MoE's shared
expert, ``intmodel.sigmoid``, bit for bit. docs/router.md describes the schedule and its cycle
count.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for, ceil_log2

from moefpga.hls_models.intmodel import (
    EXP2_TABLE,
    LOG2E_Q14,
    LOGIT_BITS,
    LOGIT_FRAC_BITS,
    PROB_FRAC_BITS,
    ROUTER_ACC_BITS,
    TOKEN_BITS,
)

from .divider import Divider
from .requant import SHIFT_BITS, Multiplier, Requantizer

__all__ = ["TokenBeat", "Pick", "ExpUnit", "TopK", "Router"]

#: Right shift that turns ``a * LOG2E_Q14`` (Q12 times Q14) into Q8.
_EXP_Q8_SHIFT = 14 + LOGIT_FRAC_BITS - 8
#: Q1.15 routing weights and exp() values: 1.0 is ``_ONE``.
_ONE = 1 << PROB_FRAC_BITS
_WEIGHT_BITS = PROB_FRAC_BITS + 1
#: Width of a token's signed power-of-two exponent.
_EXP_BITS = 8


class TokenBeat(data.Struct):
    """One value of a token, as the router's input stream carries it.

    ``exp`` is the token's power-of-two exponent (the token is ``value * 2**exp``); every beat of
    a token carries it and the router reads it with the first.
    """
    value: signed(TOKEN_BITS)
    exp:   signed(_EXP_BITS)


class Pick(data.Struct):
    """One routing decision: an expert and its unsigned Q1.15 weight (1.0 is 32768)."""
    expert: unsigned(8)
    weight: unsigned(_WEIGHT_BITS)


class ExpUnit(wiring.Component):
    """``exp(-a / 4096)`` in Q15 for a Q12 ``a >= 0``, bit for bit ``intmodel.exp_neg``.

    ``b = rshift(a * 23637, 18)`` is ``a * log2(e)`` in Q8; the result is
    ``EXP2[b mod 256] >> min(b div 256, 16)`` with ``EXP2`` in a 256 x 16-bit ROM (synchronous
    read). A pipeline without back-pressure: an input in cycle ``c`` gives its output in cycle
    ``c + LATENCY``.

    Members
    -------
    i : In(stream.Signature(unsigned(LOGIT_BITS), always_ready=True))
        ``a``, Q12.
    o : Out(stream.Signature(unsigned(16), always_ready=True))
        Q15; 32768 for ``a = 0``.
    """

    LATENCY = 2

    i: In(stream.Signature(unsigned(LOGIT_BITS), always_ready=True))
    o: Out(stream.Signature(unsigned(_WEIGHT_BITS), always_ready=True))

    def elaborate(self, platform):
        m = Module()

        m.submodules.table = table = Memory(shape=unsigned(_WEIGHT_BITS), depth=len(EXP2_TABLE),
                                            init=EXP2_TABLE.tolist())
        entry = table.read_port()

        b_max  = (((1 << LOGIT_BITS) - 1) * LOG2E_Q14 + (1 << (_EXP_Q8_SHIFT - 1))) \
            >> _EXP_Q8_SHIFT
        b      = Signal(range(b_max + 1))
        shift  = Signal(range(_WEIGHT_BITS + 1))
        staged = Signal()

        m.d.sync += [
            staged.eq(self.i.valid),
            b.eq((self.i.payload * LOG2E_Q14 + (1 << (_EXP_Q8_SHIFT - 1))) >> _EXP_Q8_SHIFT),
            self.o.valid.eq(staged),
            shift.eq(Mux(b[8:] > _WEIGHT_BITS, _WEIGHT_BITS, b[8:])),
        ]
        m.d.comb += [
            entry.addr.eq(b[:8]),
            self.o.payload.eq(entry.data >> shift),
        ]
        return m


def _entry_layout(index_bits):
    return data.StructLayout({"value": signed(LOGIT_BITS), "index": unsigned(index_bits)})


class TopK(wiring.Component):
    """The ``k`` largest of a sequence of (logit, index) entries, largest first.

    Entries come in increasing index order, one per cycle at most; an entry equal to a kept one
    goes after it, so ties go to the lower index. Each entry is inserted in the cycle it is
    valid, by comparing it with all ``k`` kept entries at once; ``picks`` shows the result from
    the next cycle. ``clear`` empties the list (and takes precedence over an insertion).

    Parameters
    ----------
    k : int
        Entries kept.
    index_bits : int
        Width of the unsigned index.

    Members
    -------
    clear : In(1)
    i : In(stream.Signature(StructLayout({"value": signed(20), "index": unsigned(index_bits)}),
        always_ready=True))
    picks : Out(ArrayLayout(<the same layout>, k))
        The kept entries, largest first; defined once ``k`` entries have been entered.
    """

    def __init__(self, k, index_bits):
        if not isinstance(k, int) or k < 1:
            raise TypeError(f"k must be a positive integer, not {k!r}")
        self.k = k
        super().__init__({
            "clear": In(1),
            "i":     In(stream.Signature(_entry_layout(index_bits), always_ready=True)),
            "picks": Out(data.ArrayLayout(_entry_layout(index_bits), k)),
        })

    def elaborate(self, platform):
        m = Module()

        filled = Signal(self.k)
        new    = self.i.payload
        keep   = [filled[j] & (self.picks[j].value >= new.value) for j in range(self.k)]

        with m.If(self.clear):
            m.d.sync += filled.eq(0)
        with m.Elif(self.i.valid):
            for j in range(self.k):
                with m.If(~keep[j]):
                    if j == 0:
                        m.d.sync += [self.picks[0].eq(new), filled[0].eq(1)]
                    else:
                        m.d.sync += [
                            self.picks[j].eq(Mux(keep[j - 1], new, self.picks[j - 1])),
                            filled[j].eq(keep[j - 1] | filled[j - 1]),
                        ]
        return m


class Router(wiring.Component):
    """The expert router: per token, the top-k experts and their Q1.15 weights.

    Bit for bit ``intmodel.router_logits`` then ``intmodel.softmax_topk`` (and
    ``intmodel.sigmoid`` of the shared-expert gate). The weight rows (``experts`` rows, then the
    shared gate's row) are held in a memory of ``ceil(rows / macs)`` groups of ``macs`` rows;
    ``macs`` multiply-accumulate units compute one group's logits at once, reading the token
    from the input stream for the first group and from a token buffer for the others. The
    accumulators are ``32 + log2(hidden)`` bits wide, exact for every int16 input, so the
    48-bit saturation of the model (``ROUTER_ACC_BITS``) never triggers. docs/router.md gives
    the schedule and the cycle count.

    Tokens may be held back and outputs back-pressured at any cycle. The configuration ports
    (multipliers, ``normalize``) must be stable while a token is routed.

    Parameters
    ----------
    hidden : int
        Values per token, ``1 <= hidden < 2**17``.
    experts : int
        Router rows, ``2..256``.
    top_k : int
        Picks per token, ``1..experts``.
    macs : int
        Multiply-accumulate units, ``1..rows`` (rows: ``experts``, plus one with the gate).
    shared_gate : bool
        Hold a row for Qwen2-MoE's shared-expert gate and emit its sigmoid on ``shared``.

    Members
    -------
    load : In(stream.Signature(signed(16)))
        Router weights, row by row (``hidden`` values each), the gate's row last: ``rows *
        hidden`` beats make a load. A load starts only between tokens and finishes before the
        next token is accepted.
    router_mult : In(Multiplier)
        Router accumulator to Q12 logits (``IntLayer.router_mult``).
    gate_mult : In(Multiplier)
        The gate's accumulator to its Q12 logit; only with ``shared_gate``.
    normalize : In(1)
        Divide by the sum of ``exp`` over the picks rather than over all experts.
    i : In(stream.Signature(TokenBeat))
        Tokens, ``hidden`` beats each.
    o : Out(stream.Signature(Pick))
        ``top_k`` picks per token, largest logit first.
    shared : Out(stream.Signature(unsigned(16)))
        The gate's Q1.15 sigmoid, once per token after its picks; only with ``shared_gate``.
    """

    def __init__(self, *, hidden, experts, top_k, macs=1, shared_gate=False):
        if not isinstance(hidden, int) or not 1 <= hidden or \
                (hidden << 30).bit_length() + 1 > ROUTER_ACC_BITS:
            raise ValueError(f"Hidden size must be an integer in 1..{(1 << 17) - 1}, "
                             f"not {hidden!r}")
        if not isinstance(experts, int) or not 2 <= experts <= 256:
            raise ValueError(f"Expert count must be an integer in 2..256, not {experts!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= experts:
            raise ValueError(f"Top-k must be an integer in 1..{experts}, not {top_k!r}")
        rows = experts + bool(shared_gate)
        if not isinstance(macs, int) or not 1 <= macs <= rows:
            raise ValueError(f"MAC count must be an integer in 1..{rows}, not {macs!r}")
        self.hidden      = hidden
        self.experts     = experts
        self.top_k       = top_k
        self.macs        = macs
        self.shared_gate = bool(shared_gate)
        self.rows        = rows
        self.groups      = -(-rows // macs)
        self.acc_bits    = (hidden << 30).bit_length() + 1
        members = {
            "load":        In(stream.Signature(signed(TOKEN_BITS))),
            "router_mult": In(Multiplier),
            "normalize":   In(1),
            "i":           In(stream.Signature(TokenBeat)),
            "o":           Out(stream.Signature(Pick)),
        }
        if self.shared_gate:
            members["gate_mult"] = In(Multiplier)
            members["shared"]    = Out(stream.Signature(unsigned(_WEIGHT_BITS)))
        super().__init__(members)

    def latency(self, normalize):
        """Cycles from the first value of a token accepted to its last output taken, when no
        stream stalls; the next token's first value is accepted one cycle later.

        ``ceil(rows / macs) * (hidden + 3) + rows`` to accumulate and requantize the logits,
        ``k + gate + (0 if normalize else experts)`` exp evaluations, 18 cycles per division
        (``k + gate`` of them) and 8 cycles of pipeline latency (docs/router.md).
        """
        outputs = self.top_k + self.shared_gate
        return (self.groups * (self.hidden + 3) + self.rows
                + outputs + (0 if normalize else self.experts)
                + (_WEIGHT_BITS + 2) * outputs + 8)

    def elaborate(self, platform):
        m = Module()

        d, macs, rows, experts, k = self.hidden, self.macs, self.rows, self.experts, self.top_k
        gate = int(self.shared_gate)

        shift_bits = max(SHIFT_BITS, _EXP_BITS) + 1      # the multiplier's shift minus exp
        m.submodules.requant = requant = Requantizer(self.acc_bits, LOGIT_BITS, shift_bits,
                                                     pipelined=True)
        m.submodules.topk    = topk    = TopK(k, ceil_log2(experts))
        m.submodules.exp     = exp     = ExpUnit()
        den_bits = bits_for(experts * _ONE)
        m.submodules.divider = divider = Divider(2 * PROB_FRAC_BITS + 1, den_bits, _WEIGHT_BITS)

        m.submodules.weights = weights = Memory(
            shape=data.ArrayLayout(signed(TOKEN_BITS), macs), depth=self.groups * d, init=[])
        weight_wr = weights.write_port(granularity=1)
        weight_rd = weights.read_port()
        m.submodules.logits = logits = Memory(shape=signed(LOGIT_BITS), depth=rows, init=[])
        logit_wr = logits.write_port()
        logit_rd = logits.read_port()

        col   = Signal(range(d))                  # token value (load: weight column)
        addr  = Signal(range(self.groups * d))    # weight word
        group = Signal(range(self.groups))
        lane  = Signal(range(macs))               # row within the group (load, drain)
        row   = Signal(range(rows))               # weight row (load, drain)
        exp_t = Signal(signed(_EXP_BITS))
        x     = Signal(signed(TOKEN_BITS))
        accs  = [Signal(signed(self.acc_bits), name=f"acc{j}") for j in range(macs)]
        prods = [Signal(signed(2 * TOKEN_BITS), name=f"prod{j}") for j in range(macs)]
        w_op  = Signal.like(weight_rd.data)       # a step's operands, registered
        x_op  = Signal(signed(TOKEN_BITS))
        fetch = Signal()                          # the operands of a step are registered
        mac   = Signal()                          # its products are registered
        add   = Signal()                          # they accumulate
        zrow  = Signal(range(rows + 1))           # logits out of the requantizer
        exps  = k + gate + Mux(self.normalize, 0, experts)
        issue = Signal(range(k + gate + experts + 1))
        taken = Signal(range(k + gate + experts + 1))
        denom = Signal(den_bits)
        e_top = Signal(data.ArrayLayout(unsigned(_WEIGHT_BITS), k))
        e_sh  = Signal(_WEIGHT_BITS)
        z_neg = Signal()
        busy  = Signal()                          # a division is under way

        last_col = col == d - 1
        step = Signal()                           # one token value into the MAC pipeline
        with m.If(step):
            m.d.sync += [
                col.eq(Mux(last_col, 0, col + 1)),
                addr.eq(Mux(addr == self.groups * d - 1, 0, addr + 1)),
            ]
            with m.If(group == 0):
                m.d.sync += x.eq(self.i.payload.value)
        m.d.sync += [fetch.eq(step), mac.eq(fetch), add.eq(mac)]
        m.d.comb += weight_rd.addr.eq(addr)
        if self.groups > 1:
            m.submodules.tokens = tokens = Memory(shape=signed(TOKEN_BITS), depth=d, init=[])
            token_wr = tokens.write_port()
            token_rd = tokens.read_port()
            m.d.comb += [
                token_wr.addr.eq(col),
                token_wr.data.eq(self.i.payload.value),
                token_wr.en.eq(step & (group == 0)),
                token_rd.addr.eq(col),
            ]
            operand = Mux(group == 0, x, token_rd.data)
        else:
            operand = x
        with m.If(fetch):
            m.d.sync += [w_op.eq(weight_rd.data), x_op.eq(operand)]
        with m.If(mac):
            m.d.sync += [prod.eq(w_op[j] * x_op) for j, prod in enumerate(prods)]
        with m.If(add):
            m.d.sync += [acc.eq(acc + prod) for acc, prod in zip(accs, prods, strict=True)]

        mult = self.router_mult
        if gate:
            mult = Multiplier(Mux(row == experts, self.gate_mult.as_value(), mult.as_value()))
        m.d.comb += [
            requant.i.payload.value.eq(accs[0]),
            requant.i.payload.mult.eq(mult.mult),
            requant.i.payload.shift.eq(mult.shift - exp_t),
            requant.o.ready.eq(1),
            logit_wr.addr.eq(zrow),
            logit_wr.data.eq(requant.o.payload),
            logit_wr.en.eq(requant.o.valid),
            topk.i.valid.eq(requant.o.valid & (zrow < experts)),
            topk.i.payload.value.eq(requant.o.payload),
            topk.i.payload.index.eq(zrow),
        ]
        with m.If(requant.o.valid):
            m.d.sync += zrow.eq(zrow + 1)

        picks  = topk.picks
        issued = Signal()
        gated  = Signal()                         # the logit read is the gate's
        z_max  = picks[0].value
        z      = logit_rd.data
        m.d.comb += [
            exp.i.valid.eq(issued),
            exp.i.payload.eq(Mux(gated, Mux(z < 0, -z, z), z_max - z)),
        ]
        m.d.sync += [issued.eq(0), gated.eq(0)]
        with m.If(gated):
            m.d.sync += z_neg.eq(z < 0)
        with m.If(exp.o.valid):
            m.d.sync += taken.eq(taken + 1)
            with m.If(taken < k):
                m.d.sync += e_top[taken].eq(exp.o.payload)
                with m.If(self.normalize):
                    m.d.sync += denom.eq(denom + exp.o.payload)
            if gate:
                with m.Elif(taken == k):
                    m.d.sync += e_sh.eq(exp.o.payload)
            with m.Else():
                m.d.sync += denom.eq(denom + exp.o.payload)

        sharing = issue == k                     # the division in flight is the gate's
        m.d.comb += [
            self.o.valid.eq(divider.o.valid & ~sharing),
            self.o.payload.expert.eq(picks[issue].index),
            self.o.payload.weight.eq(divider.o.payload),
            divider.o.ready.eq(self.o.ready),
        ]
        if gate:
            m.d.comb += [
                self.shared.valid.eq(divider.o.valid & sharing),
                self.shared.payload.eq(divider.o.payload),
            ]
            with m.If(sharing):
                m.d.comb += divider.o.ready.eq(self.shared.ready)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.load.valid):
                    m.next = "LOAD"
                with m.Else():
                    m.d.comb += [self.i.ready.eq(1), step.eq(self.i.valid), topk.clear.eq(1)]
                    with m.If(self.i.valid):
                        m.d.sync += [exp_t.eq(self.i.payload.exp), zrow.eq(0), taken.eq(0),
                                     denom.eq(0)]
                        m.d.sync += [acc.eq(0) for acc in accs]
                        m.next = "MAC"
                        with m.If(last_col):
                            m.next = "FETCH"

            with m.State("LOAD"):
                m.d.comb += [
                    self.load.ready.eq(1),
                    weight_wr.addr.eq(addr),
                    weight_wr.data.eq(Cat([self.load.payload] * macs)),
                    weight_wr.en.eq(Mux(self.load.valid, Const(1, macs) << lane, 0)),
                ]
                with m.If(self.load.valid):
                    m.d.sync += [col.eq(Mux(last_col, 0, col + 1)), addr.eq(addr + 1)]
                    with m.If(last_col):
                        m.d.sync += [row.eq(row + 1), lane.eq(lane + 1),
                                     addr.eq(addr - (d - 1))]
                        with m.If(row == rows - 1):
                            m.d.sync += [row.eq(0), lane.eq(0), addr.eq(0)]
                            m.next = "IDLE"
                        with m.Elif(lane == macs - 1):
                            m.d.sync += [lane.eq(0), addr.eq(addr + 1)]

            with m.State("MAC"):
                m.d.comb += [self.i.ready.eq(group == 0),
                             step.eq((group != 0) | self.i.valid)]
                with m.If(step & last_col):
                    m.next = "FETCH"

            with m.State("FETCH"):                # the group's last operands are registered
                m.next = "FLUSH"

            with m.State("FLUSH"):                # their products are registered
                m.next = "ACCUMULATE"

            with m.State("ACCUMULATE"):           # and accumulate
                m.next = "DRAIN"

            with m.State("DRAIN"):                # the group's accumulators to the requantizer
                m.d.comb += requant.i.valid.eq(1)
                m.d.sync += [acc.eq(nxt) for acc, nxt in zip(accs, accs[1:] + [0], strict=True)]
                m.d.sync += [row.eq(row + 1), lane.eq(lane + 1)]
                with m.If(row == rows - 1):
                    m.d.sync += [row.eq(0), lane.eq(0), group.eq(0)]
                    m.next = "WAIT"
                with m.Elif(lane == macs - 1):
                    m.d.sync += [lane.eq(0), group.eq(group + 1)]
                    m.next = "MAC"

            with m.State("WAIT"):                 # the last logits through the requantizer
                with m.If(zrow == rows):
                    m.d.sync += issue.eq(0)
                    m.next = "EXP"

            with m.State("EXP"):                  # exp of the picks, the gate, all experts
                with m.If(issue != exps):
                    m.d.sync += [issue.eq(issue + 1), issued.eq(1), gated.eq(gate & sharing)]
                    m.d.comb += logit_rd.addr.eq(Mux(issue < k, picks[issue].index,
                                                     Mux(sharing, experts, issue - (k + gate))))
                with m.If(taken == exps):
                    m.d.sync += issue.eq(0)
                    m.next = "DIVIDE"

            with m.State("DIVIDE"):               # weights, pick by pick, then the gate's
                m.d.comb += [
                    divider.i.valid.eq(~busy),
                    divider.i.payload.num.eq(e_top[issue] << PROB_FRAC_BITS),
                    divider.i.payload.den.eq(denom),
                ]
                if gate:
                    with m.If(sharing):
                        m.d.comb += [
                            divider.i.payload.num.eq(Mux(z_neg, e_sh << PROB_FRAC_BITS,
                                                         _ONE << PROB_FRAC_BITS)),
                            divider.i.payload.den.eq(_ONE + e_sh),
                        ]
                with m.If(divider.i.valid & divider.i.ready):
                    m.d.sync += busy.eq(1)
                with m.If(divider.o.valid & divider.o.ready):
                    m.d.sync += [busy.eq(0), issue.eq(issue + 1)]
                    with m.If(issue == k + gate - 1):
                        m.d.sync += issue.eq(0)
                        m.next = "IDLE"
        return m
