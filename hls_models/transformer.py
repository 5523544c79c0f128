"""The whole decoder of the four MoE families in NumPy, with each MoE layer behind a callable.

The host computes everything the accelerator does not: token embedding, RMSNorm, rotary position
embeddings, grouped-query attention with a KV cache, the families' q/k norms, dense MLP layers,
the final norm and the LM head. Each MoE layer is a :data:`MoEFunction` supplied by the caller
(the float reference, the integer model, later the simulated or real accelerator).

Conventions, as the Hugging Face ``transformers`` classes of these families define them:

- Decoder layer: ``h += attention(rms_norm(h, input_layernorm))``, then
  ``h += mlp(rms_norm(h, post_attention_layernorm))``; logits are
  ``lm_head @ rms_norm(h, model.norm)``, with ``lm_head`` the token embedding when
  ``tie_word_embeddings``.
- RMSNorm: ``weight * x / sqrt(mean(x**2) + eps)`` over the last axis, ``eps`` from
  ``rms_norm_eps``, for every norm of the model (q/k norms included).
- Rotary embedding ("default" type only): the rotate-half layout, dimension ``i`` paired with
  ``i + head_dim/2``, at angle ``position * theta**(-2i/head_dim)``; positions count from 0 at
  the first token of the sequence.
- Attention: ``softmax(q k^T / sqrt(head_dim))`` with a causal mask; query head ``h`` reads key
  and value head ``h // (heads / kv_heads)``; no bias on ``o_proj``.
- Family details: ``qwen2_moe`` has biases on ``q_proj``, ``k_proj``, ``v_proj``; ``olmoe``
  RMS-normalizes the whole q and k projections (widths ``heads * head_dim`` and
  ``kv_heads * head_dim``) before splitting them into heads; ``qwen3_moe`` RMS-normalizes each
  head of q and k (width ``head_dim``); all norms come before the rotary embedding. ``mixtral``
  has none of these.
- Greedy decoding takes the lowest token id among equal largest logits.

Variants of these families that this module does not implement are refused by
:func:`check_supported`, naming the variant.
"""

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from .checkpoint import Checkpoint, ExpertWeights
from .config import MoEConfig
from .errors import MoefpgaError
from .reference import expert_ffn

__all__ = [
    "MoEFunction", "AttentionWeights", "LayerWeights", "TransformerWeights", "KVCache",
    "Transformer", "check_supported", "check_ids", "load_weights", "rms_norm", "rope_tables",
    "apply_rope", "generate",
]

