"""One side of ``glm-export bench`` in a process of its own: ``python -m glm_export.bench.worker JOB.json``.

Why a process per side and round: peak RSS is then that side's alone, two multi-GB models never share the
machine's RAM, and every round starts cold the same way for every side. The job (JSON) names the side:

- ``torch``: transformers' ``GlmForCausalLM`` as a model-card user runs it (eager, the checkpoint's dtype on
  GPU, fp32 or bf16 on CPU, optionally ``torch.compile``); a chatglm-layout checkpoint is renamed through
  :data:`glm_export.checkpoint.LAYOUTS` (the one name table of this project).
- ``runtime``: ``glm_runtime.load(artifact)``, i.e. the engine a user of the artifact gets.
- ``bandwidth``: the read-bandwidth probes of :mod:`glm_export.bench.roofline`.
- ``profile``: one profiled generation of an artifact (:mod:`glm_export.bench.profiling`).

Both model sides time the same thing the same way: per case (batch, prompt length) ``warmup`` untimed runs,
then one timed greedy run of ``new_tokens`` tokens with stop ids ignored, timestamps taken when the first and
the last token exist. When the job carries ``reference`` tokens (the PyTorch side's, from this run), the
first warm-up output is compared with them before anything is timed; a ``strict`` side that differs is not
timed at all. The result (JSON) goes to ``job["result"]``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Tokens = list[list[int]]


# ---- shared with the orchestrator ------------------------------------------------------------------------
def prompt_ids(batch: int, prompt_len: int, vocab_size: int, seed: int) -> Tokens:
    """Random prompt ids, the same for every side (seeded by the case). Below the special tokens' range."""
    import numpy as np

    rng = np.random.default_rng([seed, batch, prompt_len])
    high = min(vocab_size, 151329)  # GLM-4's special tokens start at 151329: keep prompts ordinary text ids
    return rng.integers(0, high, (batch, prompt_len)).tolist()


def match_length(reference: Sequence[int], tokens: Sequence[int]) -> int:
    """How many leading tokens agree."""
    n = 0
    for a, b in zip(reference, tokens, strict=False):
        if a != b:
            break
        n += 1
    return n


def case_key(batch: int, prompt_len: int) -> str:
    return f"b{batch}_p{prompt_len}"


# ---- memory ----------------------------------------------------------------------------------------------
def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux ``clear_refs`` 5), so a case's peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS. ``VmHWM``, not ``ru_maxrss``: Linux carries ru_maxrss over from the parent across fork +
    exec, which would credit a worker with the orchestrator's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- a run -----------------------------------------------------------------------------------------------
