"""Reading (and writing) GLM-4 safetensors checkpoints in either name layout.

``LAYOUTS`` below is the one table that maps checkpoint tensor names to the canonical names of
:class:`glm_export.model.GLM4`. The ``hf`` layout splits q/k/v into three tensors, which the canonical fused
``qkv`` concatenates (rows in q, k, v order, the order of the original fused weight).

Tensors are read lazily through ``safetensors.safe_open`` (memory-mapped): nothing is read until a tensor
is asked for, and export streams tensors one at a time, so a 19 GB checkpoint never sits in memory twice.
Before anything is read, :meth:`Checkpoint.validate` checks every shard header and the whole name/shape
inventory and raises one :class:`CheckpointError` that lists every problem.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from glm_export import rotary
from glm_export.model import GLM4, is_matmul_weight
from glm_export.weight_check import check_tensor
from glm_runtime.config import ModelConfig
from glm_runtime.manifest import confined

# canonical name template -> per layout, the checkpoint names whose rows are concatenated to form it.
LAYOUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "chatglm": {
        "embed.weight": ("transformer.embedding.word_embeddings.weight",),
        "layers.{i}.input_norm.weight": ("transformer.encoder.layers.{i}.input_layernorm.weight",),
        "layers.{i}.qkv.weight": ("transformer.encoder.layers.{i}.self_attention.query_key_value.weight",),
        "layers.{i}.qkv.bias": ("transformer.encoder.layers.{i}.self_attention.query_key_value.bias",),
        "layers.{i}.o_proj.weight": ("transformer.encoder.layers.{i}.self_attention.dense.weight",),
        "layers.{i}.post_attn_norm.weight": ("transformer.encoder.layers.{i}.post_attention_layernorm.weight",),
        "layers.{i}.gate_up.weight": ("transformer.encoder.layers.{i}.mlp.dense_h_to_4h.weight",),
        "layers.{i}.down.weight": ("transformer.encoder.layers.{i}.mlp.dense_4h_to_h.weight",),
        "final_norm.weight": ("transformer.encoder.final_layernorm.weight",),
        "lm_head.weight": ("transformer.output_layer.weight",),
    },
    "hf": {
        "embed.weight": ("model.embed_tokens.weight",),
        "layers.{i}.input_norm.weight": ("model.layers.{i}.input_layernorm.weight",),
        "layers.{i}.qkv.weight": tuple(f"model.layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkv"),
        "layers.{i}.qkv.bias": tuple(f"model.layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv"),
        "layers.{i}.o_proj.weight": ("model.layers.{i}.self_attn.o_proj.weight",),
        "layers.{i}.post_attn_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight",),
        "layers.{i}.gate_up.weight": ("model.layers.{i}.mlp.gate_up_proj.weight",),
        "layers.{i}.down.weight": ("model.layers.{i}.mlp.down_proj.weight",),
        "final_norm.weight": ("model.norm.weight",),
        "lm_head.weight": ("lm_head.weight",),
    },
}
# Present in real checkpoints, accepted and never used: the original stores inv_freq computed without rope_ratio.
IGNORED = {"chatglm": ("transformer.rotary_pos_emb.inv_freq",), "hf": ()}

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message lists every problem found."""


