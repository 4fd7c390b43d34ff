"""The one source of truth for GLM-4's shapes.

Export, quantization, engine building and the runtime all read model sizes from :class:`ModelConfig`, which
is built from either flavour of Hugging Face ``config.json`` (``chatglm``: the original THUDM checkpoints;
``glm``: transformers' own ``GlmForCausalLM`` layout, e.g. glm-4-9b-chat-hf) and round-trips through the
artifact's ``manifest.json``. Nothing here imports torch, so the runtime can use it too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("chatglm", "glm")

# dtype name -> bytes per element, for memory arithmetic without numpy/torch dtypes.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "int8": 1}


class ConfigError(ValueError):
    """A config.json we cannot (or must not) turn into a GLM-4 model; the message says what to do."""


#: Upper bounds of a plausible config (GLM-4-9B: vocab 151552, hidden 4096, 40 layers, ffn 13696, context 1M for
#: -chat-1m), generous for larger relatives; beyond them a config is corrupt or hostile. Other sizes: 2**20.
SIZE_LIMITS = {"vocab_size": 1 << 24, "num_layers": 4096, "max_position": 1 << 24, "num_heads": 4096,
               "num_kv_heads": 4096, "head_dim": 4096, "rotary_dim": 4096}


@dataclass(frozen=True)
class ModelConfig:
    """GLM-4 hyper-parameters, named once for every consumer.

    ``rope_base`` is already ``10000 * rope_ratio`` (the chatglm flavour stores the ratio, the glm flavour
    the product); ``rotary_dim`` is how many of each head's dims are rotated (GLM-4 rotates only half).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    rms_norm_eps: float
    rope_base: float
    rotary_dim: int
    max_position: int
    qkv_bias: bool = True
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = (151329, 151336, 151338)
    pad_token_id: int = 151329
    dtype: str = "bfloat16"
    layout: str = "chatglm"

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "ffn_hidden_size", "max_position", "rotary_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
            elif value > SIZE_LIMITS.get(name, 1 << 20):  # e.g. vocab_size 10**12 ended in a MemoryError
                problems.append(f"{name} {value} is beyond any GLM-4 model (limit {SIZE_LIMITS.get(name, 1 << 20)})")
        if not problems:
            if self.num_heads % self.num_kv_heads:
                problems.append(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                                f"({self.num_kv_heads}) for grouped-query attention")
            if self.rotary_dim > self.head_dim or self.rotary_dim % 2:
                problems.append(f"rotary_dim ({self.rotary_dim}) must be even and at most head_dim "
                                f"({self.head_dim})")
        if not self.rope_base > 0:
            problems.append(f"rope base must be positive, got {self.rope_base!r}")
        if self.dtype not in DTYPE_BYTES:
            problems.append(f"dtype {self.dtype!r} is not one of {sorted(DTYPE_BYTES)}")
        if problems:
            raise ConfigError("invalid GLM-4 config: " + "; ".join(problems))

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    def kv_cache_bytes_per_token(self, dtype: str = "bfloat16") -> int:
        """K and V of every layer for one token: 40 KiB for GLM-4-9B in bf16."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * DTYPE_BYTES[dtype]

    def num_parameters(self) -> int:
        per_layer = (
            self.hidden_size * self.qkv_size + (self.qkv_size if self.qkv_bias else 0)
            + self.q_size * self.hidden_size
            + self.hidden_size * 2 * self.ffn_hidden_size + self.ffn_hidden_size * self.hidden_size
            + 2 * self.hidden_size
        )
        embed = self.vocab_size * self.hidden_size
        return embed * (1 if self.tie_word_embeddings else 2) + self.num_layers * per_layer + self.hidden_size

    # ---- (de)serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict` (the manifest's ``model`` entry); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; this glm-runtime knows {sorted(known)}")
        d = dict(d)
        if "eos_token_ids" in d:
            d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return cls(**d)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict of either supported flavour."""
        model_type = hf.get("model_type")
        if model_type == "chatglm":
            return _from_chatglm(hf)
        if model_type == "glm":
            return _from_glm(hf)
        raise ConfigError(
            f"config.json has model_type {model_type!r}; glm-export supports GLM-4 checkpoints only: "
            f"model_type 'chatglm' (THUDM/glm-4-9b-chat, -chat-1m, glm-4-9b) or 'glm' (glm-4-9b-chat-hf)"
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found: point at a Hugging Face checkpoint directory with a config.json")
        try:
            hf = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e})") from e
        if not isinstance(hf, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_hf_config(hf)


def _require(hf: dict[str, Any], *names: str) -> Any:
    for name in names:
        if name in hf and hf[name] is not None:
            return hf[name]
    raise ConfigError(f"config.json lacks {' / '.join(names)}, which a GLM-4 config must have")


def _eos_ids(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id", [151329, 151336, 151338])
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _from_chatglm(hf: dict[str, Any]) -> ModelConfig:
    # Flags of the ChatGLM family that GLM-4 never sets: refuse rather than silently compute something else.
    expected = {"rmsnorm": True, "add_bias_linear": False, "apply_residual_connection_post_layernorm": False,
                "post_layer_norm": True, "multi_query_attention": True}
    wrong = [f"{k}={hf[k]!r} (GLM-4 has {v!r})" for k, v in expected.items() if k in hf and hf[k] != v]
    if wrong:
        raise ConfigError("this chatglm config is not a GLM-4 architecture glm-export implements: " + ", ".join(wrong))
    num_heads = _require(hf, "num_attention_heads")
    hidden = _require(hf, "hidden_size")
    head_dim = hf.get("kv_channels") or hidden // num_heads
    # No rope_ratio key (the base model) means 1: base 10000.
    rope_ratio = hf.get("rope_ratio", 1) or 1
    return ModelConfig(
        vocab_size=_require(hf, "padded_vocab_size", "vocab_size"),
        hidden_size=hidden,
        num_layers=_require(hf, "num_layers", "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=_require(hf, "multi_query_group_num"),
        head_dim=head_dim,
        ffn_hidden_size=_require(hf, "ffn_hidden_size"),
        rms_norm_eps=float(_require(hf, "layernorm_epsilon")),
        rope_base=10000.0 * float(rope_ratio),
        rotary_dim=head_dim // 2,
        max_position=_require(hf, "seq_length"),
        qkv_bias=bool(hf.get("add_qkv_bias", True)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        eos_token_ids=_eos_ids(hf),
        pad_token_id=int(hf.get("pad_token_id", 151329)),
        dtype=str(hf.get("torch_dtype", "bfloat16")),
        layout="chatglm",
    )


def _from_glm(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={hf['hidden_act']!r}: GLM-4 uses silu")
    num_heads = _require(hf, "num_attention_heads")
    hidden = _require(hf, "hidden_size")
    head_dim = hf.get("head_dim") or hidden // num_heads
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ConfigError(f"rope type {rope.get('rope_type')!r} is not supported; GLM-4 uses default RoPE")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
    return ModelConfig(
        vocab_size=_require(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=_require(hf, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        ffn_hidden_size=_require(hf, "intermediate_size"),
        rms_norm_eps=float(_require(hf, "rms_norm_eps")),
        rope_base=float(theta),
        rotary_dim=int(head_dim * float(factor)),
        max_position=_require(hf, "max_position_embeddings"),
        qkv_bias=bool(hf.get("attention_bias", True)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        eos_token_ids=_eos_ids(hf),
        pad_token_id=int(hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 151329),
        dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"),
        layout="hf",
    )
