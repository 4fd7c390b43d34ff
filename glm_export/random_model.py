"""Checkpoints in the real GLM-4 format with random weights: for tests, benchmarks and scale checks.

No model hub is reachable from where this project is built and tested, so the loading, export and runtime
code is exercised on checkpoints written here: real ``config.json`` flavours, sharded bf16 safetensors with
an index, generation and tokenizer configs, in either name layout. Every tensor is drawn from its own
generator seeded by (seed, canonical name), so the same seed gives the same weights in both layouts and
in any shard order.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from glm_export import atomic
from glm_export.checkpoint import canonical_shapes, source_parts
from glm_export.progress import bytes_progress
from glm_runtime.config import ModelConfig

# GLM-4-9B's shapes (glm-4-9b-chat: rope_ratio 500, 128K context).
GLM4_9B = ModelConfig(
    vocab_size=151552, hidden_size=4096, num_layers=40, num_heads=32, num_kv_heads=2, head_dim=128,
    ffn_hidden_size=13696, rms_norm_eps=1.5625e-07, rope_base=5e6, rotary_dim=64, max_position=131072,
)
PRESETS: dict[str, ModelConfig] = {
    # Real vocab (the real tokenizer's ids must fit), 2 KV groups, partial interleaved rotary; tiny otherwise.
    "tiny": dataclasses.replace(GLM4_9B, hidden_size=64, num_layers=2, num_heads=4, head_dim=16, rotary_dim=8,
                                ffn_hidden_size=160, max_position=8192),
    "glm-4-9b-2layer": dataclasses.replace(GLM4_9B, num_layers=2),
    "glm-4-9b": GLM4_9B,
}
LAYOUT_CHOICES = ("chatglm", "hf")
DEFAULT_SHARD_BYTES = 2 * 1024**3


def hf_config(cfg: ModelConfig, layout: str) -> dict[str, Any]:
    """``config.json`` contents in the flavour a real checkpoint of ``layout`` carries."""
    eos = list(cfg.eos_token_ids)
    if layout == "chatglm":
        return {
            "model_type": "chatglm", "architectures": ["ChatGLMModel"],
            "add_bias_linear": False, "add_qkv_bias": cfg.qkv_bias, "apply_query_key_layer_scaling": True,
            "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
            "attention_softmax_in_fp32": True, "ffn_hidden_size": cfg.ffn_hidden_size,
            "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": cfg.hidden_size,
            "kv_channels": cfg.head_dim, "layernorm_epsilon": cfg.rms_norm_eps, "multi_query_attention": True,
            "multi_query_group_num": cfg.num_kv_heads, "num_attention_heads": cfg.num_heads,
            "num_hidden_layers": cfg.num_layers, "num_layers": cfg.num_layers,
            "rope_ratio": cfg.rope_base / 10000.0, "original_rope": True, "padded_vocab_size": cfg.vocab_size,
            "post_layer_norm": True, "rmsnorm": True, "seq_length": cfg.max_position, "use_cache": True,
            "torch_dtype": "bfloat16", "tie_word_embeddings": cfg.tie_word_embeddings,
            "eos_token_id": eos, "pad_token_id": cfg.pad_token_id,
        }
    if layout == "hf":
        return {
            "model_type": "glm", "architectures": ["GlmForCausalLM"], "attention_bias": cfg.qkv_bias,
            "attention_dropout": 0.0, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "hidden_size": cfg.hidden_size, "initializer_range": 0.02, "intermediate_size": cfg.ffn_hidden_size,
            "max_position_embeddings": cfg.max_position, "num_attention_heads": cfg.num_heads,
            "num_hidden_layers": cfg.num_layers, "num_key_value_heads": cfg.num_kv_heads,
            "partial_rotary_factor": cfg.rotary_dim / cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": cfg.rope_base, "tie_word_embeddings": cfg.tie_word_embeddings,
            "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": cfg.vocab_size,
            "eos_token_id": eos, "pad_token_id": cfg.pad_token_id,
        }
    raise ValueError(f"layout {layout!r} is not one of {LAYOUT_CHOICES}")


def random_tensor(name: str, shape: tuple[int, ...], seed: int, std: float = 0.02) -> torch.Tensor:
    """The canonical tensor ``name``: N(0, std) weights and biases, 1 + N(0, std) norm scales, in bf16."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    t = torch.randn(shape, generator=gen) * std
    if "norm" in name:
        t += 1.0
    return t.to(torch.bfloat16)


def write_random_model(
    out: Path,
    preset: str | ModelConfig = "tiny",
    layout: str = "chatglm",
    seed: int = 0,
    tokenizer_from: Path | None = None,
    builtin_tokenizer: bool = True,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    std: float = 0.02,
) -> Path:
    """Write a checkpoint directory at ``out`` (atomically) and return it."""
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    if layout not in LAYOUT_CHOICES:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUT_CHOICES}")
    # Plan shards up front so every file gets its final "-of-N" name.
    shapes = canonical_shapes(cfg)
    parts = [(canonical, name, shape) for canonical in shapes
             for name, shape in source_parts(cfg, layout, canonical, shapes)]
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for part in parts:
        nbytes = 2 * _numel(part[2])
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(part)
        size += nbytes
    total = sum(2 * _numel(p[2]) for p in parts)
    with atomic.atomic_dir(out, overwrite=overwrite) as tmp:
        weight_map: dict[str, str] = {}
        with bytes_progress() as progress:
            task = progress.add_task(f"writing {preset if isinstance(preset, str) else 'model'} weights", total=total)
            for k, shard in enumerate(shards, 1):
                fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                tensors: dict[str, torch.Tensor] = {}
                for canonical in dict.fromkeys(c for c, _, _ in shard):
                    full = random_tensor(canonical, canonical_shapes(cfg)[canonical], seed, std)
                    for c, name, shape in shard:
                        if c == canonical:
                            offset = _row_offset(cfg, layout, canonical, name)
                            tensors[name] = full[offset:offset + shape[0]].clone()
                    del full
                save_file(tensors, tmp / fname, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(tensors, fname))
                progress.advance(task, sum(t.numel() * 2 for t in tensors.values()))
                del tensors
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, layout), indent=2) + "\n")
        gen = {"eos_token_id": list(cfg.eos_token_ids), "pad_token_id": cfg.pad_token_id, "do_sample": True,
               "temperature": 0.8, "top_p": 0.8, "max_length": cfg.max_position}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer_from is not None:
            copy_tokenizer_files(Path(tokenizer_from), tmp)
        elif builtin_tokenizer:
            from glm_export.builtin_tokenizer import write_builtin_tokenizer

            write_builtin_tokenizer(tmp)
    return Path(out)


TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "tokenizer.json")


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy whichever GLM-4 tokenizer files ``src`` has; at least tokenizer.model must be there."""
    if not (src / "tokenizer.model").is_file() and not (src / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{src} has no tokenizer.model or tokenizer.json to take the tokenizer from")
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _row_offset(cfg: ModelConfig, layout: str, canonical: str, name: str) -> int:
    offset = 0
    for part, shape in source_parts(cfg, layout, canonical):
        if part == name:
            return offset
        offset += shape[0]
    raise KeyError(name)
