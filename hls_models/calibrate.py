"""The hardware form of a layer: prune, quantize, and choose the static requantization scales.

The host does this once per layer and configuration (:class:`QuantSpec`). Weights are pruned
M:N, then quantized (:mod:`moefpga.hls_models.quant`); the router and the shared-expert gate
become int16 with one scale per tensor. The datapath's intermediate values (SiLU input, up
projection, hidden activation, output) get static scales from the largest magnitudes seen on
calibration tokens, with headroom; each scale ratio becomes a 16-bit :class:`Multiplier`.
docs/numerics.md states every choice made here.
"""

from dataclasses import dataclass, field, replace

import numpy as np

from .errors import MoefpgaError
from .fixedpoint import multiplier_for
from .intmodel import LOGIT_FRAC_BITS, OUT_BITS, UP_BITS, IntExpert, IntLayer
from .quant import (
    MANT_BITS,
    dequantize_activations,
    quantize_activations,
    quantize_weights,
    resolve_group_size,
)
from .sparsity import DENSE, Sparsity, check_width, prune

__all__ = [
    "QuantSpec", "ROUTER_BITS", "HEADROOM", "UP_HEADROOM", "OUT_HEADROOM_BITS",
    "ROUTER_MAX_HIDDEN", "prune_layer", "calibration_tokens", "max_inputs", "check_shapes",
    "quantize_layer",
]

ROUTER_BITS       = 16    # router and shared-gate weights, one scale per tensor
HEADROOM          = 1.25  # int8 intermediates: calibrated maximum maps to 127 / HEADROOM
UP_HEADROOM       = 4.0   # int16 up projection: calibrated maximum maps to 32767 / UP_HEADROOM
OUT_HEADROOM_BITS = 7     # int32 output: calibrated maximum maps to 2**(31 - 7)


@dataclass(frozen=True)
class QuantSpec:
    """How a layer is quantized and pruned for the hardware.

    Members
    -------
    bits : int
        Expert weight width, 8 or 4.
    group_size : int or None
        Input weights per scale; None is one scale per output channel.
    sparsity : Sparsity
        M:N pattern of the expert weights (the router is never pruned).
    acc_bits : int
        Width of the datapath's saturating accumulators.
    """
    bits:       int      = 8
    group_size: int | None = None
    sparsity:   Sparsity = field(default=DENSE)
    acc_bits:   int      = 40

    def __str__(self):
        group = "per-channel" if self.group_size is None else f"G={self.group_size}"
        return f"int{self.bits} {group} {self.sparsity}"


def prune_layer(weights, sparsity):
    """``weights`` with every expert matrix (shared expert included) M:N-pruned; router intact."""
    if sparsity.is_dense:
        return weights
    def prune_expert(ew):
        return replace(ew, gate=prune(ew.gate, sparsity), up=prune(ew.up, sparsity),
                       down=prune(ew.down, sparsity))
    return replace(weights,
                   experts=[prune_expert(ew) for ew in weights.experts],
                   shared=None if weights.shared is None else prune_expert(weights.shared))


