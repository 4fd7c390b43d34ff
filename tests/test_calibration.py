"""The shipped calibration set, calibration input errors, and the statistics the hooks collect."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from glm_export import calibrate, numerics
from glm_export.quantize.rewrite import QuantizeError, QuantOptions, check_options

REPO = Path(__file__).resolve().parents[1]


def test_default_set_is_large_varied_and_small() -> None:
    path = calibrate.default_calibration_path()
    assert path == REPO / "calibration" / "default.jsonl"
    assert path.stat().st_size < 1_000_000
    records = calibrate.load_records("default")
    assert len(records) >= 256
    kinds = Counter(r["kind"] for r in records)
    assert set(kinds) == {"chat_en", "chat_zh", "code", "math", "multi_turn", "tool", "long_doc"}
    tool = next(r for r in records if r["kind"] == "tool")["messages"]
    assert [m["role"] for m in tool][-3:] == ["assistant", "observation", "assistant"] and "metadata" in tool[-3]
    assert any(sum(m["role"] == "user" for m in r["messages"]) >= 3 for r in records)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in records[0]["messages"][0]["content"] + json.dumps(records[:20]))


def test_generator_is_deterministic_and_committed() -> None:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "make_calibration.py"), "--check"])
    assert done.returncode == 0, "calibration/*.jsonl is stale: run scripts/make_calibration.py"


def test_heldout_is_disjoint_from_calibration() -> None:
    calib = {json.dumps(r["messages"]) for r in calibrate.load_records("default")}
    held = calibrate.load_records(str(calibrate.heldout_path()))
    assert held and not any(json.dumps(r["messages"]) in calib for r in held)


def test_chat_template_and_long_documents(tiny_artifact: Path) -> None:
    records = calibrate.load_records("default")
    longs = [r for r in records if r["kind"] == "long_doc"]
    ids, note = calibrate.tokenize(longs[:8] + records[:8], tiny_artifact, 151552, 16, 100_000)
    assert "chat template" in note
    assert min(len(i) for i in ids[:8]) >= 2048  # long documents are long (built-in tokenizer)
    assert ids[8][:2] == [151331, 151333]  # [gMASK]<sop>: rendered through the template, not as plain text
    cut, _ = calibrate.tokenize(records, tiny_artifact, 151552, 16, 64)
    assert max(len(i) for i in cut) == 64


def test_no_tokenizer_falls_back_to_random_ids(tmp_path: Path) -> None:
    ids, note = calibrate.tokenize(calibrate.load_records("default"), tmp_path, 1000, 12, 32)
    assert len(ids) == 12 and all(len(i) == 32 and max(i) < 1000 for i in ids)
    assert "random token ids" in note and "no tokenizer" in note


@pytest.mark.parametrize(("content", "suffix", "message"), [
    ("", ".jsonl", "0 usable samples"),
    ('{"text": "a"}\n' * 3, ".jsonl", "3 usable samples"),
    ('{"prompt": "a"}\n' * 20, ".jsonl", "expected {\"messages\""),
    ("[1, 2]\n", ".jsonl", "expected"),
    ("not json\n", ".jsonl", "not JSON"),
    ("a,b\n", ".csv", "unknown calibration format"),
])
def test_bad_calibration_files(tmp_path: Path, content: str, suffix: str, message: str) -> None:
    path = tmp_path / f"calib{suffix}"
    path.write_text(content)
    with pytest.raises(QuantizeError, match=message.replace("{", r"\{").replace("[", r"\[")):
        check_options("int8", QuantOptions(calibration=str(path)))


def test_text_files_and_user_jsonl(tmp_path: Path) -> None:
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(f"paragraph {i} about tea" for i in range(10)))
    check_options("int8", QuantOptions(calibration=str(txt)))
    assert calibrate.load_records(str(txt))[3] == {"text": "paragraph 3 about tea"}
    with pytest.raises(QuantizeError, match="not found"):
        check_options("int8", QuantOptions(calibration=str(tmp_path / "missing.jsonl")))


@pytest.mark.parametrize(("precision", "opts", "message"), [
    ("int3", {}, "unknown quantized precision 'int3'"),
    ("fp8", {"target_compute_capability": 8.6}, "compute capability 8.9"),
    ("int4", {"weight_block": 100}, "--weight-block 100"),
    ("int4", {"weight_method": "hqq"}, "--weight-method 'hqq'"),
    ("int8", {"smoothquant_alpha": 1.5}, "--smoothquant-alpha"),
    ("int8", {"calib_samples": 2}, "--calib-samples 2 is too few"),
    ("int8", {"kv_cache": "fp8"}, "kv-cache-dtype .fp8."),
])
def test_bad_options(precision: str, opts: dict, message: str) -> None:
    with pytest.raises(QuantizeError, match=message):
        check_options(precision, QuantOptions(**opts))
    check_options("fp8", QuantOptions(target_compute_capability=8.9))


def test_hook_statistics_match_a_manual_forward(tiny_checkpoint: Path) -> None:
    from glm_export.checkpoint import load_model

    model = load_model(tiny_checkpoint)
    seqs = [[(7 * i + 3 * j) % 5000 for j in range(20 + i)] for i in range(9)]
    stats = calibrate.collect(model, seqs)
    # Independent: the first layer's qkv input is input_norm(embedding), computed here by hand.
    x = torch.cat([model.embed.weight[torch.tensor(s)] for s in seqs])
    ref = F.rms_norm(x, (x.shape[-1],), model.layers[0].input_norm.weight, model.cfg.rms_norm_eps)
    st = stats.modules["layers.0.qkv.weight"]
    # Tolerances from the arithmetic (numerics.py): the norm sums `hidden` squares; the mean sums the rows.
    norm_rtol = numerics.sum_rtol(model.cfg.hidden_size)
    torch.testing.assert_close(st.absmax, ref.abs().amax(0), rtol=norm_rtol, atol=0)
    torch.testing.assert_close(st.absmean.float(), ref.abs().mean(0), rtol=norm_rtol + numerics.sum_rtol(len(x)),
                               atol=0)
    assert st.count == sum(len(s) for s in seqs) and st.sample_rows().shape[1] == model.cfg.hidden_size
    assert set(stats.modules) == {f"layers.{i}.{m}.weight" for i in range(2)
                                  for m in ("qkv", "o_proj", "gate_up", "down")} | {"lm_head.weight"}
    assert stats.modules["lm_head.weight"].count == sum(min(len(s), 110) for s in seqs)  # 2**24 // 151552 rows
    assert stats.tokens == sum(len(s) for s in seqs) and all(v > 0 for v in stats.kv_absmax.values())
    cfg = model.cfg  # per-channel K/V ranges (a quantized cache needs V's after the folds): their max is the scalar
    for name, ch in stats.kv_channel_absmax.items():
        assert ch.shape == (cfg.num_kv_heads * cfg.head_dim,) and float(ch.max()) == stats.kv_absmax[name]


def test_samples_too_short_once_tokenized_fail_as_a_quantize_error(tiny_checkpoint: Path, tiny_artifact: Path,
                                                                   tmp_path: Path) -> None:
    """The up-front check counts records; only tokenizing shows they are all shorter than MIN_TOKENS. That must
    still be a QuantizeError (build prints it as one line), not a traceback, and it must name the fix."""
    import shutil

    from glm_export.quantize.rewrite import quantize_into

    short = tmp_path / "short.jsonl"
    short.write_text("".join('{"text": "hi"}\n' for _ in range(10)))
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    with pytest.raises(QuantizeError, match="longer samples"):
        quantize_into(tiny_checkpoint, art, "int8", QuantOptions(calibration=str(short), calib_samples=8))
