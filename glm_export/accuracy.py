"""How much a quantized graph changes the model, measured against PyTorch fp32 on held-out text.

Held-out text is ``calibration/heldout.jsonl`` (other seed, other topics than the calibration set), rendered
through the chat template; without a tokenizer, random token ids with another seed. Per precision we report
the mean KL(fp32 || quantized) of next-token distributions, top-1 agreement, both perplexities and, from a
prompt, how many greedy tokens agree before the first divergence.

The reference pass runs first and keeps only log-probabilities, and the PyTorch model is freed before the
ONNX Runtime session opens: on a 9B-shaped model both at once would not fit next to the calibration.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glm_export import calibrate
from glm_export.progress import console


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """In float64: KL and perplexity are differences of log-probabilities near -log(vocab) ~ -12, where float32
    rounding alone (6e-8 x 12 per entry, summed over 151552 entries) would put a floor of ~1e-8 under every KL,
    different on every CPU, and hide the ~1e-12 of an exact export."""
    return torch.log_softmax(torch.from_numpy(np.asarray(x, dtype=np.float64)), -1).numpy()


def heldout_sequences(tokenizer_dir: Path | None, vocab_size: int, samples: int, seq_len: int) -> tuple[list[list[int]],
                                                                                                         str]:
    records = calibrate.load_records(str(calibrate.heldout_path()))
    asked = max(samples, calibrate.MIN_SAMPLES)
    seqs, note = calibrate.tokenize(records, tokenizer_dir, vocab_size, asked, seq_len, seed=12345)
    if "random token ids" in note:
        note = f"random token ids (no tokenizer), {seq_len} per sequence"
    else:
        note = f"calibration/heldout.jsonl through the chat template, at most {seq_len} tokens per sequence"
    return seqs[:samples], note


def _greedy_torch(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    cache = model.new_cache(1, len(prompt) + steps)  # type: ignore[operator]
    pos = torch.arange(len(prompt)).view(1, -1)
    last = torch.tensor([[len(prompt) - 1]])
    out: list[int] = []
    for step in range(steps):
        tok = int(model(ids, pos, last, *cache)[0][0, -1].argmax())
        out.append(tok)
        ids, pos, last = torch.tensor([[tok]]), torch.tensor([[len(prompt) + step]]), torch.tensor([[0]])
    return out


def cache_dtype(graph: Any) -> np.dtype:
    """The dtype the graph's cache inputs take (an int8 KV cache too, which OrtGraph does not map)."""
    kind = graph.session.get_inputs()[3].type
    return np.dtype(np.int8) if kind == "tensor(int8)" else graph.cache_dtype


def _greedy_onnx(graph: Any, cfg: Any, prompt: list[int], steps: int) -> list[int]:
    ids = np.array([prompt], np.int64)
    pos = np.arange(len(prompt), dtype=np.int64)[None]
    last = np.array([[len(prompt) - 1]], np.int64)
    shape = (1, cfg.num_kv_heads, len(prompt) + steps, cfg.head_dim)
    cache = [np.zeros(shape, cache_dtype(graph)) for _ in range(2 * cfg.num_layers)]
    out: list[int] = []
    for step in range(steps):
        logits, cache = graph.step(ids, pos, last, cache)
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        ids, pos, last = (np.array([[tok]], np.int64), np.array([[len(prompt) + step]], np.int64),
                          np.zeros((1, 1), np.int64))
    return out


@dataclass
class Reference:
    """PyTorch fp32's side of the measurement: the held-out sequences, their logits and greedy continuations."""

    seqs: list[list[int]]
    note: str
    logits: list[np.ndarray]
    greedy: list[list[int]]
    prompt_len: int
    greedy_steps: int


def reference(model: torch.nn.Module, cfg: Any, tokenizer_dir: Path | None, samples: int = 8, seq_len: int = 128,
              prompt_len: int = 32, greedy_steps: int = 32) -> Reference:
    """The reference from a float32 model already in memory: the whole-model build computes it while the model is
    loaded for calibration, so the accuracy step never loads it a second time (glm-4-9b-2layer int4: 17.7 GiB peak
    RSS when it did, the reloaded model beside what calibration and the rewrite left allocated)."""
    seqs, note = heldout_sequences(tokenizer_dir, cfg.vocab_size, samples, seq_len)
    console.print(f"accuracy reference: {len(seqs)} held-out sequences, PyTorch fp32")
    logits: list[np.ndarray] = []
    greedy: list[list[int]] = []
    with torch.no_grad():
        for seq in seqs:
            n = len(seq)
            out = model(torch.tensor([seq]), torch.arange(n).view(1, n), torch.arange(n).view(1, n),
                        *model.new_cache(1, n))[0][0].numpy()  # type: ignore[operator]
            logits.append(np.array(out, np.float32))  # float32 kept; float64 only per sequence
        for seq in seqs[:4]:
            greedy.append(_greedy_torch(model, seq[:prompt_len], greedy_steps))
    return Reference(seqs, note, logits, greedy, prompt_len, greedy_steps)


