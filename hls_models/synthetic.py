"""Small random checkpoints in the exact Hugging Face layout of each supported family.

They stand in for published checkpoints in tests and demos: the same ``config.json`` keys (in the
older or the current transformers style), the same tensor names and shapes, the same sharding
files, in float32 or bfloat16. Weights are seeded and reproducible.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path
from types import MappingProxyType

import numpy as np
from safetensors.numpy import save_file

from moefpga.hls_models.checkpoint import INDEX_NAME
from moefpga.hls_models.config import FAMILIES
from moefpga.hls_models.errors import MoefpgaError

__all__ = ["DEFAULT_MODEL", "ensure_default_model", "write_checkpoint"]

#: The model the demo runs: Qwen2-MoE shaped (routed experts plus a gated shared expert), small
#: enough for the NumPy models to run every layer in seconds, stored in bfloat16 like the
#: published checkpoints.
DEFAULT_MODEL = MappingProxyType({
    "family":                 "qwen2_moe",
    "num_layers":             4,
    "hidden_size":            128,
    "num_experts":            8,
    "top_k":                  2,
    "expert_ffn_size":        256,
    "shared_expert_ffn_size": 256,
    "vocab_size":             512,
    "num_attention_heads":    4,
    "num_key_value_heads":    2,
    "seed":                   0,
    "dtype":                  "bfloat16",
})

_ROPE_THETA = 1e6
_TRANSFORMERS_VERSION = {"legacy": "4.46.0", "current": "5.0.0"}
_ARCHITECTURE = {
    "mixtral":   "MixtralForCausalLM",
    "olmoe":     "OlmoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def write_checkpoint(path: str | Path, family: str, *, num_layers: int = 2,
                     hidden_size: int = 64, num_experts: int = 8, top_k: int = 2,
                     expert_ffn_size: int = 128, shared_expert_ffn_size: int | None = None,
                     vocab_size: int = 256, num_attention_heads: int = 4,
                     num_key_value_heads: int = 2, head_dim: int | None = None,
                     norm_topk_prob: bool | None = None, seed: int = 0,
                     config_style: str = "current", shards: int = 1, dtype: str = "float32",
                     mlp_only_layers: tuple[int, ...] = ()) -> Path:
    """Write a complete random checkpoint of ``family`` into the folder ``path``.

    Parameters
    ----------
    path : str or Path
        Destination folder; created if needed, and must not already hold a checkpoint.
    family : str
        One of ``mixtral``, ``olmoe``, ``qwen2_moe``, ``qwen3_moe``.
    shared_expert_ffn_size : int, optional
        Shared expert size; default 128 for ``qwen2_moe`` (the only family that has one).
    head_dim : int, optional
        Attention head size; default ``hidden_size // num_attention_heads``.
    norm_topk_prob : bool, optional
        Default as the family's published checkpoints: True for Mixtral (fixed) and Qwen3-MoE,
        False for OLMoE and Qwen2-MoE.
    config_style : {"current", "legacy"}
        ``"legacy"``: top-level ``rope_theta`` and ``torch_dtype``, as transformers 4.x wrote.
        ``"current"``: ``rope_parameters`` and ``dtype``, as transformers 5 writes.
    shards : int
        One file ``model.safetensors``, or that many ``model-0000k-of-0000n.safetensors`` files
        with ``model.safetensors.index.json``.
    dtype : {"float32", "bfloat16"}
        Storage type of every tensor (bfloat16 rounds to nearest even).
    mlp_only_layers : tuple of int
        Qwen families only: layers with a dense MLP instead of an MoE block.

    Other parameters are the model dimensions, and ``seed`` for the weights.

    Returns
    -------
    Path
        The folder.

    Raises
    ------
    MoefpgaError
        For an option the family does not have, a bad style, dtype or shard count, or a folder
        that already holds a checkpoint.
    """
    path = Path(path)
    head_dim = head_dim or hidden_size // num_attention_heads
    if shared_expert_ffn_size is None:
        shared_expert_ffn_size = 128 if family == "qwen2_moe" else 0
    if norm_topk_prob is None:
        norm_topk_prob = family in ("mixtral", "qwen3_moe")
    _check_options(family, config_style, dtype, shards, shared_expert_ffn_size, norm_topk_prob,
                   mlp_only_layers, num_layers, top_k, num_experts)
    dims = {
        "d": hidden_size, "layers": num_layers, "experts": num_experts, "ffn": expert_ffn_size,
        "shared": shared_expert_ffn_size, "dense": 2 * expert_ffn_size, "vocab": vocab_size,
        "heads": num_attention_heads, "kv_heads": num_key_value_heads, "head_dim": head_dim,
        "mlp_only": tuple(mlp_only_layers),
    }
    config = _config(family, config_style, dtype, dims, top_k, norm_topk_prob)
    tensors = _tensors(family, dims, np.random.default_rng(seed))
    if shards > len(tensors):
        raise MoefpgaError(f"shards={shards} exceeds the {len(tensors)} tensors of the model")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoefpgaError(f"{path}: cannot create the checkpoint folder ({exc.strerror})") \
            from None
    if any(path.glob("*.safetensors")) or (path / "config.json").exists():
        raise MoefpgaError(f"{path}: already holds a checkpoint; choose an empty folder")
    _write_shards(path, tensors, shards, dtype)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def ensure_default_model(path: str | Path) -> Path:
    """Write :data:`DEFAULT_MODEL` to ``path`` unless a checkpoint is already there.

    The model is written to a temporary sibling folder and renamed into place, so an interrupted
    run never leaves a partial checkpoint behind.
    """
    path = Path(path)
    if (path / "config.json").exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as exc:
        raise MoefpgaError(f"{path}: cannot create the default model there "
                           f"({exc.strerror})") from None
    try:
        write_checkpoint(staging, **DEFAULT_MODEL)
        os.replace(staging, path)
    except OSError as exc:
        raise MoefpgaError(f"{path}: cannot create the default model there "
                           f"({exc.strerror})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _check_options(family: str, config_style: str, dtype: str, shards: int, shared: int,
                   norm_topk_prob: bool, mlp_only: tuple[int, ...], num_layers: int, top_k: int,
                   num_experts: int) -> None:
    if family not in FAMILIES:
        raise MoefpgaError(f"unknown family {family!r}; supported: {', '.join(FAMILIES)}")
    if config_style not in _TRANSFORMERS_VERSION:
        raise MoefpgaError(f"config_style must be 'current' or 'legacy', not {config_style!r}")
    if dtype not in ("float32", "bfloat16"):
        raise MoefpgaError(f"dtype must be 'float32' or 'bfloat16', not {dtype!r}")
    if not isinstance(shards, int) or shards < 1:
        raise MoefpgaError(f"shards must be a positive integer, not {shards!r}")
    if shared and family != "qwen2_moe":
        raise MoefpgaError(f"{family} has no shared expert")
    if family == "mixtral" and not norm_topk_prob:
        raise MoefpgaError("mixtral always renormalizes the top-k weights")
    if mlp_only and family not in ("qwen2_moe", "qwen3_moe"):
        raise MoefpgaError(f"{family} has no dense layers (mlp_only_layers)")
    if not set(mlp_only) <= set(range(num_layers)) or len(set(mlp_only)) == num_layers:
        raise MoefpgaError(f"mlp_only_layers {list(mlp_only)} must be some, not all, of the "
                           f"layers 0..{num_layers - 1}")
    if not 1 <= top_k <= num_experts:
        raise MoefpgaError(f"top_k must be in 1..{num_experts}, not {top_k}")


def _config(family: str, style: str, dtype: str, dims: dict, top_k: int,
            norm_topk_prob: bool) -> dict:
    """The ``config.json`` contents, with the keys the family's transformers class writes."""
    config = {
        "architectures": [_ARCHITECTURE[family]],
        "model_type": family,
        "vocab_size": dims["vocab"],
        "hidden_size": dims["d"],
        "num_hidden_layers": dims["layers"],
        "num_attention_heads": dims["heads"],
        "num_key_value_heads": dims["kv_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "num_experts_per_tok": top_k,
        "transformers_version": _TRANSFORMERS_VERSION[style],
    }
    if family == "mixtral":
        config |= {"num_local_experts": dims["experts"], "intermediate_size": dims["ffn"]}
    elif family == "olmoe":
        config |= {"num_experts": dims["experts"], "intermediate_size": dims["ffn"],
                   "norm_topk_prob": norm_topk_prob}
    else:
        config |= {"num_experts": dims["experts"], "moe_intermediate_size": dims["ffn"],
                   "intermediate_size": dims["dense"], "norm_topk_prob": norm_topk_prob,
                   "decoder_sparse_step": 1, "mlp_only_layers": list(dims["mlp_only"])}
    if family == "qwen2_moe":
        config["shared_expert_intermediate_size"] = dims["shared"]
    config |= _style_keys(family, style, dtype, dims)
    if "num_local_experts" in config and family != "mixtral":
        del config["num_experts"]
    return config


def _style_keys(family: str, style: str, dtype: str, dims: dict) -> dict:
    """Keys whose spelling changed between transformers 4 and 5."""
    derived = dims["head_dim"] == dims["d"] // dims["heads"]
    if style == "legacy":
        keys = {"rope_theta": _ROPE_THETA, "torch_dtype": dtype}
        if family == "qwen3_moe" or not derived:
            keys["head_dim"] = dims["head_dim"]
        return keys
    keys = {"rope_parameters": {"rope_type": "default", "rope_theta": _ROPE_THETA},
            "dtype": dtype}
    if family == "qwen3_moe":       # transformers 5 writes Qwen3MoeConfig's count this way
        keys["num_local_experts"] = dims["experts"]
    if family == "mixtral":
        keys["head_dim"] = None if derived else dims["head_dim"]
    elif family == "qwen3_moe" or not derived:
        keys["head_dim"] = dims["head_dim"]
    return keys


def _tensors(family: str, dims: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every tensor of the model, float32, in the order transformers saves them."""
    d, vocab = dims["d"], dims["vocab"]
    tensors = {"model.embed_tokens.weight": _normal(rng, (vocab, d))}
    for i in range(dims["layers"]):
        prefix = f"model.layers.{i}"
        tensors[f"{prefix}.input_layernorm.weight"] = _norm(rng, d)
        tensors |= _attention(family, f"{prefix}.self_attn", dims, rng)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = _norm(rng, d)
        if i in dims["mlp_only"]:
            tensors |= _ffn(f"{prefix}.mlp", ("gate_proj", "up_proj", "down_proj"), d,
                            dims["dense"], rng)
        else:
            tensors |= _moe(family, prefix, dims, rng)
    tensors["model.norm.weight"] = _norm(rng, d)
    tensors["lm_head.weight"] = _normal(rng, (vocab, d))
    return tensors


def _attention(family: str, prefix: str, dims: dict,
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    d, head_dim = dims["d"], dims["head_dim"]
    q_width, kv_width = dims["heads"] * head_dim, dims["kv_heads"] * head_dim
    tensors = {}
    for name, width in (("q_proj", q_width), ("k_proj", kv_width), ("v_proj", kv_width)):
        tensors[f"{prefix}.{name}.weight"] = _normal(rng, (width, d))
        if family == "qwen2_moe":
            tensors[f"{prefix}.{name}.bias"] = _normal(rng, (width,))
    tensors[f"{prefix}.o_proj.weight"] = _normal(rng, (d, q_width))
    if family == "olmoe":
        tensors[f"{prefix}.q_norm.weight"] = _norm(rng, q_width)
        tensors[f"{prefix}.k_norm.weight"] = _norm(rng, kv_width)
    elif family == "qwen3_moe":
        tensors[f"{prefix}.q_norm.weight"] = _norm(rng, head_dim)
        tensors[f"{prefix}.k_norm.weight"] = _norm(rng, head_dim)
    return tensors


def _moe(family: str, prefix: str, dims: dict,
         rng: np.random.Generator) -> dict[str, np.ndarray]:
    d = dims["d"]
    if family == "mixtral":
        block, projections = f"{prefix}.block_sparse_moe", ("w1", "w3", "w2")
    else:
        block, projections = f"{prefix}.mlp", ("gate_proj", "up_proj", "down_proj")
    tensors = {f"{block}.gate.weight": _normal(rng, (dims["experts"], d), std=d ** -0.5)}
    for j in range(dims["experts"]):
        tensors |= _ffn(f"{block}.experts.{j}", projections, d, dims["ffn"], rng)
    if dims["shared"]:
        tensors |= _ffn(f"{block}.shared_expert", ("gate_proj", "up_proj", "down_proj"), d,
                        dims["shared"], rng)
        tensors[f"{block}.shared_expert_gate.weight"] = _normal(rng, (1, d), std=d ** -0.5)
    return tensors


def _ffn(prefix: str, projections: tuple[str, str, str], d: int, ffn: int,
         rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Gate and up ``(ffn, d)``, down ``(d, ffn)``, named as ``projections`` gives them."""
    gate, up, down = projections
    return {
        f"{prefix}.{gate}.weight": _normal(rng, (ffn, d)),
        f"{prefix}.{up}.weight": _normal(rng, (ffn, d)),
        f"{prefix}.{down}.weight": _normal(rng, (d, ffn)),
    }


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float = 0.02) -> np.ndarray:
    return (std * rng.standard_normal(shape)).astype(np.float32)


def _norm(rng: np.random.Generator, width: int) -> np.ndarray:
    return (1 + 0.1 * rng.standard_normal(width)).astype(np.float32)


def _write_shards(path: Path, tensors: dict[str, np.ndarray], shards: int, dtype: str) -> None:
    """Split the tensors, in order, into ``shards`` files of about equal count."""
    names = list(tensors)
    if shards == 1:
        _save(path / "model.safetensors", tensors, dtype)
        return
    weight_map = {}
    for k, group in enumerate(np.array_split(np.arange(len(names)), shards), start=1):
        file = f"model-{k:05d}-of-{shards:05d}.safetensors"
        _save(path / file, {names[i]: tensors[names[i]] for i in group}, dtype)
        weight_map |= {names[i]: file for i in group}
    total = sum(a.size for a in tensors.values()) * (4 if dtype == "float32" else 2)
    index = {"metadata": {"total_size": int(total)}, "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _save(file: Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    if dtype == "float32":
        save_file(tensors, str(file), metadata={"format": "pt"})
    else:
        _save_bf16(file, tensors)


def _save_bf16(file: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write a BF16 safetensors file by hand; the safetensors NumPy API has no bfloat16.

    Layout: 8-byte little-endian header length, the JSON header padded with spaces to a multiple
    of 8 bytes, then each tensor's little-endian 16-bit patterns, back to back.
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, array in tensors.items():
        blob = _to_bf16_bits(array).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(file, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def _to_bf16_bits(array: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even); return the 16-bit patterns."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)