def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor and its shape, derived from the config alone."""
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (cfg.vocab_size, cfg.hidden_size)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes[p + "input_norm.weight"] = (cfg.hidden_size,)
        shapes[p + "qkv.weight"] = (cfg.qkv_size, cfg.hidden_size)
        if cfg.qkv_bias:
            shapes[p + "qkv.bias"] = (cfg.qkv_size,)
        shapes[p + "o_proj.weight"] = (cfg.hidden_size, cfg.q_size)
        shapes[p + "post_attn_norm.weight"] = (cfg.hidden_size,)
        shapes[p + "gate_up.weight"] = (2 * cfg.ffn_hidden_size, cfg.hidden_size)
        shapes[p + "down.weight"] = (cfg.hidden_size, cfg.ffn_hidden_size)
    shapes["final_norm.weight"] = (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


def _template(canonical: str) -> tuple[str, str | None]:
    """``layers.3.qkv.weight`` -> (``layers.{i}.qkv.weight``, ``"3"``)."""
    parts = canonical.split(".")
    if parts[0] == "layers":
        return "layers.{i}." + ".".join(parts[2:]), parts[1]
    return canonical, None


def source_parts(cfg: ModelConfig, layout: str, canonical: str,
                 shapes: dict[str, tuple[int, ...]] | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """The checkpoint tensors (name, shape) whose rows make up ``canonical`` in ``layout``.

    ``shapes``: ``canonical_shapes(cfg)`` when the caller has it (a loop over every tensor that rebuilt it per call
    was quadratic in the layer count: 4000 layers took > 100 s, issue 19 D10)."""
    template, layer = _template(canonical)
    names = [n.replace("{i}", layer or "") for n in LAYOUTS[layout][template]]
    shape = (shapes or canonical_shapes(cfg))[canonical]
    if len(names) == 1:
        return [(names[0], shape)]
    rows = [cfg.q_size, cfg.kv_size, cfg.kv_size]  # only qkv is split
    return [(n, (r, *shape[1:])) for n, r in zip(names, rows, strict=True)]


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]


#: Bytes per element of the safetensors dtypes (to check that each tensor's byte range matches its shape).
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a shard's header and check it describes the file: every entry well-formed, each tensor's byte range
    the size its dtype and shape need, ranges not overlapping, the file as long as the header says (catches
    truncated shards). Any other header is a :class:`CheckpointError` naming the first problem."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100_000_000):
            # The length is not echoed: it is the first 8 bytes of whatever file this is (issue 19, D5).
            raise CheckpointError(f"{path}: the header length exceeds the file ({size} bytes): truncated or not "
                                  "safetensors")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:  # also invalid UTF-8 and Python's integer-digit limit
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    out: dict[str, TensorInfo] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, t in header.items():
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        shape = t.get("shape") if isinstance(t, dict) else None
        dtype = t.get("dtype") if isinstance(t, dict) else None
        if not (isinstance(dtype, str) and isinstance(shape, list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{path}: malformed header entry for {str(name)[:100]!r} (needs dtype, shape of "
                                  f"non-negative ints, data_offsets [begin, end]): re-download this shard")
        numel = 1
        for d in shape:
            numel *= d
        if dtype in DTYPE_SIZES and numel * DTYPE_SIZES[dtype] != offsets[1] - offsets[0]:
            raise CheckpointError(f"{path}: {name}: data_offsets span {offsets[1] - offsets[0]} bytes, its dtype "
                                  f"{dtype} and shape {shape} need {numel * DTYPE_SIZES[dtype]}: corrupt shard")
        ranges.append((offsets[0], offsets[1], name))
        out[name] = TensorInfo(path, dtype, tuple(shape))
    ranges.sort()
    for (_, end, a), (begin, _, b) in itertools.pairwise(ranges):
        if begin < end:
            raise CheckpointError(f"{path}: tensors {a} and {b} overlap in the file: corrupt shard")
    end = ranges[-1][1] if ranges else 0
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated: the header needs {8 + n + end} bytes, the file has {size} "
            f"(re-download or re-copy this shard)"
        )
    return out


class Checkpoint:
    """A GLM-4 checkpoint directory: config plus lazily read, validated tensors under canonical names."""

    def __init__(self, model_dir: str | Path, max_weight_abs: float | None = None) -> None:
        """``max_weight_abs``: also refuse tensors with a value of larger magnitude (non-finite ones always are)."""
        self.dir = Path(model_dir)
        self.max_weight_abs = max_weight_abs
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir} is not a directory: point at a Hugging Face GLM-4 checkpoint")
        self.config = ModelConfig.from_pretrained(self.dir)
        self.shapes = canonical_shapes(self.config)
        self.tensors = self._inventory()
        self.layout = self._detect_layout()
        self._handles: dict[Path, object] = {}

    def _inventory(self) -> dict[str, TensorInfo]:
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        problems: list[str] = []
        tensors: dict[str, TensorInfo] = {}
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({e})") from e
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
            outside = sorted({v for v in weight_map.values() if not confined(v)})
            if outside:  # the index must not make us read (and echo) files elsewhere (issue 19, D5)
                raise CheckpointError(f"{index}: shard names {outside[:3]} leave the checkpoint directory; a "
                                      "checkpoint's shards are files in it (symlinks there are followed)")
            headers: dict[str, dict[str, TensorInfo]] = {}
            for shard in sorted(set(weight_map.values())):
                path = self.dir / shard
                if not path.is_file():
                    problems.append(f"shard {shard} named in the index is missing")
                    continue
                try:
                    headers[shard] = read_safetensors_header(path)
                except CheckpointError as e:
                    problems.append(str(e))
            for name, shard in weight_map.items():
                if shard in headers:
                    if name not in headers[shard]:
                        problems.append(f"{name}: the index says {shard}, which does not contain it")
                    else:
                        tensors[name] = headers[shard][name]
            for shard, header in headers.items():
                for name in header.keys() - weight_map.keys():
                    problems.append(f"{name}: in {shard} but missing from the index")
        elif single.is_file():
            tensors = read_safetensors_header(single)
        else:
            raise CheckpointError(
                f"no model.safetensors.index.json or model.safetensors in {self.dir}; glm-export reads "
                f"safetensors checkpoints (convert .bin checkpoints with transformers' save_pretrained first)"
            )
        if problems:
            raise CheckpointError(f"checkpoint {self.dir} is broken:\n  " + "\n  ".join(problems))
        return tensors

    def _detect_layout(self) -> str:
        prefixes = (("chatglm", "transformer."), ("hf", "model."))
        hits = {lay: sum(n.startswith(p) for n in self.tensors) for lay, p in prefixes}
        return max(hits, key=hits.__getitem__) if any(hits.values()) else self.config.layout

    def validate(self) -> None:
        """Check names, shapes and dtypes against the config; raise one error listing every problem."""
        problems: list[str] = []
        expected: set[str] = set(IGNORED[self.layout])
        for canonical in self.shapes:
            for name, shape in source_parts(self.config, self.layout, canonical, self.shapes):
                expected.add(name)
                info = self.tensors.get(name)
                if info is None:
                    problems.append(f"missing tensor {name} (shape {list(shape)})")
                elif info.shape != shape:
                    problems.append(f"{name}: shape {list(info.shape)}, config.json implies {list(shape)}")
                elif info.dtype not in SAFETENSORS_DTYPES:
                    problems.append(f"{name}: dtype {info.dtype} is not one of {sorted(SAFETENSORS_DTYPES)}")
        unexpected = sorted(set(self.tensors) - expected)
        problems += [f"unexpected tensor {n} (not part of a {self.layout}-layout GLM-4 model)" for n in unexpected]
        if problems:
            raise CheckpointError(
                f"checkpoint {self.dir} ({self.layout} layout) does not match its config.json "
                f"({len(problems)} problems):\n  " + "\n  ".join(problems)
            )

    def _read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(os.fspath(info.file), framework="pt")
        t = handle.get_tensor(name)  # type: ignore[attr-defined]
        check_tensor(name, t, self.max_weight_abs, f" (in {info.file.name})")
        return t

    def tensor(self, canonical: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One canonical tensor, memory-mapped when no conversion or concatenation is needed."""
        parts = [self._read(name) for name, _ in source_parts(self.config, self.layout, canonical, self.shapes)]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def release(self) -> None:
        """Drop the open shard handles (and their mappings); the next read reopens them."""
        self._handles.clear()

    def canonical_names(self) -> list[str]:
        return list(self.shapes)

    def iter_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.canonical_names():
            yield name, self.tensor(name, dtype)


def load_model(source: str | Path | Checkpoint, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A :class:`~glm_export.model.GLM4` with the checkpoint's weights, for eager use (reference, calibration).

    Built on the meta device and filled with ``assign=True``: tensors already in ``dtype`` stay
    memory-mapped instead of being copied into freshly allocated parameters.
    """
    ckpt = source if isinstance(source, Checkpoint) else Checkpoint(source)
    ckpt.validate()
    with torch.device("meta"):
        model = GLM4(ckpt.config, dtype=dtype)
    state = {name: t.t() if is_matmul_weight(name) else t for name, t in ckpt.iter_tensors(dtype)}
    if ckpt.config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed.weight"].t()
    model.load_state_dict(state, assign=True, strict=True)
    model.inv_freq = rotary.inv_freq(ckpt.config)
    return model.eval().requires_grad_(False)
