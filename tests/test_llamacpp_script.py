"""scripts/llamacpp.py's pure-Python parts: parsing llama-bench JSON and llama-perplexity summaries, staging a
checkpoint for the GGUF converter, and the one-line "not built" error. No llama.cpp build is needed (CI has none).

The perplexity lines are produced here from the printf formats in llama.cpp's tools/perplexity/perplexity.cpp
(copied as format strings, filled with our own numbers), so the parser is checked against what the tool can print,
not against one captured run."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "llamacpp.py"
_spec = importlib.util.spec_from_file_location("llamacpp_script", _PATH)
assert _spec is not None and _spec.loader is not None
llamacpp = importlib.util.module_from_spec(_spec)
sys.modules["llamacpp_script"] = llamacpp
_spec.loader.exec_module(llamacpp)


def c_format(fmt: str, *values: object) -> str:
    """A C printf format (as in perplexity.cpp) applied in Python: %lf -> %f."""
    return fmt.replace("lf", "f") % values


def test_parse_bench_json_takes_every_sample() -> None:
    # llama-bench's json_printer: "[", one object per test with get_fields() + samples_ns + samples_ts, "]"
    rows = [{"build_commit": "abc", "model_filename": "/m/a.gguf", "model_type": "chatglm ?B Q8_0",
             "model_size": 123, "n_threads": 2, "n_prompt": 0, "n_gen": 32, "avg_ts": 11.0, "stddev_ts": 1.0,
             "samples_ns": [1, 2], "samples_ts": [10.0, 12.0]},
            {"build_commit": "abc", "model_filename": "/m/b.gguf", "model_type": "chatglm ?B Q4_0",
             "model_size": 45, "n_threads": 2, "n_prompt": 0, "n_gen": 32, "avg_ts": 20.5, "stddev_ts": 0.0,
             "samples_ns": [3], "samples_ts": [20.5]}]
    text = "warming up\n" + json.dumps(rows, indent=2)
    out = llamacpp.parse_bench_json(text)
    assert [r["model"] for r in out] == ["/m/a.gguf", "/m/b.gguf"]
    assert out[0]["tok_s"] == [10.0, 12.0] and out[1]["tok_s"] == [20.5]
    assert out[0]["n_gen"] == 32 and out[0]["threads"] == 2 and out[1]["size_bytes"] == 45


def test_parse_bench_json_without_output_is_a_clear_error() -> None:
    with pytest.raises(llamacpp.LlamaCppError, match="no JSON"):
        llamacpp.parse_bench_json("error: failed to load model\n")


def test_parse_plain_perplexity() -> None:
    text = "\n".join([
        c_format("%s: have %zu tokens. Calculation chunk = %d".replace("%zu", "%d"), "perplexity", 16384, 2048),
        c_format("%s: calculating perplexity over %d chunks, n_ctx=%d, batch_size=%d, n_seq=%d",
                 "perplexity", 64, 256, 2048, 8),
        "[1]123.4567,[2]130.0000,",
        c_format("Final estimate: PPL = %.4lf +/- %.5lf", 131.2345, 2.71828),
    ])
    r = llamacpp.parse_perplexity(text)
    assert (r.ppl, r.ppl_err, r.chunks, r.n_ctx, r.tokens) == (131.2345, 2.71828, 64, 256, 16384)
    assert r.kl is None and r.delta_ppl_pct is None


def test_parse_kl_divergence_summary() -> None:
    lines = [
        c_format("%s: computing over %d chunks, n_ctx=%u, batch_size=%d, n_seq=%d".replace("%u", "%d"),
                 "kl_divergence", 64, 256, 2048, 8),
        "====== Perplexity statistics ======",
        c_format("Mean PPL(Q)                   : %10.6lf ± %10.6lf", 140.5, 3.25),
        c_format("Mean PPL(base)                : %10.6lf ± %10.6lf", 131.25, 3.0),
        c_format("Cor(ln(PPL(Q)), ln(PPL(base))): %6.2lf%%", 99.5),
        c_format("Mean ln(PPL(Q)/PPL(base))     : %10.6lf ± %10.6lf", math.log(140.5 / 131.25), 0.0015),
        c_format("Mean PPL(Q)/PPL(base)         : %10.6lf ± %10.6lf", 140.5 / 131.25, 0.002),
        "====== KL divergence statistics ======",
        c_format("Mean    KLD: %10.6lf ± %10.6lf", 0.0123, 0.0004),
        c_format("Maximum KLD: %10.6f", 1.5),
        "====== Token probability statistics ======",
        c_format("Same top p: %6.3lf ± %5.3lf %%", 93.75, 0.25),
    ]
    r = llamacpp.parse_perplexity("\n".join(lines))
    assert r.ppl == 140.5 and r.ppl_err == 3.25 and r.ppl_base == 131.25
    assert r.delta_ppl_pct == pytest.approx(100 * (140.5 / 131.25 - 1))
    assert r.ln_ratio == pytest.approx(math.log(140.5 / 131.25), abs=1e-6) and r.ln_ratio_err == 0.0015
    assert (r.kl, r.kl_err) == (0.0123, 0.0004)
    assert r.top1 == pytest.approx(0.9375) and r.top1_err == pytest.approx(0.0025)
    assert (r.chunks, r.n_ctx) == (64, 256)


def test_missing_build_is_one_line_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(llamacpp.LlamaCppError) as e:
        llamacpp.tool(tmp_path, "llama-bench")
    msg = str(e.value)
    assert "\n" not in msg and "llama-bench" in msg and "cmake" in msg and "--build" in msg
    with pytest.raises(SystemExit, match=r"^error: llama\.cpp tool llama-bench not found"):
        llamacpp.main(["bench", str(tmp_path / "x.gguf"), "--build", str(tmp_path)])


def test_stage_fills_the_keys_the_converter_reads(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"x")
    (ckpt / "tokenizer.json").write_text("{}")
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["x", None]},
                                                             "eos_token": "<|endoftext|>"}))
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["GlmForCausalLM"], "rope_theta": 5e6,
                                                  "max_position_embeddings": 8192, "rms_norm_eps": 1.5625e-7,
                                                  "vocab_size": 151552}))
    stage = tmp_path / "stage"
    notes = llamacpp.stage_checkpoint(ckpt, stage)
    cfg = json.loads((stage / "config.json").read_text())
    assert cfg["rope_ratio"] * 10000 == pytest.approx(5e6) and cfg["seq_length"] == 8192
    assert cfg["layernorm_epsilon"] == 1.5625e-7 and len(notes) == 3
    tok = json.loads((stage / "tokenizer_config.json").read_text())
    assert "auto_map" not in tok and tok["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (stage / "model.safetensors").resolve() == (ckpt / "model.safetensors").resolve()
    # THUDM layout: padded_vocab_size only -> vocab_size added; rope_ratio already there -> untouched
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["ChatGLMModel"], "padded_vocab_size": 151552,
                                                  "rope_ratio": 500}))
    stage2 = tmp_path / "stage2"
    llamacpp.stage_checkpoint(ckpt, stage2)
    cfg = json.loads((stage2 / "config.json").read_text())
    assert cfg["vocab_size"] == 151552 and cfg["rope_ratio"] == 500 and "seq_length" not in cfg