def sample(start: float, first: float, end: float, batch: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
    """The metrics of one run from three timestamps. Decode covers the ``new_tokens - 1`` steps after the first
    token (the first token comes out of the prefill)."""
    steps = new_tokens - 1
    decode_s = end - first
    return {
        "ttft_s": first - start,
        "e2e_s": end - start,
        "tpot_s": decode_s / steps if steps else 0.0,
        "decode_tok_s": batch * steps / decode_s if steps and decode_s > 0 else 0.0,
        "prefill_tok_s": batch * prompt_len / (first - start),
    }


def run_cases(job: dict[str, Any], generate: Callable[[Tokens, int], tuple[float, float, float, Tokens]],
              gpu_peak: Callable[[], int | None], extra: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Warm-up, check against the reference, then one timed run per case.

    ``gpu_peak()`` returns the GPU memory peak since its previous call (``None`` without a GPU) and starts a new
    one; ``extra()`` adds side-specific values to the timed run's sample.
    """
    cases: dict[str, Any] = {}
    reference = job.get("reference") or {}
    for batch, prompt_len in job["cases"]:
        key = case_key(batch, prompt_len)
        prompts = prompt_ids(batch, prompt_len, job["vocab_size"], job["seed"])
        n = job["new_tokens"]
        out: dict[str, Any] = {}
        first_tokens = None
        for _ in range(job["warmup"]):
            *_, tokens = generate(prompts, n)
            first_tokens = first_tokens or tokens
        if key in reference:
            if first_tokens is None:  # no warm-up asked: one untimed run to check before timing anyway
                *_, first_tokens = generate(prompts, n)
            k = job["check_tokens"]
            matched = [match_length(r[:k], t[:k]) for r, t in zip(reference[key], first_tokens, strict=True)]
            out["check"] = {"compared": min(k, n), "matched": min(matched), "per_row": matched}
            if job["strict"] and min(matched) < min(k, n):
                out["check"]["skipped_timing"] = True
                cases[key] = out
                continue
        gpu_peak()  # resets the GPU peak (where there is one), so the case's peak is its timed run's
        reset_peak_rss()
        start, first, end, tokens = generate(prompts, n)
        out["sample"] = sample(start, first, end, batch, prompt_len, n)
        out["sample"]["peak_rss_bytes"] = peak_rss_bytes()
        gpu = gpu_peak()
        if gpu is not None:
            out["sample"]["peak_gpu_bytes"] = gpu
        out["sample"].update(extra())
        out["tokens"] = tokens if first_tokens is None else first_tokens
        cases[key] = out
    return cases


# ---- the runtime side ------------------------------------------------------------------------------------
def runtime_side(job: dict[str, Any]) -> dict[str, Any]:
    from glm_runtime import load

    t0 = time.perf_counter()
    llm = load(job["artifact"], threads=job["threads"], verify="size", log_severity=3)
    load_s = time.perf_counter() - t0
    if hasattr(llm.engine, "settle"):  # int4 weights onto huge pages (background, after loading): steady state next
        llm.engine.settle()
    last: dict[str, Any] = {}

    def generate(prompts: Tokens, n: int) -> tuple[float, float, float, Tokens]:
        outputs: list[list[int]] = [[] for _ in prompts]
        first = None
        start = time.perf_counter()
        for chunk in llm.generate(prompt_ids=prompts, max_new_tokens=n, temperature=0, stop_token_ids=(),
                                  stream=True):
            if first is None:
                first = time.perf_counter()
            outputs[chunk.index] += chunk.token_ids
            if chunk.completion is not None:
                last["timings"] = chunk.completion.timings
        end = time.perf_counter()
        assert first is not None
        return start, first, end, outputs

    def extra() -> dict[str, Any]:
        return {"overhead_fraction": last["timings"]["overhead_fraction"]}

    cases = run_cases(job, generate, lambda: _gpu_memory_of_this_process(), extra)
    return {"load_s": load_s, "engine": llm.engine.describe(), "cases": cases}


def _gpu_memory_of_this_process() -> int | None:
    """GPU memory this process holds now (nvidia-smi; not a peak: ORT/TensorRT expose none), or None."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return int(mib) * 2**20
    return None


# ---- the PyTorch side ------------------------------------------------------------------------------------
def hf_model(checkpoint: Path, dtype: Any, attn: str) -> Any:
    """transformers' ``GlmForCausalLM`` on the checkpoint's weights, whichever layout it is stored in."""
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    from glm_export.checkpoint import Checkpoint, source_parts
    from glm_export.random_model import hf_config

    ckpt = Checkpoint(checkpoint)
    if ckpt.layout == "hf":
        return GlmForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation=attn).eval()
    cfg = ckpt.config
    hf = {k: v for k, v in hf_config(cfg, "hf").items() if k not in ("model_type", "architectures", "torch_dtype")}
    config = GlmConfig(**hf, attn_implementation=attn)
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    state = {}
    for canonical in ckpt.canonical_names():  # the rows of a fused tensor, split under the hf names
        tensor, offset = ckpt.tensor(canonical, dtype), 0
        for name, shape in source_parts(cfg, "hf", canonical):
            state[name] = tensor[offset:offset + shape[0]]
            offset += shape[0]
    model.load_state_dict(state, assign=True, strict=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffer was on meta
    return model.eval()


def torch_side(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(job["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, job["torch_dtype"])
    t0 = time.perf_counter()
    model = hf_model(Path(job["model"]), dtype, job["attn"]).to(device)
    gc = model.generation_config
    gc.eos_token_id = None  # decode every token: no stop ids (and no suppression of them, unlike min_new_tokens)
    gc.pad_token_id, gc.do_sample, gc.temperature, gc.top_p, gc.top_k = 0, False, None, None, None
    if job["compile"]:
        gc.cache_implementation = "static"
        model.forward = torch.compile(model.forward)
    load_s = time.perf_counter() - t0

    class Clock(BaseStreamer):
        """generate() calls put() with the prompt, then once per step: timestamp the first and last token."""

        def __init__(self) -> None:
            self.calls = 0
            self.first = self.last = 0.0

        def put(self, value: torch.Tensor) -> None:
            self.calls += 1
            self.last = time.perf_counter()
            if self.calls == 2:
                self.first = self.last

        def end(self) -> None:
            pass

    def generate(prompts: Tokens, n: int) -> tuple[float, float, float, Tokens]:
        ids = torch.tensor(prompts, device=device)
        clock = Clock()
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=0,
                                 streamer=clock)
            if device == "cuda":
                torch.cuda.synchronize()
            end = time.perf_counter()
        return start, clock.first, end, out[:, ids.shape[1]:].tolist()

    def gpu_peak() -> int | None:
        if device != "cuda":
            return None
        peak = int(torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        return peak

    cases = run_cases(job, generate, gpu_peak, dict)
    engine = (f"transformers {transformers.__version__} GlmForCausalLM {job['torch_dtype']} {job['attn']}"
              f"{' + torch.compile' if job['compile'] else ''}, torch {torch.__version__} on {device}")
    return {"load_s": load_s, "engine": engine, "cases": cases}


def bandwidth_side(job: dict[str, Any]) -> dict[str, Any]:
    from glm_export.bench.roofline import measure_bandwidth

    return {"bandwidth": measure_bandwidth(job["threads"], job.get("probe_gib", 1.0))}


def profile_side(job: dict[str, Any]) -> dict[str, Any]:
    from glm_export.bench.profiling import profile_side as profile

    return profile(job)


SIDES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "torch": torch_side, "runtime": runtime_side, "bandwidth": bandwidth_side, "profile": profile_side}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m glm_export.bench.worker JOB.json  (started by glm-export bench)")
    job = json.loads(Path(args[0]).read_text())
    result = SIDES[job["kind"]](job)
    result["peak_rss_bytes"] = peak_rss_bytes()
    tmp = Path(job["result"] + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(job["result"])


if __name__ == "__main__":
    main()
