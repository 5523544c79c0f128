"""How many bytes a layer's experts take in each weight format the hardware accepts."""

from ..hls_models.calibrate import QuantSpec
from ..hls_models.errors import MoefpgaError
from ..hls_models.quant import packed_matrix_nbytes
from ..hls_models.sparsity import parse_sparsity

__all__ = ["STORAGE_SPECS", "layer_storage_table"]

#: The formats ``moefpga info`` lists, besides the float ones.
STORAGE_SPECS = (
    QuantSpec(8), QuantSpec(8, sparsity=parse_sparsity("2:4")),
    QuantSpec(8, sparsity=parse_sparsity("1:4")), QuantSpec(4, 32),
    QuantSpec(4, 32, parse_sparsity("2:4")), QuantSpec(4, 128, parse_sparsity("2:4")),
)


def _expert_matrices(cfg):
    """(rows, cols) of every expert matrix of one MoE layer, shared expert included."""
    shapes = []
    for ffn, count in ((cfg.expert_ffn_size, cfg.num_experts), (cfg.shared_expert_ffn_size, 1)):
        if ffn:
            shapes += [(ffn, cfg.hidden_size), (ffn, cfg.hidden_size),
                       (cfg.hidden_size, ffn)] * count
    return shapes


def layer_storage_table(cfg):
    """Rows ``format  bytes  ratio`` for one MoE layer of ``cfg``, float32 and bf16 first.

    A format whose group size or M does not divide the layer's shapes says so instead.
    """
    shapes = _expert_matrices(cfg)
    weights = sum(rows * cols for rows, cols in shapes)
    rows = [("float32", 4 * weights), ("bfloat16", 2 * weights)]
    for spec in STORAGE_SPECS:
        try:
            size = sum(packed_matrix_nbytes(r, c, spec.bits, spec.group_size, spec.sparsity)
                       for r, c in shapes)
        except MoefpgaError as exc:
            rows.append((str(spec), str(exc)))
            continue
        rows.append((str(spec), size))
    return [f"{name:<22}{_mb(size):>12}{4 * weights / size:>8.2f}x" if isinstance(size, int)
            else f"{name:<22}  does not fit: {size}" for name, size in rows]


def _mb(size):
    return f"{size / 1e6:.3f} MB"

