"""Checkpoint loading: both layouts, lazy reads, and one clear error for every kind of breakage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from glm_export.checkpoint import Checkpoint, CheckpointError, canonical_shapes, load_model
from glm_export.random_model import PRESETS, random_tensor, write_random_model

SMALL = PRESETS["tiny"].__class__(**{**PRESETS["tiny"].to_dict(), "vocab_size": 512, "eos_token_ids": (1,),
                                     "pad_token_id": 0})


@pytest.fixture
def small(tmp_path: Path) -> Path:
    return write_random_model(tmp_path / "m", SMALL, "chatglm", seed=0, builtin_tokenizer=False,
                              shard_bytes=40_000)


def test_sharded_index_is_read(small: Path) -> None:
    shards = sorted(small.glob("model-*.safetensors"))
    assert len(shards) > 2, "the fixture should be sharded"
    ckpt = Checkpoint(small)
    ckpt.validate()
    assert ckpt.layout == "chatglm"
    for name, shape in canonical_shapes(SMALL).items():
        assert tuple(ckpt.tensor(name).shape) == shape
    assert torch.equal(ckpt.tensor("layers.1.down.weight"), random_tensor("layers.1.down.weight", (64, 160), 0))


def test_single_file_checkpoint(tmp_path: Path, small: Path) -> None:
    ckpt = Checkpoint(small)
    single = tmp_path / "single"
    shutil.copytree(small, single, ignore=shutil.ignore_patterns("model*.safetensors*"))
    save_file({n: ckpt._read(n) for n in ckpt.tensors}, single / "model.safetensors")
    other = Checkpoint(single)
    other.validate()
    assert torch.equal(other.tensor("embed.weight"), ckpt.tensor("embed.weight"))


def test_hf_layout_concatenates_qkv(tmp_path: Path) -> None:
    ckpt = Checkpoint(write_random_model(tmp_path / "hf", SMALL, "hf", seed=0, builtin_tokenizer=False))
    assert ckpt.layout == "hf"
    qkv = ckpt.tensor("layers.0.qkv.weight")
    assert torch.equal(qkv, random_tensor("layers.0.qkv.weight", tuple(qkv.shape), 0))


def test_load_model_keeps_bf16_memory_mapped(small: Path) -> None:
    """Same dtype as the checkpoint: parameters are views of the mmap, not copies."""
    ckpt = Checkpoint(small)
    model = load_model(ckpt, torch.bfloat16)
    again = ckpt.tensor("layers.0.gate_up.weight")
    assert model.layers[0].gate_up.weight.untyped_storage().data_ptr() == again.untyped_storage().data_ptr()


def test_inv_freq_is_accepted_and_ignored(small: Path) -> None:
    index = json.loads((small / "model.safetensors.index.json").read_text())
    save_file({"transformer.rotary_pos_emb.inv_freq": torch.ones(4, dtype=torch.bfloat16)}, small / "extra.safetensors")
    index["weight_map"]["transformer.rotary_pos_emb.inv_freq"] = "extra.safetensors"
    (small / "model.safetensors.index.json").write_text(json.dumps(index))
    Checkpoint(small).validate()
    model = load_model(small)
    assert model.inv_freq[1].item() == pytest.approx(5e6 ** (-2 / 8))


def _edit_shard(small: Path, edit) -> None:
    index = json.loads((small / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["layers.0.qkv.weight".replace("layers.0.qkv.weight",
                                 "transformer.encoder.layers.0.self_attention.query_key_value.weight")]
    ckpt = Checkpoint(small)
    tensors = {n: ckpt._read(n).clone() for n, info in ckpt.tensors.items() if info.file.name == shard}
    edit(tensors)
    save_file(tensors, small / shard)


def test_missing_unexpected_and_misshapen_are_listed_together(small: Path) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        del t["transformer.encoder.layers.0.self_attention.query_key_value.bias"]
        qkv = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
        t[qkv] = torch.zeros(3, 3, dtype=torch.bfloat16)
        t["transformer.encoder.layers.0.surprise.weight"] = torch.zeros(2, dtype=torch.bfloat16)

    _edit_shard(small, edit)
    index_path = small / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"].pop("transformer.encoder.layers.0.self_attention.query_key_value.bias")
    index["weight_map"]["transformer.encoder.layers.0.surprise.weight"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        Checkpoint(small).validate()
    msg = str(e.value)
    assert "missing tensor transformer.encoder.layers.0.self_attention.query_key_value.bias" in msg
    assert "unexpected tensor transformer.encoder.layers.0.surprise.weight" in msg
    assert "query_key_value.weight: shape [3, 3], config.json implies [128, 64]" in msg
    assert "3 problems" in msg


def test_truncated_shard(small: Path) -> None:
    shard = sorted(small.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{shard.name}: truncated"):
        Checkpoint(small)


def test_index_entry_missing_and_shard_missing(small: Path) -> None:
    index_path = small / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    dropped = "transformer.encoder.layers.1.input_layernorm.weight"  # shares its shard with other tensors
    del index["weight_map"][dropped]
    index_path.write_text(json.dumps(index))
    last = sorted(small.glob("model-*.safetensors"))[-1]
    last.unlink()
    with pytest.raises(CheckpointError) as e:
        Checkpoint(small)
    assert f"{dropped}: in" in str(e.value) and "missing from the index" in str(e.value)
    assert f"shard {last.name} named in the index is missing" in str(e.value)


def test_no_weights_at_all(tmp_path: Path, small: Path) -> None:
    shutil.copy(small / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors\.index\.json or model\.safetensors"):
        Checkpoint(tmp_path)
