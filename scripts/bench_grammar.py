"""Per-token cost of constrained decoding with GLM-4's vocabulary: the grammar engines on PyPI side by side.

    python scripts/bench_grammar.py ARTIFACT_OR_TOKENIZER_DIR [--steps 200] [--libs llguidance,xgrammar,outlines]

For each JSON schema below and each library that is installed: the one-off costs (the library's tokenizer view,
compiling the schema) and, per generated token, the time to compute the allowed-token mask and to advance the
matcher, over a random walk through the grammar (each step draws a uniformly random allowed token, so every
branch of the schema gets visited; the same walk length for every library). Also the runtime's own cost of
applying llguidance's mask to a float32 logits row (``glm_runtime.grammar.Constraint.apply``), which is what
the server adds per token on top of the library.

xgrammar's Python package needs torch (its bitmask is a torch tensor) and outlines-core builds an index per
schema; each is measured only where it is installed (not a dependency of the runtime: run this in a separate
virtual environment to compare). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

VOCAB = 151552  # GLM-4's embedding rows (the tokenizer's ids are below; the rest are padding)
STOP_IDS = [151329, 151336, 151338]  # <|endoftext|>, <|user|>, <|observation|>
SCHEMAS: dict[str, dict[str, Any]] = {
    "weather call": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 24}, "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14}}, "required": ["city", "unit", "days"],
        "additionalProperties": False},
    "nested record": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 32}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {"type": "object", "properties": {"street": {"type": "string", "maxLength": 40},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["street", "zip"], "additionalProperties": False}},
        "required": ["name", "age", "tags", "address"], "additionalProperties": False},
}


def summary(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    return {"mean_ms": 1e3 * statistics.fmean(v), "p50_ms": 1e3 * v[len(v) // 2],
            "p99_ms": 1e3 * v[min(len(v) - 1, round(0.99 * (len(v) - 1)))], "n": len(v)}


def allowed_from_words(words: np.ndarray, vocab: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little", count=vocab))


def bench_llguidance(tokenizer_json: str, schema: dict[str, Any], steps: int, rng: np.random.Generator
                     ) -> dict[str, Any]:
    import llguidance as llg

    from glm_runtime.grammar import Constraint, json_schema_lark

    t0 = time.perf_counter()
    lltok = llg.LLTokenizer(tokenizer_json, n_vocab=VOCAB, eos_token=STOP_IDS)
    t_tok = time.perf_counter() - t0
    out: dict[str, Any] = {"library": f"llguidance {llg.__version__}", "tokenizer_s": t_tok}
    t0 = time.perf_counter()
    grammar = llg.LLMatcher.grammar_from_lark(f"start: {json_schema_lark(schema)}\n")
    matcher = llg.LLMatcher(lltok, grammar, log_level=0)
    out["compile_s"] = time.perf_counter() - t0
    words = np.zeros((VOCAB + 31) // 32, np.int32)
    masks, advances, apply_times = [], [], []
    constraint = Constraint(matcher, VOCAB)
    logits = np.zeros(VOCAB, np.float32)
    for _ in range(steps):
        t0 = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        masks.append(time.perf_counter() - t0)
        allowed = allowed_from_words(words, VOCAB)
        logits[:] = 0
        t0 = time.perf_counter()
        constraint.apply(logits)  # the mask again plus numpy's unpack and -inf fill: what the server pays
        apply_times.append(time.perf_counter() - t0)
        token = int(rng.choice(allowed))
        t0 = time.perf_counter()
        matcher.consume_token(token)
        advances.append(time.perf_counter() - t0)
        if matcher.is_stopped() or token in STOP_IDS:
            matcher.reset()
    out.update(mask=summary(masks), advance=summary(advances), runtime_apply=summary(apply_times))
    return out


def bench_xgrammar(tokenizer_dir: Path, schema: dict[str, Any], steps: int, rng: np.random.Generator
                   ) -> dict[str, Any]:
    import torch
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    t0 = time.perf_counter()
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=VOCAB, stop_token_ids=STOP_IDS)
    compiler = xgr.GrammarCompiler(info)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
    t_compile = time.perf_counter() - t0
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, VOCAB)
    masks, advances = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        masks.append(time.perf_counter() - t0)
        allowed = allowed_from_words(bitmask[0].numpy(), VOCAB)
        token = int(rng.choice(allowed))
        t0 = time.perf_counter()
        matcher.accept_token(token)
        advances.append(time.perf_counter() - t0)
        if matcher.is_terminated() or token in STOP_IDS:
            matcher.reset()
    del torch
    return {"library": f"xgrammar {xgr.__version__}", "tokenizer_s": t_tok, "compile_s": t_compile,
            "mask": summary(masks), "advance": summary(advances)}


def bench_outlines(tokenizer_dir: Path, schema: dict[str, Any], steps: int, rng: np.random.Generator
                   ) -> dict[str, Any]:
    import outlines_core
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    vocab: dict[str, list[int]] = {}
    for piece, i in tok.get_vocab(with_added_tokens=False).items():
        if i not in STOP_IDS:
            vocab.setdefault(piece, []).append(i)
    vocabulary = Vocabulary(STOP_IDS[0], vocab)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(schema)), vocabulary)
    t_compile = time.perf_counter() - t0
    guide = Guide(index)
    masks, advances = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        allowed = guide.get_tokens()
        masks.append(time.perf_counter() - t0)
        token = int(rng.choice(allowed))
        t0 = time.perf_counter()
        guide.advance(token)
        advances.append(time.perf_counter() - t0)
        if guide.is_finished() or token == STOP_IDS[0]:
            guide = Guide(index)
    return {"library": f"outlines-core {getattr(outlines_core, '__version__', '?')}", "tokenizer_s": t_tok,
            "compile_s": t_compile, "mask": summary(masks), "advance": summary(advances)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tokenizer_dir", type=Path, help="an artifact (or checkpoint) directory with tokenizer.json")
    ap.add_argument("--steps", type=int, default=200, help="tokens per schema and library")
    ap.add_argument("--libs", default="llguidance,xgrammar,outlines")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tokenizer_json = (args.tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8")
    runners = {"llguidance": lambda s, r: bench_llguidance(tokenizer_json, s, args.steps, r),
               "xgrammar": lambda s, r: bench_xgrammar(args.tokenizer_dir, s, args.steps, r),
               "outlines": lambda s, r: bench_outlines(args.tokenizer_dir, s, args.steps, r)}
    results = []
    for lib in args.libs.split(","):
        for name, schema in SCHEMAS.items():
            try:
                res = runners[lib](schema, np.random.default_rng(0))
            except ImportError as e:
                print(f"{lib}: not installed here ({e.name}); skipped", file=sys.stderr)
                break
            results.append({"schema": name, **res})
    print(f"\nvocabulary {VOCAB}, {args.steps} random-walk tokens per schema\n")
    print("| library | schema | tokenizer view | compile | mask mean / p50 / p99 | advance mean | runtime apply mean |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        m, a = r["mask"], r["advance"]
        apply = f"{r['runtime_apply']['mean_ms']:.3f} ms" if "runtime_apply" in r else "-"
        print(f"| {r['library']} | {r['schema']} | {r['tokenizer_s']:.2f} s | {1e3 * r['compile_s']:.1f} ms | "
              f"{m['mean_ms']:.3f} / {m['p50_ms']:.3f} / {m['p99_ms']:.3f} ms | {a['mean_ms']:.3f} ms | {apply} |")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
