"""Lazy, shape-checked access to the MoE weights of a Hugging Face safetensors checkpoint.

A checkpoint is a folder with ``config.json`` and one or more ``*.safetensors`` shards, listed by
``model.safetensors.index.json`` when there is one. Shard headers are read and checked when the
checkpoint is opened; tensor data is read only when asked for, and always returned as float32.

The safetensors NumPy API cannot return BF16 tensors (NumPy has no bfloat16), and BF16 is how
published checkpoints are stored. BF16 tensors are therefore read from the raw bytes that the
shard header locates, and widened to float32 by placing each 16-bit pattern in the high half of a
32-bit word, which is exact.
"""

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from moefpga.hls_models.config import MoEConfig, load_config
from moefpga.hls_models.errors import MoefpgaError

__all__ = ["Checkpoint", "ExpertWeights", "MoELayerWeights"]

INDEX_NAME = "model.safetensors.index.json"

# Bytes per element of every safetensors dtype; only the float ones can be read as float32.
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
_READABLE = ("BF16", "F16", "F32")
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True, eq=False)
class ExpertWeights:
    """One SwiGLU feed-forward network, ``down @ (silu(gate @ x) * (up @ x))``.

    Attributes
    ----------
    gate, up : numpy.ndarray
        float32, shape ``(ffn, d)``.
    down : numpy.ndarray
        float32, shape ``(d, ffn)``.
    """

    gate: np.ndarray
    up:   np.ndarray
    down: np.ndarray


@dataclass(frozen=True, eq=False)
class MoELayerWeights:
    """Everything one MoE block needs, in family-independent form.

    Attributes
    ----------
    router : numpy.ndarray
        float32, shape ``(E, d)``; the router logits are ``router @ x``.
    experts : list of ExpertWeights
        The ``E`` routed experts, by index.
    shared : ExpertWeights or None
        The shared expert every token goes through (Qwen2-MoE), or None.
    shared_gate : numpy.ndarray or None
        float32, shape ``(d,)``; the shared expert's output is scaled by
        ``sigmoid(shared_gate @ x)``. None means no scaling.
    top_k : int
        Experts picked per token.
    norm_topk_prob : bool
        Whether the picked probabilities are divided by their sum.
    """

    router:         np.ndarray
    experts:        list[ExpertWeights]
    shared:         ExpertWeights | None
    shared_gate:    np.ndarray | None
    top_k:          int
    norm_topk_prob: bool


