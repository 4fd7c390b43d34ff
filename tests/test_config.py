"""ModelConfig from every real config.json flavour, and refusal of what is not GLM-4."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glm_export.random_model import PRESETS, hf_config
from glm_runtime.config import ConfigError, ModelConfig
from tests.conftest import REFERENCE_MODELS

# Numbers from ../shared/docs/glm4-model.md's variant table, stated independently of the files.
EXPECTED = {
    "glm-4-9b-chat": dict(rope_base=10000 * 500, num_kv_heads=2, max_position=131072),
    "glm-4-9b-chat-1m": dict(rope_base=10000 * 10000, num_kv_heads=4, max_position=1048576),
    "glm-4-9b": dict(rope_base=10000, num_kv_heads=2, max_position=8192),
}


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_reference_configs(reference_dir: Path, name: str) -> None:
    cfg = ModelConfig.from_pretrained(reference_dir / name)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim) == (40, 4096, 32, 128)
    assert (cfg.ffn_hidden_size, cfg.vocab_size, cfg.rotary_dim) == (13696, 151552, 64)
    assert cfg.rms_norm_eps == pytest.approx(1.5625e-07)
    assert cfg.qkv_bias and not cfg.tie_word_embeddings
    for key, value in EXPECTED[name].items():
        assert getattr(cfg, key) == value, key
    assert cfg.layout == "chatglm"


def test_kv_bytes_per_token(reference_dir: Path) -> None:
    cfg = ModelConfig.from_pretrained(reference_dir / "glm-4-9b-chat")
    assert cfg.kv_cache_bytes_per_token("bfloat16") == 40 * 1024  # 40 KiB, glm4-model.md
    assert cfg.kv_cache_bytes_per_token("bfloat16") * 131072 == pytest.approx(5.37e9, rel=0.01)


def test_param_count(reference_dir: Path) -> None:
    cfg = ModelConfig.from_pretrained(reference_dir / "glm-4-9b-chat")
    index = reference_dir / "glm-4-9b-chat" / "model.safetensors.index.json"
    total = json.loads(index.read_text())["metadata"]["total_size"]
    # bf16: 2 bytes each; the index's total also counts the stored 32-float inv_freq (64 bytes).
    assert 2 * cfg.num_parameters() + 64 == total


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("layout", ["chatglm", "hf"])
def test_round_trip_both_flavours(preset: str, layout: str) -> None:
    cfg = PRESETS[preset]
    back = ModelConfig.from_hf_config(hf_config(cfg, layout))
    assert back.to_dict() == {**cfg.to_dict(), "layout": layout}
    assert ModelConfig.from_dict(back.to_dict()) == back


def test_other_sizes_are_read_not_assumed() -> None:
    hf = hf_config(PRESETS["tiny"], "chatglm") | {"num_layers": 3, "multi_query_group_num": 4,
                                                  "kv_channels": 8, "padded_vocab_size": 1000, "rope_ratio": 2}
    cfg = ModelConfig.from_hf_config(hf)
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.rotary_dim) == (3, 4, 8, 1000, 4)
    assert cfg.rope_base == 20000


def test_glm_flavour_transformers_v5_rope_parameters() -> None:
    hf = hf_config(PRESETS["tiny"], "hf")
    del hf["rope_theta"], hf["partial_rotary_factor"]
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5}
    cfg = ModelConfig.from_hf_config(hf)
    assert cfg.rope_base == 5e6 and cfg.rotary_dim == 8


def test_unknown_model_type_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model_type 'llama'.*'chatglm'.*'glm'"):
        ModelConfig.from_hf_config({"model_type": "llama", "hidden_size": 4096})


def test_unsupported_chatglm_flags_are_refused() -> None:
    hf = hf_config(PRESETS["tiny"], "chatglm") | {"rmsnorm": False}
    with pytest.raises(ConfigError, match="rmsnorm=False"):
        ModelConfig.from_hf_config(hf)


def test_invalid_sizes_are_refused() -> None:
    hf = hf_config(PRESETS["tiny"], "chatglm") | {"multi_query_group_num": 3}
    with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
        ModelConfig.from_hf_config(hf)


def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.json not found"):
        ModelConfig.from_pretrained(tmp_path)
