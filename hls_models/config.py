"""The model description read from a Hugging Face checkpoint's ``config.json``.

Four MoE families are supported, with the meaning the Hugging Face ``transformers`` classes give
their keys. Both the older config style (``rope_theta`` and ``torch_dtype`` at the top level) and
the current one (``rope_parameters``, ``dtype``) load. Keys the transformers class would default
take the same default here; keys that fix the shape of the MoE block are required.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moefpga.hls_models.errors import MoefpgaError

__all__ = ["FAMILIES", "MoEConfig", "load_config", "parse_config"]

FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")

# Defaults of the transformers config classes for the keys that are optional here.
_FAMILY_DEFAULTS = {
    "mixtral":   {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072},
    "olmoe":     {"rope_theta": 1e4, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096},
    "qwen2_moe": {"rope_theta": 1e4, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
    "qwen3_moe": {"rope_theta": 1e4, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
}

_MISSING = object()


@dataclass(frozen=True)
class MoEConfig:
    """The shape and numerics of one MoE model, independent of the family's key names.

    Attributes
    ----------
    family : str
        One of :data:`FAMILIES`, from ``model_type``.
    hidden_size : int
        Model width ``d``.
    num_layers : int
        Number of decoder layers.
    num_experts : int
        Routed experts per MoE layer ``E``.
    top_k : int
        Experts picked per token.
    expert_ffn_size : int
        Intermediate size of one routed expert.
    shared_expert_ffn_size : int
        Intermediate size of the shared expert; 0 when the family has none.
    norm_topk_prob : bool
        Whether the top-k routing weights are divided by their sum.
    moe_layers : tuple of int
        Indices of the decoder layers whose MLP is an MoE block, ascending.
    dense_ffn_size : int
        Intermediate size of the dense MLP of the other layers; 0 when every layer is MoE.
    vocab_size, num_attention_heads, num_key_value_heads, head_dim : int
        Embedding and attention shape; ``head_dim`` is derived as
        ``hidden_size // num_attention_heads`` when the file does not give it.
    rope_theta : float
        Rotary embedding base.
    rope_type : str
        ``"default"`` unless the file asks for a scaled rotary embedding (``rope_type``).
    rms_norm_eps : float
        Epsilon of every RMSNorm.
    max_position_embeddings : int
        Longest sequence the model was trained for.
    tie_word_embeddings : bool
        Whether the output projection reuses the token embedding.
    dtype : str or None
        Storage type named by ``dtype`` or ``torch_dtype``, if any.
    raw : dict
        The parsed ``config.json``, for keys not modelled here.
    """

    family:                  str
    hidden_size:             int
    num_layers:              int
    num_experts:             int
    top_k:                   int
    expert_ffn_size:         int
    shared_expert_ffn_size:  int
    norm_topk_prob:          bool
    moe_layers:              tuple[int, ...]
    dense_ffn_size:          int
    vocab_size:              int
    num_attention_heads:     int
    num_key_value_heads:     int
    head_dim:                int
    rope_theta:              float
    rope_type:               str
    rms_norm_eps:            float
    max_position_embeddings: int
    tie_word_embeddings:     bool
    dtype:                   str | None
    raw:                     dict = field(repr=False, compare=False)


def load_config(checkpoint_dir: str | Path) -> MoEConfig:
    """Read ``config.json`` from a checkpoint folder.

    Parameters
    ----------
    checkpoint_dir : str or Path
        The folder holding ``config.json``.

    Returns
    -------
    MoEConfig

    Raises
    ------
    MoefpgaError
        If the file is missing or not a JSON object, the family is not supported, a required key
        is missing, or a value has the wrong type or range. The message names the file and key.
    """
    path = Path(checkpoint_dir) / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MoefpgaError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MoefpgaError(f"{path}: cannot read ({exc})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MoefpgaError(f"{path}: not valid JSON ({exc})") from None
    return parse_config(raw, where=str(path))


def parse_config(raw: Any, *, where: str = "config.json") -> MoEConfig:
    """Build a :class:`MoEConfig` from the parsed contents of a ``config.json``.

    Parameters
    ----------
    raw : dict
        The JSON object.
    where : str
        How to name the source in error messages.

    Raises
    ------
    MoefpgaError
        As :func:`load_config`.
    """
    if not isinstance(raw, dict):
        raise MoefpgaError(f"{where}: expected a JSON object, found {type(raw).__name__}")
    family = raw.get("model_type")
    if family not in FAMILIES:
        raise MoefpgaError(f"{where}: model_type {family!r} is not supported; "
                           f"supported: {', '.join(FAMILIES)}")
    keys = _Keys(raw, where)
    hidden_size = keys.integer("hidden_size")
    num_layers = keys.integer("num_hidden_layers")
    num_heads = keys.integer("num_attention_heads")
    num_experts = _num_experts(keys, family)
    top_k = keys.integer("num_experts_per_tok")
    if top_k > num_experts:
        raise MoefpgaError(f"{where}: num_experts_per_tok={top_k} exceeds the "
                           f"{num_experts} experts")
    moe_layers = _moe_layers(keys, family, num_layers)
    defaults = _FAMILY_DEFAULTS[family]
    rope_theta, rope_type = _rope(keys, defaults["rope_theta"])
    return MoEConfig(
        family=family,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        expert_ffn_size=keys.integer("intermediate_size" if family in ("mixtral", "olmoe")
                                 else "moe_intermediate_size"),
        shared_expert_ffn_size=(keys.integer("shared_expert_intermediate_size")
                                if family == "qwen2_moe" else 0),
        norm_topk_prob=family == "mixtral" or keys.flag("norm_topk_prob", False),
        moe_layers=moe_layers,
        dense_ffn_size=(keys.integer("intermediate_size")
                        if len(moe_layers) < num_layers else 0),
        vocab_size=keys.integer("vocab_size"),
        num_attention_heads=num_heads,
        num_key_value_heads=_num_kv_heads(keys, num_heads),
        head_dim=_head_dim(keys, hidden_size, num_heads),
        rope_theta=rope_theta,
        rope_type=rope_type,
        rms_norm_eps=keys.number("rms_norm_eps", defaults["rms_norm_eps"]),
        max_position_embeddings=keys.integer("max_position_embeddings",
                                         defaults["max_position_embeddings"]),
        tie_word_embeddings=keys.flag("tie_word_embeddings", False),
        dtype=_dtype(keys),
        raw=raw,
    )


class _Keys:
    """Typed access to the keys of one config object; ``null`` counts as absent."""

    def __init__(self, raw: dict, where: str):
        self.raw = raw
        self.where = where

    def get(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw.get(key)
        if value is not None:
            return value
        if default is _MISSING:
            raise MoefpgaError(f"{self.where}: missing required key '{key}'")
        return default

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int = 1) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise MoefpgaError(f"{self.where}: '{key}' must be an integer >= {minimum}, "
                               f"not {value!r}")
        return value

    def number(self, key: str, default: float, *, source: dict | None = None) -> float:
        value = (source or self.raw).get(key)
        value = default if value is None else value
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not math.isfinite(value) or value <= 0):
            raise MoefpgaError(f"{self.where}: '{key}' must be a positive number, not {value!r}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise MoefpgaError(f"{self.where}: '{key}' must be true or false, not {value!r}")
        return value

    def mapping(self, key: str) -> dict:
        value = self.get(key, {})
        if not isinstance(value, dict):
            raise MoefpgaError(f"{self.where}: '{key}' must be an object, not {value!r}")
        return value


def _num_experts(keys: _Keys, family: str) -> int:
    """The routed expert count, under either of its names.

    Mixtral names it ``num_local_experts``, the other families ``num_experts``; current
    transformers releases write ``num_local_experts`` for Qwen3-MoE as well, so every family
    accepts both (they must agree when both are given).
    """
    names = [name for name in ("num_local_experts", "num_experts")
             if keys.get(name, None) is not None]
    if not names:
        primary, alias = (("num_local_experts", "num_experts") if family == "mixtral"
                          else ("num_experts", "num_local_experts"))
        raise MoefpgaError(f"{keys.where}: missing required key '{primary}' (or '{alias}')")
    counts = {keys.integer(name) for name in names}
    if len(counts) > 1:
        raise MoefpgaError(f"{keys.where}: 'num_local_experts' and 'num_experts' disagree "
                           f"({keys.raw['num_local_experts']} vs {keys.raw['num_experts']})")
    return counts.pop()


def _moe_layers(keys: _Keys, family: str, num_layers: int) -> tuple[int, ...]:
    """Qwen families interleave dense layers by ``decoder_sparse_step`` and ``mlp_only_layers``."""
    if family in ("mixtral", "olmoe"):
        return tuple(range(num_layers))
    step = keys.integer("decoder_sparse_step", 1)
    mlp_only = keys.get("mlp_only_layers", [])
    if not isinstance(mlp_only, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in mlp_only):
        raise MoefpgaError(f"{keys.where}: 'mlp_only_layers' must be a list of layer indices, "
                           f"not {mlp_only!r}")
    layers = tuple(i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0)
    if not layers:
        raise MoefpgaError(f"{keys.where}: no decoder layer is an MoE layer "
                           f"(decoder_sparse_step={step}, mlp_only_layers={mlp_only})")
    return layers


def _num_kv_heads(keys: _Keys, num_heads: int) -> int:
    num_kv_heads = keys.integer("num_key_value_heads", num_heads)
    if num_heads % num_kv_heads:
        raise MoefpgaError(f"{keys.where}: num_attention_heads={num_heads} is not a multiple "
                           f"of num_key_value_heads={num_kv_heads}")
    return num_kv_heads


def _head_dim(keys: _Keys, hidden_size: int, num_heads: int) -> int:
    if keys.get("head_dim", None) is not None:
        return keys.integer("head_dim")
    if hidden_size % num_heads:
        raise MoefpgaError(f"{keys.where}: no 'head_dim', and hidden_size={hidden_size} is not "
                           f"a multiple of num_attention_heads={num_heads}")
    return hidden_size // num_heads


def _rope(keys: _Keys, default_theta: float) -> tuple[float, str]:
    """Current configs nest the rotary settings in ``rope_parameters``; older ones use
    ``rope_theta`` at the top level and ``rope_scaling`` for a scaled variant."""
    params = keys.mapping("rope_parameters")
    scaling = keys.mapping("rope_scaling")
    if "rope_theta" in params:
        theta = keys.number("rope_theta", default_theta, source=params)
    else:
        theta = keys.number("rope_theta", default_theta)
    rope_type = (params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
                 or "default")
    if not isinstance(rope_type, str):
        raise MoefpgaError(f"{keys.where}: 'rope_type' must be a string, not {rope_type!r}")
    return theta, rope_type


def _dtype(keys: _Keys) -> str | None:
    value = keys.get("dtype", None) or keys.get("torch_dtype", None)
    if value is not None and not isinstance(value, str):
        raise MoefpgaError(f"{keys.where}: 'dtype' must be a string, not {value!r}")
    return value