def measure(model_dir: Path, artifact: Path, tokenizer_dir: Path | None, samples: int = 8, seq_len: int = 128,
            prompt_len: int = 32, greedy_steps: int = 32, threads: int | None = None,
            streamed: bool = False, ref: Reference | None = None) -> dict[str, Any]:
    """Score held-out sequences with PyTorch fp32 and with ``artifact/model.onnx``; return the metrics.

    ``streamed``: the reference runs the checkpoint one decoder layer at a time (:mod:`glm_export.layerwise`),
    the same float32 arithmetic without the float32 model in memory. Greedy decoding needs every layer at every
    step, so it is not measured then (``greedy_matched_before_divergence`` is None and the report says why).
    ``ref``: a reference computed earlier (:func:`reference`); the other reference arguments are ignored.
    """
    from glm_export.checkpoint import Checkpoint, load_model
    from glm_export.validate import OrtGraph

    ckpt = Checkpoint(model_dir)
    cfg = ckpt.config
    if ref is None and streamed:
        from glm_export import layerwise

        seqs, note = heldout_sequences(tokenizer_dir, cfg.vocab_size, samples, seq_len)
        console.print(f"accuracy: {len(seqs)} held-out sequences, PyTorch fp32 reference, layer by layer")
        hidden = layerwise.run_layers(ckpt, [layerwise.embed(ckpt, seq) for seq in seqs])
        normed = [layerwise.final_norm(ckpt, x) for x in hidden]
        del hidden
        ref = Reference(seqs, note, [t.numpy() for t in layerwise.logits(ckpt, normed)], [], prompt_len,
                        greedy_steps)
        ckpt.release()
    elif ref is None:
        model = load_model(ckpt, torch.float32)
        ref = reference(model, cfg, tokenizer_dir, samples, seq_len, prompt_len, greedy_steps)
        del model
    seqs, note, ref_logits, ref_greedy = ref.seqs, ref.note, ref.logits, ref.greedy
    streamed = not ref_greedy  # the layer-by-layer reference cannot decode
    prompt_len, greedy_steps = ref.prompt_len, ref.greedy_steps
    gc.collect()
    graph = OrtGraph(artifact, threads=threads)
    kl: list[float] = []
    agree: list[float] = []
    nll_ref: list[float] = []
    nll_q: list[float] = []
    for seq, logits in zip(seqs, ref_logits, strict=True):
        lp = _log_softmax(logits)
        n = len(seq)
        cache = [np.zeros((1, cfg.num_kv_heads, n, cfg.head_dim), cache_dtype(graph))
                 for _ in range(2 * cfg.num_layers)]
        ar = np.arange(n, dtype=np.int64)[None]
        got, _ = graph.step(np.array([seq], np.int64), ar, ar, cache)
        lq = _log_softmax(got[0])
        kl += list((np.exp(lp) * (lp - lq)).sum(-1, dtype=np.float64))
        agree += list((lp.argmax(-1) == lq.argmax(-1)).astype(float))
        nxt = np.array(seq[1:])
        nll_ref += list(-lp[np.arange(n - 1), nxt])
        nll_q += list(-lq[np.arange(n - 1), nxt])
    matched: list[int] | None = None if streamed else []
    for seq, want in zip(seqs, ref_greedy, strict=False):
        got_tokens = _greedy_onnx(graph, cfg, seq[:prompt_len], greedy_steps)
        k = next((i for i, (a, b) in enumerate(zip(want, got_tokens, strict=True)) if a != b), len(want))
        matched.append(k)  # type: ignore[union-attr]
    return {
        "reference": "PyTorch fp32 (same checkpoint)", "heldout": note, "sequences": len(seqs),
        "positions": len(kl), "mean_kl": float(np.mean(kl)), "top1_agreement": float(np.mean(agree)),
        "ppl_reference": float(np.exp(np.mean(nll_ref))), "ppl_quantized": float(np.exp(np.mean(nll_q))),
        "greedy_prompt_tokens": prompt_len, "greedy_steps": greedy_steps, "greedy_matched_before_divergence": matched,
        **({"greedy_note": "not measured: the layer-by-layer reference cannot decode (every step needs every "
                           "layer)"} if streamed else {}),
    }


def markdown_table(acc: dict[str, Any]) -> list[str]:
    return [
        f"Accuracy against {acc['reference']} on {acc['sequences']} held-out sequences ({acc['positions']} "
        f"positions; {acc['heldout']}):", "",
        "| mean KL | top-1 agreement | perplexity fp32 | perplexity quantized "
        "| greedy tokens equal before divergence |",
        "|---|---|---|---|---|",
        f"| {acc['mean_kl']:.4g} | {acc['top1_agreement']:.3f} | {acc['ppl_reference']:.4g} | "
        f"{acc['ppl_quantized']:.4g} | {_greedy_cell(acc)} |", "",
    ]


def _greedy_cell(acc: dict[str, Any]) -> str:
    if acc.get("greedy_matched_before_divergence") is None:
        return "not measured (layer-by-layer reference)"
    return f"{acc['greedy_matched_before_divergence']} of {acc['greedy_steps']}"
