"""Encoding throughput of glm_runtime's tokenizer side by side with tiktoken on the 1 MB test corpus.

    python scripts/bench_tokenizer.py [--tokenizer-model PATH] [--repeats 7]

Uses GLM-4's real ``tokenizer.model`` from ../shared/glm4-reference when present, else the built-in tokenizer.
Both sides get the same text in the same process, alternately, and the median of the runs is reported (the
machine is shared and noisy: compare the ratio, not the absolute numbers). Ids are checked equal first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "runtime"), str(REPO)]

from glm_runtime.tokenizer import GLMTokenizer  # noqa: E402
from tests.text_corpus import (  # noqa: E402
    builtin_raw_dir,
    converted_tokenizer_dir,
    corpus_documents,
    corpus_text,
    tiktoken_reference,
)

DEFAULT_MODEL_DIR = REPO.parent / "shared" / "glm4-reference" / "glm-4-9b-chat"


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (BPE caches, thread pools)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-model", type=Path, default=None, help="tiktoken ranks file (tokenizer.model)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    model = args.tokenizer_model
    if model is None:
        model_dir = DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / "tokenizer.model").is_file() else builtin_raw_dir()
        model = model_dir / "tokenizer.model"
    glm = GLMTokenizer.from_dir(converted_tokenizer_dir(model.parent))
    ref = tiktoken_reference(model)
    text = corpus_text()
    docs = list(corpus_documents())
    lines = text.splitlines(keepends=True)
    megabytes = len(text.encode("utf-8")) / 1e6

    assert glm.encode(text) == ref.encode_ordinary(text), "ids differ: fix exactness before measuring speed"
    assert glm.encode_batch(docs) == ref.encode_ordinary_batch(docs)

    cases: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        ("one call, whole corpus", lambda: ref.encode_ordinary(text), lambda: glm.encode(text)),
        (
            "one call, no chunking (1 thread)",
            lambda: ref.encode_ordinary(text),
            lambda: glm.backend.encode_batch_fast([text], add_special_tokens=False),
        ),
        (
            f"batch of {len(docs)} documents",
            lambda: ref.encode_ordinary_batch(docs),
            lambda: glm.encode_batch(docs),
        ),
        (
            f"batch of {len(lines)} lines",
            lambda: ref.encode_ordinary_batch(lines),
            lambda: glm.encode_batch(lines),
        ),
        (
            "one call per line (loop)",
            lambda: [ref.encode_ordinary(line) for line in lines],
            lambda: [glm.encode(line) for line in lines],
        ),
    ]
    ids = glm.encode(text)
    cases.append(("decode whole corpus", lambda: ref.decode(ids), lambda: glm.decode(ids)))

    print(f"corpus: {megabytes:.2f} MB, {len(docs)} documents, {len(lines)} lines; ranks: {model}")
    print(f"cpus: {os.cpu_count()}, repeats: {args.repeats} (median)\n")
    columns = ("case".ljust(34), "tiktoken MB/s", "glm_runtime MB/s", "time ratio (ours/tiktoken)")
    header = "| " + " | ".join(columns) + " |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for name, theirs, ours in cases:
        t_ref = median_seconds(theirs, args.repeats)
        t_ours = median_seconds(ours, args.repeats)
        print(f"| {name:34} | {megabytes / t_ref:13.2f} | {megabytes / t_ours:16.2f} | {t_ours / t_ref:26.2f} |")


if __name__ == "__main__":
    main()