def calibration_tokens(hidden_size, norm_weight=None, count=256, seed=0):
    """Synthetic MoE inputs with the statistics of an RMSNorm output: ``N(0, 1) * norm_weight``.

    The default calibration set when the user gives none: a layer's input is the output of the
    RMSNorm before it, whose per-channel scale is that norm's weight.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, hidden_size))
    if norm_weight is not None:
        x = x * np.asarray(norm_weight, dtype=np.float64)
    return x.astype(np.float32)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _step(maxabs, levels, headroom):
    """The real value of one LSB so that ``maxabs * headroom`` maps to ``levels``."""
    return headroom * maxabs / levels if maxabs > 0 else 1.0


def _quantize_tensor(w):
    """int16 weights with one per-tensor scale; returns (q, scale)."""
    maxabs = float(np.abs(w).max())
    scale = maxabs / ((1 << (ROUTER_BITS - 1)) - 1) if maxabs > 0 else 1.0
    return np.rint(np.asarray(w, dtype=np.float64) / scale).astype(np.int64), scale


def _silu_table(step_in):
    """int8 SiLU outputs over the int8 input domain with input step ``step_in``; (table, step)."""
    silu = _silu(np.arange(-128, 128) * step_in)
    step_out = float(np.abs(silu).max()) / 127
    return np.rint(silu / step_out).astype(np.int64), step_out


def _quantize_expert(ew, spec, x):
    """Quantize one expert and calibrate it on float tokens ``x``.

    Returns the expert without its ``down_mult`` (that needs the layer's output scale) and the
    largest output magnitude seen.
    """
    gate, up, down = (quantize_weights(w, spec.bits, spec.group_size, spec.sparsity)
                      for w in (ew.gate, ew.up, ew.down))
    g = x @ gate.dequantize().astype(np.float64).T
    u = x @ up.dequantize().astype(np.float64).T
    h = _silu(g) * u
    y = h @ down.dequantize().astype(np.float64).T
    gate_step = _step(np.abs(g).max(), 127, HEADROOM)
    up_step = _step(np.abs(u).max(), (1 << (UP_BITS - 1)) - 1, UP_HEADROOM)
    hidden_step = _step(np.abs(h).max(), 127, HEADROOM)
    table, silu_step = _silu_table(gate_step)
    expert = IntExpert(
        gate=gate, up=up, down=down,
        gate_mult=multiplier_for(gate.scale / (1 << MANT_BITS) / gate_step),
        silu_table=table,
        up_mult=multiplier_for(up.scale / (1 << MANT_BITS) / up_step),
        hidden_mult=multiplier_for(silu_step * up_step / hidden_step),
        down_mult=None)
    return expert, hidden_step, float(np.abs(y).max())


#: Largest magnitude of one input's contribution to an expert accumulator: int8 x int8 x mant.
_MAX_TERM = (1 << 7) * (1 << 7) * (1 << 8)


def max_inputs(acc_bits):
    """The most inputs per row for which no ``acc_bits`` accumulator can saturate.

    Every accepted shape stays below it, so saturation never happens and the order in which the
    hardware accumulates groups cannot change a result.
    """
    return ((1 << (acc_bits - 1)) - 1) // _MAX_TERM


#: Router rows (int16 x int16 products) stay below 2**61 after the 16-bit multiplier.
ROUTER_MAX_HIDDEN = (1 << 15) - 1


def check_shapes(weights, spec):
    """Refuse a layer whose shapes ``spec`` or the hardware cannot take, naming the dimension:
    a width that M or G does not divide, or one that could saturate an accumulator."""
    hidden = weights.router.shape[1]
    if hidden > ROUTER_MAX_HIDDEN:
        raise MoefpgaError(f"hidden size {hidden} is too large for the router: at most "
                           f"{ROUTER_MAX_HIDDEN}")
    limit = max_inputs(spec.acc_bits)
    widths = [("hidden size", hidden), ("expert ffn size", weights.experts[0].down.shape[1])]
    if weights.shared is not None:
        widths.append(("shared expert ffn size", weights.shared.down.shape[1]))
    for name, cols in widths:
        check_width(cols, spec.sparsity, name)
        resolve_group_size(cols, spec.group_size, name)
        if cols > limit:
            raise MoefpgaError(f"{name} {cols} is too large for {spec.acc_bits}-bit "
                               f"accumulators: at most {limit} inputs per row")


def quantize_layer(weights, spec, calibration):
    """The :class:`IntLayer` of a float layer under ``spec``, calibrated on float tokens.

    Parameters
    ----------
    weights : MoELayerWeights
        Float weights (unpruned; pruning follows ``spec.sparsity``).
    spec : QuantSpec
    calibration : ndarray of float32, shape (tokens, hidden)
        Tokens whose intermediate values set the static scales.
    """
    check_shapes(weights, spec)
    xq, exp = quantize_activations(calibration)
    x = dequantize_activations(xq, exp).astype(np.float64)
    router, router_scale = _quantize_tensor(weights.router)
    parts = [_quantize_expert(ew, spec, x) for ew in weights.experts]
    shared = None if weights.shared is None else _quantize_expert(weights.shared, spec, x)
    y_max = max(part[2] for part in parts + ([shared] if shared else []))
    out_scale = _step(y_max, 1 << (OUT_BITS - 1 - OUT_HEADROOM_BITS), 1.0)

    def finish(part):
        expert, hidden_step, _ = part
        return replace(expert, down_mult=multiplier_for(
            expert.down.scale / (1 << MANT_BITS) * hidden_step / out_scale))

    shared_gate, shared_gate_mult = None, None
    if weights.shared_gate is not None:
        shared_gate, gate_scale = _quantize_tensor(np.reshape(weights.shared_gate, -1))
        shared_gate_mult = multiplier_for(gate_scale * (1 << LOGIT_FRAC_BITS))
    return IntLayer(
        router=router, router_mult=multiplier_for(router_scale * (1 << LOGIT_FRAC_BITS)),
        experts=[finish(part) for part in parts], top_k=weights.top_k,
        normalize=weights.norm_topk_prob, shared=None if shared is None else finish(shared),
        shared_gate=shared_gate, shared_gate_mult=shared_gate_mult, out_scale=out_scale,
        acc_bits=spec.acc_bits)

