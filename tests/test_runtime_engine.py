"""The ONNX Runtime engine's cache handling, and the KV memory arithmetic every engine shares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from glm_export.random_model import GLM4_9B
from glm_runtime.engine import MemoryBudgetError, attention_scratch_bytes, plan_kv, round_cache_len
from glm_runtime.engine_ort import OrtEngine, default_providers
from glm_runtime.generator import Generator
from glm_runtime.manifest import model_config, read_manifest
from glm_runtime.sampling import SamplingParams

INPLACE_WARNING = "in-place optimization not activated"


@pytest.fixture(scope="module")
def engine(tiny_artifact: Path) -> OrtEngine:
    cfg = model_config(read_manifest(tiny_artifact, verify="none"))
    return OrtEngine(tiny_artifact / "model.onnx", cfg, threads=2, log_severity=2)  # 2: warnings are logged


def test_cache_is_updated_in_place_over_100_decode_steps(engine: OrtEngine, capfd: pytest.CaptureFixture) -> None:
    gen = Generator(engine, kv_budget_bytes=1 << 30)
    batch = gen.start([[5, 17, 300, 42], [7, 8]], 101, SamplingParams(temperature=0))
    addresses = batch.cache.addresses()
    assert len(addresses) == 2 * engine.config.num_layers and len(set(addresses)) == len(addresses)
    while not batch.done:
        batch.step()
        assert batch.cache.addresses() == addresses
    assert batch.timings.decode_steps == 100
    assert batch.cache.cache_len == round_cache_len(4 + 101, engine.config.max_position) == 128
    # The buffers the graph wrote are the ones we hold: slot p of row 0 is filled up to its last fed token.
    k0 = batch.cache.arrays[0]
    filled = np.flatnonzero(np.abs(k0[0, 0]).sum(-1))
    assert filled.tolist() == list(range(4 + 100))
    assert INPLACE_WARNING not in capfd.readouterr().err
    # Positive control: the same session run without binding the cache in place does warn.
    cfg = engine.config
    feeds = {"input_ids": np.zeros((1, 1), np.int64), "position_ids": np.zeros((1, 1), np.int64),
             "logits_index": np.zeros((1, 1), np.int64)}
    for i in range(cfg.num_layers):
        for kv in ("key", "value"):
            feeds[f"past_{kv}_{i}"] = np.zeros((1, cfg.num_kv_heads, 8, cfg.head_dim), np.float32)
    engine.session.run(None, feeds)
    assert INPLACE_WARNING in capfd.readouterr().err


def test_resize_keeps_the_valid_slots(engine: OrtEngine) -> None:
    cache = engine.allocate(2, 64)
    ids = np.array([[1, 2, 3], [4, 5, 6]], np.int64)
    pos = np.tile(np.arange(3), (2, 1))
    engine.step(cache, ids, pos, np.array([[2], [2]]))
    before = [a[:, :, :3].copy() for a in cache.arrays]
    engine.resize(cache, 256, keep=3)
    assert cache.cache_len == 256 and cache.arrays[0].shape[2] == 256
    for old, new in zip(before, cache.arrays, strict=True):
        np.testing.assert_array_equal(old, new[:, :, :3])
        assert not new[:, :, 3:].any()


def test_providers_default_to_cpu_without_a_gpu(engine: OrtEngine) -> None:
    assert default_providers()[-1] == "CPUExecutionProvider"
    assert engine.providers[0] in default_providers()
    with pytest.raises(ValueError, match="onnxruntime-gpu"):
        OrtEngine(engine.model_path, engine.config, providers=["NoSuchExecutionProvider"])


def test_kv_arithmetic_for_glm4_9b() -> None:
    cfg = GLM4_9B
    per_token = cfg.kv_cache_bytes_per_token("bfloat16")
    assert per_token == 40 * 1024  # 40 layers x (K, V) x 2 groups x 128 x 2 bytes
    plan = plan_kv(cfg, "bfloat16", 1, 131072, 512, budget_bytes=64 * 10**9)
    assert plan.kv_bytes == 131072 * 40 * 1024 and round(plan.kv_bytes / 1e9, 1) == 5.4
    assert plan.prefill_chunk == 512
    # A budget that holds the cache but not a 512-token chunk's attention over 128K slots: the chunk shrinks
    # to the largest size that fits.
    budget = 8 * 10**9
    plan = plan_kv(cfg, "bfloat16", 1, 131072, 512, budget_bytes=budget)
    assert plan.total_bytes <= budget < plan.kv_bytes + attention_scratch_bytes(cfg, 1, 2 * plan.prefill_chunk, 131072)
    with pytest.raises(MemoryBudgetError) as err:
        plan_kv(cfg, "bfloat16", 2, 131072, 512, budget_bytes=budget)
    msg = str(err.value)
    assert "2 x 131072 tokens x 40.0 KiB/token" in msg and "40 layers x K,V x 2 groups x 128 x 2 bytes" in msg
    assert "10.0 GiB" in msg and "max_new_tokens" in msg


def test_cache_length_rounding() -> None:
    assert round_cache_len(1, 8192) == 64
    assert round_cache_len(129, 8192) == 192
    assert round_cache_len(8190, 8192) == 8192  # never beyond the context...
    assert round_cache_len(9000, 8192) == 9000  # ...unless asked for (the caller refuses that earlier)