#: One MoE layer: float32 ``(T, d)`` normalized hidden states in, float32 ``(T, d)`` out.
MoEFunction = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True, eq=False)
class AttentionWeights:
    """One attention block, float32.

    Attributes
    ----------
    q, k, v : numpy.ndarray
        Projections ``(heads * head_dim, d)``, ``(kv_heads * head_dim, d)`` twice.
    o : numpy.ndarray
        Output projection ``(d, heads * head_dim)``.
    q_bias, k_bias, v_bias : numpy.ndarray or None
        Projection biases (Qwen2-MoE), else None.
    q_norm, k_norm : numpy.ndarray or None
        RMSNorm weights of q and k: over the whole projection (OLMoE) or per head (Qwen3-MoE).
    per_head_norm : bool
        Whether ``q_norm`` and ``k_norm`` apply to each head rather than the whole projection.
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    o: np.ndarray
    q_bias: np.ndarray | None = None
    k_bias: np.ndarray | None = None
    v_bias: np.ndarray | None = None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    per_head_norm: bool = False


@dataclass(frozen=True, eq=False)
class LayerWeights:
    """The host-side weights of one decoder layer.

    ``dense_mlp`` is the layer's dense SwiGLU MLP, or None for an MoE layer (run by its
    :data:`MoEFunction`).
    """

    input_norm: np.ndarray
    attention: AttentionWeights
    post_norm: np.ndarray
    dense_mlp: ExpertWeights | None


@dataclass(frozen=True, eq=False)
class TransformerWeights:
    """Everything but the MoE layers: embedding ``(V, d)``, layers, final norm, LM head."""

    embed: np.ndarray
    layers: list[LayerWeights]
    final_norm: np.ndarray
    lm_head: np.ndarray


def check_supported(config: MoEConfig) -> None:
    """Refuse a model using a variant this module does not implement, naming the variant.

    Raises
    ------
    MoefpgaError
        For a scaled rotary embedding (``rope_type`` other than ``default``), a partial rotary
        embedding, sliding-window attention, attention biases beyond Qwen2-MoE's q/k/v ones,
        OLMoE's ``clip_qkv``, or an activation other than SiLU.
    """
    raw = config.raw
    if config.rope_type != "default":
        raise MoefpgaError(f"rotary embedding type {config.rope_type!r} is not supported; only "
                           "'default' (unscaled) rotary embeddings are implemented")
    params = raw.get("rope_parameters") or {}
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise MoefpgaError(f"partial rotary embedding (partial_rotary_factor={partial}) is not "
                           "supported")
    if _sliding_window(raw):
        raise MoefpgaError(f"sliding-window attention (sliding_window="
                           f"{raw.get('sliding_window')}) is not supported")
    if raw.get("attention_bias"):
        raise MoefpgaError(f"attention biases (attention_bias=true) are not supported for "
                           f"{config.family}")
    if raw.get("clip_qkv") is not None:
        raise MoefpgaError(f"q/k/v clipping (clip_qkv={raw['clip_qkv']}) is not supported")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise MoefpgaError(f"activation {act!r} is not supported; the experts are SwiGLU "
                           "with 'silu'")


def _sliding_window(raw: dict) -> bool:
    """Whether any layer attends through a sliding window, in any transformers config style."""
    if "sliding_attention" in (raw.get("layer_types") or ()):
        return True
    if raw.get("model_type") == "mixtral":
        return raw.get("sliding_window") is not None
    return bool(raw.get("use_sliding_window")) and raw.get("sliding_window") is not None


def check_ids(ids: np.ndarray, config: MoEConfig, start: int = 0, extra: int = 0) -> None:
    """Refuse token ids that are not in the vocabulary, or a sequence longer than the context.

    Parameters
    ----------
    ids : numpy.ndarray
        1-D integer array, not empty.
    start : int
        Positions already in the KV cache.
    extra : int
        Positions still to come after ``ids`` (tokens to generate).
    """
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise MoefpgaError(f"token ids must be a non-empty 1-D integer array, not "
                           f"{ids.dtype} of shape {list(ids.shape)}")
    bad = np.flatnonzero((ids < 0) | (ids >= config.vocab_size))
    if bad.size:
        raise MoefpgaError(f"token id {ids[bad[0]]} at position {start + bad[0]} is outside the "
                           f"vocabulary (0..{config.vocab_size - 1})")
    total = start + ids.size + extra
    if total > config.max_position_embeddings:
        raise MoefpgaError(f"a sequence of {total} positions exceeds the model's context of "
                           f"{config.max_position_embeddings} (max_position_embeddings)")


def load_weights(checkpoint: Checkpoint) -> TransformerWeights:
    """Read and shape-check every non-MoE tensor of a checkpoint.

    Raises
    ------
    MoefpgaError
        For a missing, misshapen or non-finite tensor (the message names it).
    """
    config = checkpoint.config
    d, vocab = config.hidden_size, config.vocab_size
    embed = checkpoint._shaped("model.embed_tokens.weight", (vocab, d), "vocab_size, hidden_size")
    lm_head = embed if config.tie_word_embeddings else checkpoint._shaped(
        "lm_head.weight", (vocab, d), "vocab_size, hidden_size")
    return TransformerWeights(
        embed=embed,
        layers=[_layer_weights(checkpoint, i) for i in range(config.num_layers)],
        final_norm=checkpoint._shaped("model.norm.weight", (d,), "hidden_size"),
        lm_head=lm_head,
    )


def _layer_weights(checkpoint: Checkpoint, index: int) -> LayerWeights:
    config = checkpoint.config
    prefix = f"model.layers.{index}"
    dense = None
    if index not in config.moe_layers:
        dense = checkpoint._ffn([f"{prefix}.mlp.{n}.weight"
                                 for n in ("gate_proj", "up_proj", "down_proj")],
                                config.dense_ffn_size, "intermediate_size")
    return LayerWeights(
        input_norm=checkpoint._shaped(f"{prefix}.input_layernorm.weight",
                                      (config.hidden_size,), "hidden_size"),
        attention=_attention_weights(checkpoint, f"{prefix}.self_attn"),
        post_norm=checkpoint.norm_weight(index),
        dense_mlp=dense,
    )


def _attention_weights(checkpoint: Checkpoint, prefix: str) -> AttentionWeights:
    c = checkpoint.config
    d, hd = c.hidden_size, c.head_dim
    widths = {"q": (c.num_attention_heads * hd, "num_attention_heads * head_dim"),
              "k": (c.num_key_value_heads * hd, "num_key_value_heads * head_dim"),
              "v": (c.num_key_value_heads * hd, "num_key_value_heads * head_dim")}

    def tensor(name, shape, dims):
        return checkpoint._shaped(f"{prefix}.{name}", shape, dims)

    parts = {n: tensor(f"{n}_proj.weight", (w, d), f"{dims}, hidden_size")
             for n, (w, dims) in widths.items()}
    parts["o"] = tensor("o_proj.weight", (d, widths["q"][0]), "hidden_size, heads * head_dim")
    if c.family == "qwen2_moe":
        parts |= {f"{n}_bias": tensor(f"{n}_proj.bias", (w,), dims)
                  for n, (w, dims) in widths.items()}
    if c.family == "olmoe":
        parts |= {f"{n}_norm": tensor(f"{n}_norm.weight", (w,), dims)
                  for n, (w, dims) in widths.items() if n != "v"}
    if c.family == "qwen3_moe":
        parts |= {f"{n}_norm": tensor(f"{n}_norm.weight", (hd,), "head_dim") for n in "qk"}
        parts["per_head_norm"] = True
    return AttentionWeights(**parts)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``weight * x / sqrt(mean(x**2) + eps)`` over the last axis, float32."""
    x = np.asarray(x, dtype=np.float32)
    scale = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))
    return (weight * (x * scale)).astype(np.float32)


