"""Fidelity of the integer model against the float reference, the thresholds of the foundation.

On small random checkpoints of every family, on every MoE layer: int8 per-channel cosine >= 0.99,
int4 with G = 32 cosine >= 0.97, and routing agreement >= 95 %. Calibration and evaluation
tokens are drawn apart.
"""

import pytest

from moefpga.hls_models import synthetic
from moefpga.hls_models.calibrate import QuantSpec, calibration_tokens
from moefpga.hls_models.checkpoint import Checkpoint
from moefpga.hls_models.fidelity import evaluate_layer
from moefpga.hls_models.sparsity import parse_sparsity

THRESHOLDS = [
    (QuantSpec(bits=8), 0.99),
    (QuantSpec(bits=8, sparsity=parse_sparsity("2:4")), 0.99),
    (QuantSpec(bits=4, group_size=32), 0.97),
    (QuantSpec(bits=4, group_size=32, sparsity=parse_sparsity("2:4")), 0.97),
]

MODELS = {
    "mixtral": {},
    "olmoe": {},
    "qwen2_moe": {},
    "qwen3_moe": {},
    "qwen3_moe-64x8": {"num_experts": 64, "top_k": 8},
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def checkpoint(request, tmp_path_factory):
    family = request.param.split("-")[0]
    path = synthetic.write_checkpoint(tmp_path_factory.mktemp(request.param) / "m", family,
                                      num_layers=2, **MODELS[request.param])
    return Checkpoint.open(path)


@pytest.mark.parametrize("spec,min_cosine", THRESHOLDS, ids=[str(s) for s, _ in THRESHOLDS])
def test_every_layer_meets_the_fidelity_thresholds(checkpoint, spec, min_cosine):
    hidden = checkpoint.config.hidden_size
    for layer in checkpoint.config.moe_layers:
        norm = checkpoint.norm_weight(layer)
        tokens = calibration_tokens(hidden, norm, count=256, seed=100 + layer)
        calibration = calibration_tokens(hidden, norm, count=256, seed=layer)
        f = evaluate_layer(checkpoint.moe_layer(layer), spec, tokens, calibration)
        print(f"layer {layer} {spec}: cosine {f.cosine:.5f}, rel L2 {f.rel_l2:.4f}, "
              f"routing {f.routing_agreement:.1%}")
        assert f.cosine >= min_cosine
        assert f.routing_agreement >= 0.95