@dataclass(frozen=True)
class _Entry:
    """Where one tensor lies in a shard file (absolute byte offsets)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end:   int


def _read_header(path: Path) -> dict[str, _Entry]:
    """Read and check the header of one safetensors file.

    The format is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON mapping each
    tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
    end of the header), an optional ``__metadata__`` entry, then the data.

    Returns
    -------
    dict
        Tensor name to its dtype, shape and absolute byte range in the file.

    Raises
    ------
    MoefpgaError
        If the file cannot be read, or the header is malformed or points outside the file.
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            prefix = f.read(8)
            if len(prefix) < 8:
                raise MoefpgaError(f"{path}: unreadable safetensors header (file too short)")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(size - 8, _MAX_HEADER):
                raise MoefpgaError(f"{path}: unreadable safetensors header (length {length} "
                                   f"in a {size}-byte file)")
            header = json.loads(f.read(length).decode("utf-8"))
    except OSError as exc:
        raise MoefpgaError(f"{path}: cannot read ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MoefpgaError(f"{path}: unreadable safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise MoefpgaError(f"{path}: unreadable safetensors header (not a JSON object)")
    data_start = 8 + length
    return {name: _entry(path, name, info, data_start, size)
            for name, info in header.items() if name != "__metadata__"}


def _entry(path: Path, name: str, info: object, data_start: int, size: int) -> _Entry:
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        shape = tuple(int(n) for n in shape)
        begin, end = int(begin), int(end)
        itemsize = _ITEMSIZE.get(dtype)
    except (TypeError, KeyError, ValueError):
        raise MoefpgaError(f"{path}: malformed header entry for tensor '{name}'") from None
    expected = None if itemsize is None else itemsize * math.prod(shape)
    if (min(shape, default=0) < 0 or not 0 <= begin <= end <= size - data_start
            or expected not in (None, end - begin)):
        raise MoefpgaError(f"{path}: header entry for tensor '{name}' ({dtype}, shape "
                           f"{list(shape)}, bytes {begin}..{end}) does not fit the file")
    return _Entry(dtype, shape, data_start + begin, data_start + end)


class _Shard:
    """One open safetensors file: the library handle for F32/F16, a memory map for BF16."""

    def __init__(self, path: Path):
        self.path = path
        self.entries = _read_header(path)
        try:
            self.handle = safe_open(str(path), framework="np")
        except (SafetensorError, OSError) as exc:
            raise MoefpgaError(f"{path}: unreadable safetensors file ({exc})") from None
        self._raw: np.memmap | None = None

    def read(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        if entry.dtype not in _READABLE:
            raise MoefpgaError(f"{self.path}: tensor '{name}' has dtype {entry.dtype}; "
                               f"supported: {', '.join(_READABLE)}")
        if entry.dtype != "BF16":
            return np.asarray(self.handle.get_tensor(name), dtype=np.float32)
        if self._raw is None:
            self._raw = np.memmap(self.path, dtype=np.uint8, mode="r")
        halves = self._raw[entry.begin:entry.end].view("<u2")
        return (halves.astype(np.uint32) << 16).view(np.float32).reshape(entry.shape)


class Checkpoint:
    """A Hugging Face MoE checkpoint opened for reading.

    Use :meth:`open`; the constructor is internal. Tensors are read on demand and returned as
    new float32 arrays. All accessors that take a layer check it against the config, and every
    weight they return is checked against the shape the config implies.
    """

    def __init__(self, path: Path, config: MoEConfig, locations: dict[str, _Shard]):
        self.path = path
        self.config = config
        self._locations = locations

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        """Open a checkpoint folder, reading ``config.json`` and every shard header.

        Raises
        ------
        MoefpgaError
            If the folder, ``config.json`` or the shards are missing, a shard named by the
            index does not exist, a header is unreadable, or a tensor appears in two shards.
        """
        path = Path(path)
        if not path.is_dir():
            raise MoefpgaError(f"{path}: no such checkpoint folder")
        config = load_config(path)
        index = path / INDEX_NAME
        locations = _indexed_locations(index) if index.exists() else _scanned_locations(path)
        return cls(path, config, locations)

    def __contains__(self, name: str) -> bool:
        return name in self._locations

    def tensor(self, name: str) -> np.ndarray:
        """Return tensor ``name`` as float32.

        Raises
        ------
        MoefpgaError
            If no shard holds the tensor, or its dtype is not BF16, F16 or F32.
        """
        shard = self._locations.get(name)
        if shard is None:
            raise MoefpgaError(f"{self.path}: checkpoint has no tensor '{name}'")
        if name not in shard.entries:
            raise MoefpgaError(f"{self.path / INDEX_NAME}: maps tensor '{name}' to "
                               f"{shard.path.name}, which does not hold it")
        return shard.read(name)

    def router(self, layer: int) -> np.ndarray:
        """The router weight of MoE layer ``layer``, float32 ``(E, d)``."""
        c = self.config
        return self._shaped(f"{self._moe_prefix(layer)}.gate.weight",
                            (c.num_experts, c.hidden_size), "num_experts, hidden_size")

    def expert(self, layer: int, index: int) -> ExpertWeights:
        """Routed expert ``index`` of MoE layer ``layer``."""
        prefix = self._moe_prefix(layer)
        c = self.config
        if not _is_index(index, c.num_experts):
            raise MoefpgaError(f"expert {index!r} out of range: layers have {c.num_experts} "
                               f"experts (0..{c.num_experts - 1})")
        names = ("w1", "w3", "w2") if c.family == "mixtral" else (
            "gate_proj", "up_proj", "down_proj")
        return self._ffn([f"{prefix}.experts.{index}.{n}.weight" for n in names],
                         c.expert_ffn_size, "expert_ffn_size")

    def shared_expert(self, layer: int) -> tuple[ExpertWeights | None, np.ndarray | None]:
        """The shared expert of MoE layer ``layer`` and its gate ``(d,)``; ``(None, None)`` when
        the family has no shared expert."""
        prefix = self._moe_prefix(layer)
        c = self.config
        if c.shared_expert_ffn_size == 0:
            return None, None
        shared = self._ffn([f"{prefix}.shared_expert.{n}.weight"
                            for n in ("gate_proj", "up_proj", "down_proj")],
                           c.shared_expert_ffn_size, "shared_expert_ffn_size")
        gate = self._shaped(f"{prefix}.shared_expert_gate.weight", (1, c.hidden_size),
                            "1, hidden_size")
        return shared, gate[0]

    def moe_layer(self, layer: int) -> MoELayerWeights:
        """All weights of MoE layer ``layer``.

        Raises
        ------
        MoefpgaError
            If ``layer`` is not in ``0..num_layers-1`` or is a dense-MLP layer, or a tensor is
            missing or has a shape other than the config implies.
        """
        c = self.config
        router = self.router(layer)
        experts = [self.expert(layer, j) for j in range(c.num_experts)]
        shared, shared_gate = self.shared_expert(layer)
        return MoELayerWeights(router, experts, shared, shared_gate, c.top_k, c.norm_topk_prob)

    def norm_weight(self, layer: int) -> np.ndarray:
        """The RMSNorm weight ``(d,)`` applied before the MLP or MoE block of ``layer``."""
        self._check_layer(layer)
        return self._shaped(f"model.layers.{layer}.post_attention_layernorm.weight",
                            (self.config.hidden_size,), "hidden_size")

    def _check_layer(self, layer: int) -> None:
        n = self.config.num_layers
        if not _is_index(layer, n):
            raise MoefpgaError(f"layer {layer!r} out of range: {self.path} has {n} layers "
                               f"(0..{n - 1})")

    def _moe_prefix(self, layer: int) -> str:
        self._check_layer(layer)
        moe_layers = self.config.moe_layers
        if layer not in moe_layers:
            raise MoefpgaError(f"layer {layer} of {self.path} is a dense MLP layer; "
                               f"MoE layers are {list(moe_layers)}")
        block = "block_sparse_moe" if self.config.family == "mixtral" else "mlp"
        return f"model.layers.{layer}.{block}"

    def _ffn(self, names: list[str], ffn: int, ffn_name: str) -> ExpertWeights:
        d = self.config.hidden_size
        gate, up, down = names
        return ExpertWeights(
            gate=self._shaped(gate, (ffn, d), f"{ffn_name}, hidden_size"),
            up=self._shaped(up, (ffn, d), f"{ffn_name}, hidden_size"),
            down=self._shaped(down, (d, ffn), f"hidden_size, {ffn_name}"),
        )

    def _shaped(self, name: str, shape: tuple[int, ...], dims: str) -> np.ndarray:
        array = self.tensor(name)
        if array.shape != shape:
            raise MoefpgaError(f"{self.path}: tensor '{name}' has shape {list(array.shape)}, "
                               f"expected {list(shape)} ({dims} from config.json)")
        if not np.isfinite(array).all():
            where = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
            raise MoefpgaError(f"{self.path}: tensor '{name}' holds NaN or Inf (first at "
                               f"{list(where)})")
        return array


def _is_index(value: object, count: int) -> bool:
    return (isinstance(value, int | np.integer) and not isinstance(value, bool)
            and 0 <= value < count)


def _indexed_locations(index: Path) -> dict[str, _Shard]:
    """Tensor locations from ``model.safetensors.index.json``; every named shard must exist."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        items = list(weight_map.items())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError,
            AttributeError):
        raise MoefpgaError(f"{index}: unreadable index (expected a JSON object with "
                           f"'weight_map')") from None
    shards: dict[str, _Shard] = {}
    for _, file in items:
        if not isinstance(file, str):
            raise MoefpgaError(f"{index}: weight_map value {file!r} is not a file name")
        if file not in shards:
            shard_path = index.parent / file
            if not shard_path.is_file():
                raise MoefpgaError(f"{index}: names shard {file}, which is missing")
            shards[file] = _Shard(shard_path)
    return {name: shards[file] for name, file in items}


def _scanned_locations(folder: Path) -> dict[str, _Shard]:
    """Tensor locations from every ``*.safetensors`` file of a folder without an index."""
    paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        raise MoefpgaError(f"{folder}: no *.safetensors files")
    locations: dict[str, _Shard] = {}
    for path in paths:
        shard = _Shard(path)
        for name in shard.entries:
            if name in locations:
                raise MoefpgaError(f"{folder}: tensor '{name}' is in both "
                                   f"{locations[name].path.name} and {path.name}")
            locations[name] = shard
    return locations