def rope_tables(positions: np.ndarray, head_dim: int, theta: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Cosines and sines ``(T, head_dim)`` of the default rotary embedding at ``positions``.

    Column ``i`` and ``i + head_dim/2`` share the frequency ``theta**(-2i/head_dim)``.
    """
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate ``x`` ``(..., T, head_dim)`` in the rotate-half layout."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of every layer for the positions seen so far.

    Per layer, keys and values are float32 ``(kv_heads, positions, head_dim)``, after the q/k
    norms and the rotary embedding.
    """

    def __init__(self, num_layers: int):
        self.keys: list[np.ndarray | None] = [None] * num_layers
        self.values: list[np.ndarray | None] = [None] * num_layers
        self.length = 0

    def extend(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append the new positions of ``layer``; return all its keys and values."""
        if self.keys[layer] is not None:
            k = np.concatenate([self.keys[layer], k], axis=1)
            v = np.concatenate([self.values[layer], v], axis=1)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Transformer:
    """A decoder-only MoE language model: host NumPy for everything but the MoE layers.

    Parameters
    ----------
    config : MoEConfig
    weights : TransformerWeights
    moe : mapping of int to MoEFunction
        The callable of every MoE layer (``config.moe_layers``), by decoder layer index.
    """

    def __init__(self, config: MoEConfig, weights: TransformerWeights,
                 moe: Mapping[int, MoEFunction]):
        check_supported(config)
        missing = [i for i in config.moe_layers if i not in moe]
        if missing:
            raise MoefpgaError(f"no MoE function for layers {missing}")
        self.config = config
        self.weights = weights
        self.moe = moe

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_layers)

    def forward(self, ids: np.ndarray, cache: KVCache | None = None) -> np.ndarray:
        """Logits float32 ``(T, vocab)`` of ``ids`` (1-D), after the positions in ``cache``.

        With a cache, its positions are the sequence's start and ``ids`` are appended to it;
        after an error the cache is incomplete and must not be used again.

        Raises
        ------
        MoefpgaError
            As :func:`check_ids`, or from an MoE function.
        """
        cache = cache or self.new_cache()
        ids = np.asarray(ids)
        check_ids(ids, self.config, cache.length)
        c, w = self.config, self.weights
        cos, sin = rope_tables(np.arange(cache.length, cache.length + ids.size), c.head_dim,
                               c.rope_theta)
        h = w.embed[ids]
        for i, layer in enumerate(w.layers):
            x = rms_norm(h, layer.input_norm, c.rms_norm_eps)
            h = h + self._attention(x, layer.attention, cache, i, cos, sin)
            x = rms_norm(h, layer.post_norm, c.rms_norm_eps)
            h = h + (self.moe[i](x) if layer.dense_mlp is None else
                     expert_ffn(x, layer.dense_mlp))
        cache.length += ids.size
        return (rms_norm(h, w.final_norm, c.rms_norm_eps) @ w.lm_head.T).astype(np.float32)

    def _attention(self, x: np.ndarray, w: AttentionWeights, cache: KVCache, layer: int,
                   cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        c = self.config
        eps, hd, t = c.rms_norm_eps, c.head_dim, x.shape[0]
        q, k, v = (_project(x, weight, bias) for weight, bias in
                   ((w.q, w.q_bias), (w.k, w.k_bias), (w.v, w.v_bias)))
        if w.q_norm is not None and not w.per_head_norm:
            q, k = rms_norm(q, w.q_norm, eps), rms_norm(k, w.k_norm, eps)
        q, k, v = (a.reshape(t, -1, hd).transpose(1, 0, 2) for a in (q, k, v))
        if w.per_head_norm:
            q, k = rms_norm(q, w.q_norm, eps), rms_norm(k, w.k_norm, eps)
        keys, values = cache.extend(layer, apply_rope(k, cos, sin), v)
        out = _causal_attention(apply_rope(q, cos, sin), keys, values, cache.length)
        return out.transpose(1, 0, 2).reshape(t, -1) @ w.o.T


def _project(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    y = x @ weight.T
    return y if bias is None else y + bias


def _causal_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int
                      ) -> np.ndarray:
    """Grouped-query attention of queries ``(H, T, hd)`` at positions ``start..start+T-1`` over
    keys and values ``(KV, S, hd)`` at positions ``0..S-1``; returns ``(H, T, hd)``."""
    heads, t, hd = q.shape
    kv_heads, s, _ = keys.shape
    grouped = q.reshape(kv_heads, heads // kv_heads, t, hd)
    scores = grouped @ keys[:, None].swapaxes(-1, -2) * np.float32(hd ** -0.5)
    future = np.arange(s)[None, :] > start + np.arange(t)[:, None]
    scores = np.where(future, -np.inf, scores)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    return (probs @ values[:, None]).reshape(heads, t, hd).astype(np.float32)


def generate(model: Transformer, prompt: np.ndarray, max_new_tokens: int,
             stop_ids: frozenset[int] = frozenset()) -> Iterator[int]:
    """Greedy decoding with a KV cache: yield each new token id as it is chosen.

    The prompt runs in one forward pass, then each new token in one pass of its own. Stops
    after ``max_new_tokens`` or after yielding a token in ``stop_ids``.

    Raises
    ------
    MoefpgaError
        Before the first token, if the prompt is not valid token ids or prompt plus new tokens
        exceed the context (:func:`check_ids`).
    """
    prompt = np.asarray(prompt)
    check_ids(prompt, model.config, extra=max_new_tokens)
    cache = model.new_cache()
    logits = model.forward(prompt, cache)
    for n in range(max_new_tokens):
        token = int(np.argmax(logits[-1]))
        yield token
        if token in stop_ids or n + 1 == max_new_tokens:
            return
        logits = model.forward(np.array([token]), cache)
