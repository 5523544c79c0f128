"""The bit-accurate integer model of the accelerator: the specification the RTL must equal.

Every rounding, saturation and bit width here is stated in docs/numerics.md, section by section
in the order of this file; the gateware in ``moefpga.rtl`` computes exactly these functions.
Inputs are tokens quantized by :func:`moefpga.hls_models.quant.quantize_activations` to 16 bits:
int16 values ``x16`` (tokens, hidden) and a power-of-two exponent ``exp`` per token (the token is
``x16 * 2**exp``). The router reads the int16 token; the experts read the int8 token derived from
it on chip (:func:`expert_input`). A layer's static parameters come from
:mod:`moefpga.hls_models.calibrate`.
"""

from dataclasses import dataclass

import numpy as np

from .fixedpoint import Multiplier, round_shift, saturate

__all__ = [
    "TOKEN_BITS", "ACT_BITS", "ROUTER_ACC_BITS", "LOGIT_BITS", "LOGIT_FRAC_BITS",
    "PROB_FRAC_BITS", "UP_BITS", "OUT_BITS", "EXP2_TABLE", "LOG2E_Q14",
    "IntExpert", "IntLayer",
    "matvec", "expert_input", "router_logits", "shared_gate_logit", "exp_neg", "softmax_topk",
    "sigmoid", "expert_ffn", "RAIL_STAGES", "combine", "moe_layer",
]

TOKEN_BITS      = 16    # tokens as the host sends them, read by the router
ACT_BITS        = 8     # expert inputs, SiLU input, FFN hidden activations
ROUTER_ACC_BITS = 48    # router and shared-gate accumulators (int16 x int16 products)
LOGIT_BITS      = 20    # router logits, signed
LOGIT_FRAC_BITS = 12    # ... with 12 fractional bits: range [-128, 128), step 1/4096
PROB_FRAC_BITS  = 15    # exp() values and routing weights: 1.0 == 2**15, unsigned 16-bit
UP_BITS         = 16    # up projection, requantized before the SiLU product
OUT_BITS        = 32    # expert outputs and the combined layer output

#: log2(e) in Q2.14, the factor that turns a natural exponent into a base-2 one.
LOG2E_Q14 = 23637
#: ``EXP2_TABLE[f] = round(2**15 * 2**(-f / 256))``: the fractional part of 2**-b, b in Q8.
EXP2_TABLE = np.rint(2.0 ** (PROB_FRAC_BITS - np.arange(256) / 256)).astype(np.int64)


@dataclass(frozen=True)
class IntExpert:
    """One SwiGLU expert as the hardware holds it.

    Members
    -------
    gate, up, down : QuantizedMatrix
        Quantized (and M:N-pruned) weights; ``gate`` and ``up`` are (ffn, hidden), ``down`` is
        (hidden, ffn).
    gate_mult : Multiplier
        Gate accumulator to the int8 SiLU-table index (times the token's ``2**exp``).
    silu_table : ndarray of int64, shape (256,)
        int8 SiLU outputs; entry ``i + 128`` is the output for the index ``i``.
    up_mult : Multiplier
        Up accumulator to int16 (times the token's ``2**exp``).
    hidden_mult : Multiplier
        ``silu * up`` product (int8 x int16) to the int8 hidden activation.
    down_mult : Multiplier
        Down accumulator to the layer's int32 output unit.
    """
    gate:        object
    up:          object
    down:        object
    gate_mult:   Multiplier
    silu_table:  np.ndarray
    up_mult:     Multiplier
    hidden_mult: Multiplier
    down_mult:   Multiplier


@dataclass(frozen=True)
class IntLayer:
    """One MoE layer as the hardware holds it.

    Members
    -------
    router : ndarray of int64, shape (experts, hidden)
        int16 router weights.
    router_mult : Multiplier
        Router accumulator to Q12 logits (times the token's ``2**exp``).
    experts : list of IntExpert
    top_k : int
    normalize : bool
        Divide the k routing weights by their sum instead of by the sum over all experts.
    shared : IntExpert or None
        The shared expert, added to every token.
    shared_gate : ndarray of int64, shape (hidden,), or None
        int16 weights of the shared expert's sigmoid gate; None means a gate of 1.0.
    shared_gate_mult : Multiplier or None
        Shared-gate accumulator to a Q12 logit.
    out_scale : float
        Real value of one LSB of the int32 output.
    acc_bits : int
        Width of the expert datapath's saturating accumulators.
    """
    router:           np.ndarray
    router_mult:      Multiplier
    experts:          list
    top_k:            int
    normalize:        bool
    shared:           IntExpert | None
    shared_gate:      np.ndarray | None
    shared_gate_mult: Multiplier | None
    out_scale:        float
    acc_bits:         int

    @property
    def num_experts(self):
        return len(self.experts)


