#!/usr/bin/env python3
"""Held-out Δ perplexity, KL, top-1 and bytes of every precision / method on one checkpoint, in one run.

    PYTHONPATH=.:runtime python scripts/eval_quant.py /work/models/evalmodel/tiny-glm \
        --text /work/models/evalmodel/tiny-glm/heldout.txt --work /tmp/eval-quant \
        --variants fp32,int8,int8/trt,fp8,int4,int4/zp,int4/head-fp,int4/b128

Each variant is quantized from the same fp32 export with the same calibration statistics (collected once, with
the build's defaults unless ``--calib-samples`` / ``--calib-seq-len`` say otherwise) and measured with
``glm-export eval``'s code against the PyTorch fp32 checkpoint. A variant is a precision (``fp32``, ``int8``,
``fp8``, ``int4``) optionally followed by ``/`` tokens of ``scripts/bench_quant.py`` (``b128``, ``rtn``,
``none``, ``zp``, ``sym``, ``gptq``, ``awq-gptq``, ``head-fp``, ``head8``, ``kv8``, ``amax-pct``, ``amax-mse``)
or ``trt`` (the TensorRT form of the graph: full-range int8,
blocked DequantizeLinear int4 without zero points; quantized from the fp32 export so that ONNX Runtime's CPU
runs it; the engine itself is built from the fp16 export). Results go to ``--work/eval_quant.json`` and a
markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quant import parse_variant, weight_bytes

from glm_export import calibrate
from glm_export.checkpoint import Checkpoint, load_model
from glm_export.evaluate import (
    EvalResult,
    OrtScorer,
    Tally,
    TorchScorer,
    first_scored,
    log_softmax64,
    summarize,
    tokenize_text,
    windows,
)
from glm_export.export import export_onnx
from glm_export.progress import count_progress
from glm_export.quantize.rewrite import (
    QuantOptions,
    describe,
    options_for_backend,
    resolve_host_options,
    resolve_lm_head,
    rewrite_file,
)


def variant_options(spec: str, base: QuantOptions) -> tuple[str, QuantOptions]:
    tokens = spec.split("/")
    trt = "trt" in tokens
    precision, opts = parse_variant("/".join(t for t in tokens if t != "trt"), base)
    if trt:
        opts = options_for_backend(opts, "tensorrt")
    return precision, resolve_host_options(opts)  # lm_head "auto" is resolved in main (it needs the config)


def evaluate_many(candidates: dict[str, OrtScorer], ids: list[int], ctx: int, reference: TorchScorer,
                  max_windows: int | None, text_name: str) -> dict[str, EvalResult]:
    """``evaluate_ids`` for several candidates at once: the reference's log-probabilities once per window."""
    wins = windows(ids, ctx, max_windows)
    first = first_scored(ctx, "all")
    tallies = {k: Tally() for k in candidates}
    with count_progress() as bar:
        task = bar.add_task(f"eval: {len(candidates)} variants, {len(wins)} windows of {ctx} tokens", total=len(wins))
        for win in wins:
            ref = log_softmax64(reference.logits(win)[first:-1])
            targets = np.asarray(win[first + 1:])
            for k, c in candidates.items():
                tallies[k].add(log_softmax64(c.logits(win)[first:-1]), targets, ref)
            bar.advance(task)
    return {k: summarize(t, model=candidates[k].name, text=text_name, ctx=ctx, score="all", windows=len(wins),
                         reference=reference.name) for k, t in tallies.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="checkpoint directory")
    ap.add_argument("--text", type=Path, required=True, help="held-out raw text")
    ap.add_argument("--work", type=Path, required=True, help="directory for the artifacts and eval_quant.json")
    ap.add_argument("--variants", default="fp32,int8,int8/trt,fp8,int4,int4/zp,int4/head-fp,int4/b128")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--calib-samples", type=int, default=QuantOptions.calib_samples)
    ap.add_argument("--calib-seq-len", type=int, default=QuantOptions.calib_seq_len)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--discard", action="store_true", help="delete each quantized artifact once measured (disk)")
    ap.add_argument("--batch", type=int, default=8, help="variants measured against one reference pass")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    fp32 = args.work / "fp32"
    if not (fp32 / "manifest.json").is_file():
        export_onnx(args.model, fp32, "float32", overwrite=True)
    ckpt = Checkpoint(args.model)
    cfg = ckpt.config
    base = QuantOptions(calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, accuracy_samples=0)
    records = calibrate.load_records(base.calibration)
    seqs, note = calibrate.tokenize(records, fp32, cfg.vocab_size, base.calib_samples, base.calib_seq_len)
    stats = None
    ids = tokenize_text(args.text, fp32)
    reference = TorchScorer(args.model, args.threads)
    results_path = args.work / "eval_quant.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    todo = [v for v in args.variants.split(",") if v not in results]
    for spec in args.variants.split(","):
        if spec in results:
            print(f"{spec}: measured before (delete it from {results_path} to measure again)", flush=True)
    # Variants are measured --batch at a time against one pass of the reference per window (the PyTorch fp32
    # reference costs as much as a candidate; computing it once per batch instead of once per variant halves
    # the run time on the tiny model).
    for b0 in range(0, len(todo), args.batch):
        batch: dict[str, tuple[Path, str, QuantOptions]] = {}
        for spec in todo[b0:b0 + args.batch]:
            precision, opts = variant_options(spec, base)
            opts = resolve_lm_head(opts, cfg, precision)
            art = fp32 if precision == "fp32" else args.work / spec.replace("/", "-")
            if art != fp32:
                if stats is None:
                    model = load_model(ckpt, torch.float32)
                    # X^T X of every MatMul (GPTQ variants): small models only, as the whole-model build path
                    stats = calibrate.collect(model, seqs, note, hessian=calibrate.module_order(cfg.num_layers))
                    del model
                shutil.rmtree(art, ignore_errors=True)
                art.mkdir(parents=True)
                for f in fp32.iterdir():
                    if f.is_file() and not f.name.startswith("model.onnx"):
                        shutil.copyfile(f, art / f.name)
                rewrite_file(art, cfg, precision, opts, stats, source=fp32)
            batch[spec] = (art, precision, opts)
        scorers = {spec: OrtScorer(art, args.threads, cfg=cfg) for spec, (art, _, _) in batch.items()}
        measured = evaluate_many(scorers, ids, args.ctx, reference, args.max_windows, str(args.text))
        for spec, res in measured.items():
            art, precision, opts = batch[spec]
            total, per_token = weight_bytes(art)
            results[spec] = {"precision": precision, "scheme": describe(precision, opts) if precision != "fp32" else
                             "fp32 export", "options": asdict(opts), "weight_bytes": total,
                             "bytes_read_per_token": per_token, "calibration": note, **res.to_dict()}
            results_path.write_text(json.dumps(results, indent=2) + "\n")
            print(f"{spec}: ppl {res.ppl:.4f} (fp32 {res.ppl_reference:.4f}) Δ {res.delta_ppl_pct:+.3f} % "
                  f"KL {res.mean_kl:.3e} top-1 {res.top1_agreement:.4f} weights {total / 1e6:.1f} MB", flush=True)
        del scorers
        for art, _, _ in batch.values():
            if args.discard and art != fp32:
                shutil.rmtree(art)
    print("| variant | Δ perplexity | ln PPL ratio ± se | mean KL | top-1 | weights MB |")
    print("|---|---|---|---|---|---|")
    for spec, r in results.items():
        print(f"| {spec} | {r['delta_ppl_pct']:+.2f} % | {r['ln_ppl_ratio']:.4f} ± {r['ln_ppl_ratio_se']:.4f} | "
              f"{r['mean_kl']:.2e} | {r['top1_agreement']:.4f} | {r['weight_bytes'] / 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