def matvec(q, mant, group_size, x, acc_bits):
    """Integer matrix-vector products of a quantized (and possibly M:N-pruned) weight matrix.

    For every token ``t`` and output row ``r``: the exact partial sum of each quantization group,
    ``psum = sum(q[r, i] * x[t, i] for i in group)``, is multiplied by the group's mantissa and
    added to a saturating ``acc_bits``-bit accumulator, group by group in column order::

        acc = saturate(acc + psum * mant[r, g], acc_bits)

    Pruned weights are zeros in ``q`` and contribute nothing, so the dense and compressed forms
    of a matrix give the same result. Partial sums are computed by float64 matrix products,
    which are exact for int8/int16 operands (every sum stays an integer below 2**53).

    Parameters
    ----------
    q : ndarray of int, shape (rows, cols)
        Weights (int8 range for 8-bit, int4 range for 4-bit weights).
    mant : ndarray of int, shape (rows, cols // group_size)
        Unsigned per-group scale mantissas.
    group_size : int
        Columns per quantization group; divides ``cols``.
    x : ndarray of int, shape (tokens, cols)
        Activations: int8 for the experts, int16 tokens for the router.
    acc_bits : int
        Width of the signed accumulator.

    Returns
    -------
    ndarray of int64, shape (tokens, rows)
    """
    rows, cols = np.shape(q)
    groups = cols // group_size
    # (groups, cols-in-group, rows) and (groups, tokens, cols-in-group) for a batched matmul.
    q_by_group = np.asarray(q, np.float64).reshape(rows, groups, group_size).transpose(1, 2, 0)
    x_by_group = np.asarray(x, np.float64).reshape(-1, groups, group_size).transpose(1, 0, 2)
    mant = np.asarray(mant, dtype=np.int64).T[:, None, :]
    tokens = x_by_group.shape[1]
    acc = np.zeros((tokens, rows), dtype=np.int64)
    chunk = max(1, _MATVEC_CHUNK // (groups * rows))
    for start in range(0, tokens, chunk):
        part = slice(start, start + chunk)
        scaled = _exact_int(np.matmul(x_by_group[:, part], q_by_group)) * mant
        if np.abs(scaled).sum(axis=0).max() < 1 << (acc_bits - 1):
            acc[part] = scaled.sum(axis=0)      # no running sum can reach saturation
            continue
        for g in range(groups):
            acc[part] = saturate(acc[part] + scaled[g], acc_bits)
    return acc


#: Partial sums computed at once by :func:`matvec` (elements), to bound its memory.
_MATVEC_CHUNK = 1 << 24


def _exact_int(products):
    """float64 integer sums (BLAS) to int64. Exact: every partial sum is an integer below 2**53
    (a group of G products of at most 2**30 each, G <= 2**22)."""
    return np.rint(products).astype(np.int64)


def expert_input(x16, exp):
    """The int8 token the experts read: ``saturate(round_shift(x16, 8), 8)``, exponent + 8."""
    shift = TOKEN_BITS - ACT_BITS
    return saturate(round_shift(np.asarray(x16, dtype=np.int64), shift), ACT_BITS), exp + shift


def _logits(weights, x16, exp, mult):
    """Q12 logits of int16 weight rows: ``saturate(acc * mult * 2**exp, 20)``, acc 48 bits."""
    weights = np.atleast_2d(weights)
    acc = matvec(weights, np.ones((weights.shape[0], 1), dtype=np.int64), weights.shape[1],
                 x16, ROUTER_ACC_BITS)
    return mult.apply(acc, LOGIT_BITS, exp)


def router_logits(x16, exp, layer):
    """Q12 router logits (tokens, experts) of int16 tokens."""
    return _logits(layer.router, x16, exp, layer.router_mult)


def shared_gate_logit(x16, exp, layer):
    """Q12 logit (tokens,) of the shared expert's sigmoid gate; the layer must have the gate."""
    return _logits(layer.shared_gate, x16, exp, layer.shared_gate_mult)[:, 0]


def exp_neg(a):
    """``exp(-a / 4096)`` in Q15 for Q12 ``a >= 0``, as the hardware computes it.

    ``b = round_shift(a * LOG2E_Q14, 18)`` is ``a * log2(e)`` in Q8; the result is
    ``EXP2_TABLE[b % 256] >> (b // 256)`` (0 once the shift reaches 16).
    """
    a = np.asarray(a, dtype=np.int64)
    b = round_shift(a * LOG2E_Q14, 14 + LOGIT_FRAC_BITS - 8)
    return EXP2_TABLE[b & 0xff] >> np.minimum(b >> 8, PROB_FRAC_BITS + 1)


def softmax_topk(logits, top_k, normalize):
    """Top-k experts and their fixed-point softmax weights from Q12 logits.

    The k largest logits win, ties to the lower expert index; picks come in that order. Each
    expert's ``e = exp_neg(max_logit - logit)`` (Q15); a pick's weight is
    ``(e << 15) // denominator`` (floor), where the denominator sums ``e`` over the k picks when
    ``normalize`` and over all experts otherwise. Weights are unsigned Q1.15 (1.0 == 32768).

    Returns
    -------
    experts : ndarray of int64, shape (tokens, top_k)
    weights : ndarray of int64, shape (tokens, top_k)
    """
    logits = np.asarray(logits, dtype=np.int64)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    e = exp_neg(logits.max(axis=1, keepdims=True) - logits)
    picked = np.take_along_axis(e, order, axis=1)
    denom = (picked if normalize else e).sum(axis=1, keepdims=True)
    return order, (picked << PROB_FRAC_BITS) // denom


def sigmoid(logit):
    """``sigmoid(logit / 4096)`` in unsigned Q1.15 from Q12 logits, by the same exp unit.

    With ``e = exp_neg(|logit|)``: ``(1 << 30) // (2**15 + e)`` for ``logit >= 0`` and
    ``(e << 15) // (2**15 + e)`` otherwise.
    """
    logit = np.asarray(logit, dtype=np.int64)
    e = exp_neg(np.abs(logit))
    num = np.where(logit >= 0, 1 << PROB_FRAC_BITS, e) << PROB_FRAC_BITS
    return num // ((1 << PROB_FRAC_BITS) + e)


def expert_ffn(xq, exp, expert, acc_bits, rails=None):
    """One SwiGLU expert on int8 tokens: ``down(silu(gate x) * up x)`` in the output's int32 unit.

    1. ``g = saturate(gate_acc * gate_mult * 2**exp, 8)``; ``s = silu_table[g + 128]`` (int8).
    2. ``u = saturate(up_acc * up_mult * 2**exp, 16)``.
    3. ``h = saturate(s * u * hidden_mult, 8)``.
    4. ``y = saturate(down_acc(h) * down_mult, 32)``.

    ``rails``, a :class:`collections.Counter` if given, counts per stage the values that sit at
    the limit of their width (the sign of saturation; see :data:`RAIL_STAGES`) and the values
    computed. It is a diagnostic and changes nothing.
    """
    g = expert.gate_mult.apply(_project(expert.gate, xq, acc_bits), ACT_BITS, exp)
    u = expert.up_mult.apply(_project(expert.up, xq, acc_bits), UP_BITS, exp)
    s = expert.silu_table[g + (1 << (ACT_BITS - 1))]
    h = expert.hidden_mult.apply(s * u, ACT_BITS)
    y = expert.down_mult.apply(_project(expert.down, h, acc_bits), OUT_BITS)
    if rails is not None:
        for stage, values, bits in zip(RAIL_STAGES, (g, u, h, y),
                                       (ACT_BITS, UP_BITS, ACT_BITS, OUT_BITS), strict=True):
            limit = 1 << (bits - 1)
            rails[stage] += int(np.count_nonzero((values >= limit - 1) | (values <= -limit)))
            rails[stage, "values"] += values.size
    return y


#: The requantized stages of :func:`expert_ffn`, as its ``rails`` counter names them.
RAIL_STAGES = ("SiLU input", "up projection", "hidden activation", "expert output")


def _project(qm, x, acc_bits):
    return matvec(qm.q, qm.mant, qm.group_size, x, acc_bits)


def combine(weights, outputs):
    """Weighted sum of int32 expert outputs with Q1.15 weights: ``saturate(round_shift(sum, 15))``.

    Parameters
    ----------
    weights : ndarray, shape (tokens, n)
    outputs : ndarray, shape (tokens, n, hidden)
    """
    acc = (np.asarray(weights, dtype=np.int64)[:, :, None] * outputs).sum(axis=1)
    return saturate(round_shift(acc, PROB_FRAC_BITS), OUT_BITS)


def moe_layer(x16, exp, layer, return_routing=False, rails=None):
    """A whole MoE layer on a batch of tokens: route, run each picked expert on its tokens,
    add the shared expert, combine.

    Parameters
    ----------
    x16 : ndarray of int16, shape (tokens, hidden)
    exp : ndarray of int, shape (tokens,)
        Power-of-two token exponents.
    layer : IntLayer
    return_routing : bool
        Also return the picks and their Q1.15 weights.
    rails : collections.Counter, optional
        Passed to :func:`expert_ffn` for every expert run.

    Returns
    -------
    out : ndarray of int64, shape (tokens, hidden)
        int32 outputs; the real output is ``out * layer.out_scale``.
    """
    x16 = np.asarray(x16, dtype=np.int64)
    exp16 = np.asarray(exp, dtype=np.int64)
    picks, weights = softmax_topk(router_logits(x16, exp16, layer), layer.top_k,
                                  layer.normalize)
    xq, exp = expert_input(x16, exp16)
    tokens, hidden = xq.shape
    outputs = np.zeros((tokens, layer.top_k + 1, hidden), dtype=np.int64)
    for index in np.unique(picks):
        token, slot = np.nonzero(picks == index)
        outputs[token, slot] = expert_ffn(xq[token], exp[token], layer.experts[index],
                                          layer.acc_bits, rails)
    shared_weight = np.zeros((tokens, 1), dtype=np.int64)
    if layer.shared is not None:
        outputs[:, -1] = expert_ffn(xq, exp, layer.shared, layer.acc_bits, rails)
        if layer.shared_gate is None:
            shared_weight[:] = 1 << PROB_FRAC_BITS
        else:
            shared_weight[:, 0] = sigmoid(shared_gate_logit(x16, exp16, layer))
    out = combine(np.concatenate([weights, shared_weight], axis=1), outputs)
    return (out, picks, weights) if return_routing else out
