#!/usr/bin/env python3
"""llama.cpp beside this project: convert a GLM-4 checkpoint to GGUF, quantize it, and measure decode speed,
perplexity and KL with llama.cpp's own tools, so its numbers can be set beside ``glm-export eval`` / ``bench``.

llama.cpp is not a dependency of the project and is not built by CI: build it once by hand (from the sources the
``llama-cpp-python`` sdist vendors, the only copy reachable from PyPI) and pass the build and source directories::

    pip download llama-cpp-python --no-deps --no-binary :all: && tar xzf llama_cpp_python-*.tar.gz
    cmake -S llama_cpp_python-*/vendor/llama.cpp -B /work/tools/llama.cpp -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON
    nice cmake --build /work/tools/llama.cpp -j2 --target llama-quantize llama-bench llama-perplexity llama-tokenize

    python scripts/llamacpp.py convert CHECKPOINT OUT.gguf --outtype f32|f16|bf16|q8_0 --src LLAMA_SRC
    python scripts/llamacpp.py quantize IN.gguf OUT.gguf Q4_0 [--allow-requantize] --build BUILD
    python scripts/llamacpp.py bench A.gguf B.gguf ... --build BUILD --threads 2 --tokens 32 --rounds 3
    python scripts/llamacpp.py ppl BASE.gguf Q.gguf ... --text heldout.txt --ctx 256 --build BUILD

``convert`` stages the checkpoint first (symlinks to its weights, a ``tokenizer.json`` made from
``tokenizer.model`` by ``glm_runtime.tokenizer``, a ``tokenizer_config.json`` without the remote-code
``auto_map``) because the converter loads the tokenizer with transformers and GLM-4's own tokenizer is remote code
that is not shipped with the checkpoints. Two converter gaps are worked around there, and each is printed when used:

- hf-layout ``GlmForCausalLM`` configs: the converter reads only the ChatGLM keys, so it would write rope base
  10000 (not ``rope_theta``), context length = hidden size and RMSNorm eps 1e-5; the staged config gets
  ``rope_ratio = rope_theta / 10000``, ``seq_length`` and ``layernorm_epsilon`` from the hf keys.
- ChatGLM-layout configs (THUDM's ``ChatGLMModel``, as the real glm-4-9b-chat ships it) have ``padded_vocab_size``
  and no ``vocab_size``; the converter's ``hparams.get("padded_vocab_size", hparams["vocab_size"])`` raises
  ``KeyError: 'vocab_size'``, so the staged config gets ``vocab_size = padded_vocab_size``.
- a tokenizer whose pre-tokenizer hash the converter does not know (the built-in stand-in tokenizer of the random
  checkpoints; the real GLM-4 one is known as ``glm4``): with ``--pre glm4`` the converter is told ``glm4`` (the
  same split regex). Speed does not depend on it; perplexity on text does, so ``ppl`` is for real tokenizers.

``ppl`` runs ``llama-perplexity`` as ``glm-export eval --score second-half`` scores: non-overlapping windows of
``--ctx`` tokens, each from an empty cache, the second half of each window scored (``ctx/2 - 1`` tokens), no BOS,
and ``--no-escape`` (else llama.cpp rewrites backslash escapes in the text before tokenizing it).
With more than one GGUF, the first is the reference: its logits are saved once (``--kl-divergence-base``, ~38 MB
per window at GLM-4's vocabulary, deleted afterwards) and every other model is compared with it
(``--kl-divergence``: Δppl, mean KL, top-1 agreement).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOOLS = ("llama-quantize", "llama-bench", "llama-perplexity")
BUILD_HINT = ("build llama.cpp first (see the docstring of scripts/llamacpp.py: cmake -S <llama.cpp sources> -B "
              "BUILD -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON && cmake --build BUILD -j2 --target {tool}) and "
              "pass its directory (--build BUILD; scripts/bench_quant.py: --llama-build BUILD)")


class LlamaCppError(RuntimeError):
    """Something the user must fix (missing build, failed tool): printed as one line, no traceback."""


def tool(build: Path, name: str) -> Path:
    """Path of a llama.cpp binary in ``build`` (``bin/NAME`` as cmake lays it out), or a one-line error."""
    for cand in (build / "bin" / name, build / name):
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    raise LlamaCppError(f"llama.cpp tool {name} not found in {build}: " + BUILD_HINT.format(tool=name))


def converter(src: Path) -> Path:
    script = src / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise LlamaCppError(f"{script} not found: pass --src <llama.cpp source directory> (vendor/llama.cpp of the "
                            "llama-cpp-python sdist)")
    return script


# ---------------------------------------------------------------------------------------------------- parsing


def parse_bench_json(text: str) -> list[dict[str, Any]]:
    """``llama-bench -o json`` output -> one row per test: model file, threads, n_prompt, n_gen, tokens/s samples.

    llama-bench prints a JSON array (one object per model x test); progress lines on stderr are not part of it.
    The per-repetition rates are ``samples_ts``; ``avg_ts`` is their mean."""
    start = text.find("[")
    if start < 0:
        raise LlamaCppError("llama-bench printed no JSON array: run it by hand with -o json to see why")
    rows = []
    for r in json.loads(text[start:]):
        samples = [float(x) for x in r.get("samples_ts") or [r["avg_ts"]]]
        rows.append({"model": r.get("model_filename", ""), "type": r.get("model_type", ""),
                     "size_bytes": int(r.get("model_size", 0)), "threads": int(r.get("n_threads", 0)),
                     "n_prompt": int(r.get("n_prompt", 0)), "n_gen": int(r.get("n_gen", 0)),
                     "tok_s": samples, "build": r.get("build_commit", "")})
    return rows


_NUM = r"(-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|-?inf)"
_PM = r"\s*(?:±|\+/-)\s*"


@dataclass
class PplResult:
    """What one ``llama-perplexity`` run printed (None where that mode does not print it)."""

    ppl: float | None = None
    ppl_err: float | None = None
    ppl_base: float | None = None
    ln_ratio: float | None = None
    ln_ratio_err: float | None = None
    kl: float | None = None
    kl_err: float | None = None
    top1: float | None = None  # fraction 0..1
    top1_err: float | None = None
    chunks: int | None = None
    n_ctx: int | None = None
    tokens: int | None = None

    @property
    def delta_ppl_pct(self) -> float | None:
        if self.ppl is None or self.ppl_base is None:
            return None
        return 100.0 * (self.ppl / self.ppl_base - 1.0)


def parse_perplexity(text: str) -> PplResult:
    """The summary lines of ``llama-perplexity`` (plain and ``--kl-divergence`` modes) -> :class:`PplResult`."""
    res = PplResult()

    def grab(pattern: str) -> tuple[float, ...] | None:
        m = re.search(pattern, text, re.MULTILINE)
        return tuple(float(g) for g in m.groups()) if m else None

    if (v := grab(r"Final estimate: PPL = " + _NUM + _PM + _NUM)) is not None:
        res.ppl, res.ppl_err = v
    if (v := grab(r"^Mean PPL\(Q\)\s*:\s*" + _NUM + _PM + _NUM)) is not None:
        res.ppl, res.ppl_err = v
    if (v := grab(r"^Mean PPL\(base\)\s*:\s*" + _NUM)) is not None:
        res.ppl_base = v[0]
    if (v := grab(r"^Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*" + _NUM + _PM + _NUM)) is not None:
        res.ln_ratio, res.ln_ratio_err = v
    if (v := grab(r"^Mean\s+KLD:\s*" + _NUM + _PM + _NUM)) is not None:
        res.kl, res.kl_err = v
    if (v := grab(r"^Same top p:\s*" + _NUM + _PM + _NUM + r"\s*%")) is not None:
        res.top1, res.top1_err = v[0] / 100.0, v[1] / 100.0
    if (m := re.search(r"(?:calculating perplexity|computing) over (\d+) chunks, n_ctx=(\d+)", text)) is not None:
        res.chunks, res.n_ctx = int(m.group(1)), int(m.group(2))
    if (m := re.search(r"have (\d+) tokens", text)) is not None:
        res.tokens = int(m.group(1))
    return res


# ---------------------------------------------------------------------------------------------------- convert


def stage_checkpoint(ckpt: Path, stage: Path) -> list[str]:
    """A directory the converter can read: symlinks to ``ckpt``'s weights, a staged config and tokenizer files.
    Returns the notes on what was changed (printed by the caller)."""
    notes: list[str] = []
    stage.mkdir(parents=True, exist_ok=True)
    for f in ckpt.iterdir():
        if f.suffix == ".safetensors" or f.name in ("model.safetensors.index.json", "generation_config.json"):
            (stage / f.name).symlink_to(f.resolve())
    cfg = json.loads((ckpt / "config.json").read_text())
    # hf-layout GlmForCausalLM: the converter reads the ChatGLM keys only (rope_ratio, seq_length,
    # layernorm_epsilon) and otherwise writes rope base 10000, context = hidden size and eps 1e-5.
    hf_keys = {"rope_ratio": ("rope_theta", lambda v: float(v) / 10000.0),
               "seq_length": ("max_position_embeddings", int), "layernorm_epsilon": ("rms_norm_eps", float)}
    if "GlmForCausalLM" in cfg.get("architectures", []):
        for key, (hf_key, fn) in hf_keys.items():
            if key not in cfg and hf_key in cfg:
                cfg[key] = fn(cfg[hf_key])
                notes.append(f"config: {key}={cfg[key]:g} added from {hf_key}={cfg[hf_key]:g} (the converter reads "
                             f"only the ChatGLM key for GlmForCausalLM)")
    if "vocab_size" not in cfg and "padded_vocab_size" in cfg:  # THUDM's own configs have only the padded one
        cfg["vocab_size"] = cfg["padded_vocab_size"]
        notes.append(f"config: vocab_size={cfg['vocab_size']} added from padded_vocab_size (the converter evaluates "
                     "hparams['vocab_size'] even when padded_vocab_size is present: KeyError)")
    (stage / "config.json").write_text(json.dumps(cfg, indent=2))
    tok_cfg_path = ckpt / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}
    tok_cfg.pop("auto_map", None)
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (stage / "tokenizer_config.json").write_text(json.dumps(tok_cfg, ensure_ascii=False, indent=2))
    if (ckpt / "tokenizer.json").is_file():
        (stage / "tokenizer.json").symlink_to((ckpt / "tokenizer.json").resolve())
    elif (ckpt / "tokenizer.model").is_file():
        from glm_runtime.tokenizer import write_tokenizer_json

        write_tokenizer_json(ckpt / "tokenizer.model", stage / "tokenizer.json")
        notes.append("tokenizer: tokenizer.json made from tokenizer.model (glm_runtime.tokenizer)")
    else:
        raise LlamaCppError(f"{ckpt} has no tokenizer.model / tokenizer.json: the converter needs the tokenizer")
    return notes


# Run by the converter's interpreter when --pre is given: the pre-tokenizer name is forced, everything else is
# the vendored converter unchanged.
_FORCE_PRE = """
import runpy, sys
sys.path[:0] = [{src!r}, {gguf!r}]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}
sys.argv = [{script!r}] + sys.argv[1:]
runpy.run_path({script!r}, run_name="__main__")
"""


def convert(ckpt: Path, out: Path, outtype: str, src: Path, pre: str | None = None, python: str = sys.executable,
            ) -> list[str]:
    """``convert_hf_to_gguf.py`` on a staged copy of ``ckpt`` -> ``out`` (written to a temp name, then renamed)."""
    script = converter(src)
    gguf_py = src / "gguf-py"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(gguf_py), os.environ.get("PYTHONPATH", "")]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with tempfile.TemporaryDirectory(prefix="gguf-stage-") as d:
        notes = stage_checkpoint(ckpt, Path(d))
        for n in notes:
            print(f"note: {n}", flush=True)
        args = [str(Path(d)), "--outtype", outtype, "--outfile", str(tmp), "--model-name", ckpt.name]
        if pre:
            cmd = [python, "-c", _FORCE_PRE.format(src=str(src), gguf=str(gguf_py), pre=pre, script=str(script))]
            notes.append(f"tokenizer: pre-tokenizer forced to {pre!r} (--pre)")
            print(f"note: {notes[-1]}", flush=True)
        else:
            cmd = [python, str(script)]
        proc = subprocess.run(cmd + args, env=env, text=True, errors="replace", capture_output=True)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            hint = (" (the tokenizer's pre-tokenizer is unknown to this converter: pass --pre glm4 if it uses "
                    "GLM-4's split regex)") if "pre-tokenizer" in (proc.stderr + proc.stdout) else ""
            raise LlamaCppError(f"convert_hf_to_gguf.py failed on {ckpt}: {tail[0]}{hint}")
    os.replace(tmp, out)
    return notes


def quantize(build: Path, src_gguf: Path, out: Path, qtype: str, allow_requantize: bool = False,
             threads: int = 2) -> None:
    cmd = [str(tool(build, "llama-quantize"))]
    if allow_requantize:
        cmd.append("--allow-requantize")
    tmp = out.with_name(out.name + ".part")
    proc = subprocess.run([*cmd, str(src_gguf), str(tmp), qtype, str(threads)], text=True, errors="replace",
                          capture_output=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise LlamaCppError(f"llama-quantize {qtype} failed on {src_gguf}: {tail[0]}")
    os.replace(tmp, out)


# ---------------------------------------------------------------------------------------------------- measure


def bench_once(build: Path, gguf: Path, threads: int, tokens: int, prompt: int = 0, reps: int = 1,
               depth: int = 0) -> dict[str, Any]:
    """One ``llama-bench`` run (its own warm-up run first): decode of ``tokens`` tokens after ``depth`` tokens of
    context (``tg`` at ``-d``), or prefill of ``prompt`` tokens (``pp``) when ``prompt`` > 0."""
    cmd = [str(tool(build, "llama-bench")), "-m", str(gguf), "-t", str(threads), "-r", str(reps), "-o", "json",
           "-d", str(depth)]
    cmd += ["-p", str(prompt), "-n", "0"] if prompt else ["-p", "0", "-n", str(tokens)]
    proc = subprocess.run(cmd, text=True, errors="replace", capture_output=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise LlamaCppError(f"llama-bench failed on {gguf}: {tail[0]}")
    rows = parse_bench_json(proc.stdout)
    if len(rows) != 1:
        raise LlamaCppError(f"llama-bench gave {len(rows)} results for one model and one test")
    return rows[0]


def perplexity(build: Path, gguf: Path, text: Path, ctx: int, threads: int, chunks: int | None = None,
               save_base: Path | None = None, kld_base: Path | None = None) -> tuple[PplResult, str]:
    # The text is data, not a prompt: no escape processing (llama-tokenize, for one, rewrites "\\n" etc. by
    # default: 16372 instead of 16384 tokens on tiny-glm's heldout.txt). ``text`` must come from
    # :func:`exact_text`: -f drops one trailing newline.
    cmd = [str(tool(build, "llama-perplexity")), "-m", str(gguf), "-f", str(text), "-c", str(ctx),
           "-t", str(threads), "-b", str(max(ctx, 512)), "--no-escape"]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    if save_base is not None:
        cmd += ["--kl-divergence-base", str(save_base)]
    if kld_base is not None:
        cmd = [c for c in cmd if c not in ("-f", str(text))]
        cmd += ["--kl-divergence-base", str(kld_base), "--kl-divergence"]
    proc = subprocess.run(cmd, text=True, errors="replace", capture_output=True)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise LlamaCppError(f"llama-perplexity failed on {gguf}: {out.strip().splitlines()[-1:]}")
    return parse_perplexity(out), out


def exact_text(text: Path, tmp_dir: Path) -> Path:
    """A copy of ``text`` that llama.cpp reads as exactly ``text``: its ``-f`` drops one trailing newline, which
    on tiny-glm's heldout.txt (16384 tokens, ending in a newline) leaves 16383 tokens, i.e. 63 windows of 256
    where ``glm-export eval`` scores 64."""
    out = tmp_dir / text.name
    out.write_bytes(text.read_bytes() + b"\n")
    return out


# ---------------------------------------------------------------------------------------------------- CLI


def _cmd_convert(a: argparse.Namespace) -> None:
    convert(a.checkpoint, a.out, a.outtype, a.src, a.pre)
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e9:.2f} GB)")


def _cmd_quantize(a: argparse.Namespace) -> None:
    quantize(a.build, a.gguf, a.out, a.type, a.allow_requantize, a.threads)
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e9:.2f} GB)")


def _cmd_bench(a: argparse.Namespace) -> None:
    samples: dict[Path, list[float]] = {g: [] for g in a.gguf}
    prefill: dict[Path, list[float]] = {}
    for r in range(a.rounds):  # interleaved rounds: the load of a shared machine changes within minutes
        for g in a.gguf:
            row = bench_once(a.build, g, a.threads, a.tokens, depth=a.depth)
            if a.prompt:
                pp = bench_once(a.build, g, a.threads, 0, prompt=a.prompt)
                prefill.setdefault(g, []).extend(pp["tok_s"])
            samples[g] += row["tok_s"]
            print(f"round {r + 1}: {g.name}: {row['tok_s'][0]:.2f} tok/s", flush=True)
    print(f"\nllama-bench, {a.threads} threads, tg{a.tokens} at depth {a.depth}"
          f"{f', pp{a.prompt}' if a.prompt else ''}, median of {a.rounds} interleaved rounds\n")
    print("| model | file | decode tok/s | prefill tok/s |\n|---|---|---|---|")
    for g, s in samples.items():
        pp = f"{statistics.median(prefill[g]):.2f}" if g in prefill else ""
        print(f"| {g.name} | {g.stat().st_size / 2**30:.2f} GiB | {statistics.median(s):.2f} | {pp} |")


def _cmd_ppl(a: argparse.Namespace) -> None:
    base, *others = a.gguf
    results: list[tuple[Path, PplResult]] = []
    with tempfile.TemporaryDirectory(prefix="kld-", dir=a.tmp) as d:
        text = exact_text(a.text, Path(d))
        if not others:
            res, _ = perplexity(a.build, base, text, a.ctx, a.threads, a.chunks)
            results.append((base, res))
        else:
            kld = Path(d) / "base.kld"
            res, _ = perplexity(a.build, base, text, a.ctx, a.threads, a.chunks, save_base=kld)
            results.append((base, res))
            print(f"{base.name}: ppl {res.ppl} ({res.chunks} windows x {res.n_ctx})", flush=True)
            for g in others:
                r, _ = perplexity(a.build, g, text, a.ctx, a.threads, a.chunks, kld_base=kld)
                results.append((g, r))
                print(f"{g.name}: ppl {r.ppl} KL {r.kl} top-1 {r.top1}", flush=True)
    print(f"\nllama-perplexity, {a.text.name}, ctx {a.ctx}, second half of each window scored, reference "
          f"{base.name}\n")
    print("| model | ppl | Δppl | ln(PPL/PPL_ref) | mean KL | top-1 |\n|---|---|---|---|---|---|")
    for g, r in results:
        if g == base:
            print(f"| {g.name} | {r.ppl:.4f} ± {r.ppl_err:.4f} | reference | | | |")
        else:
            print(f"| {g.name} | {r.ppl:.4f} | {r.delta_ppl_pct:+.3f}% | {r.ln_ratio:.5f} ± {r.ln_ratio_err:.5f} | "
                  f"{r.kl:.6f} ± {r.kl_err:.6f} | {r.top1:.4f} |")
    if a.json:
        a.json.write_text(json.dumps([{"model": str(g), **vars(r), "delta_ppl_pct": r.delta_ppl_pct}
                                      for g, r in results], indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    default_build = Path(os.environ.get("LLAMA_CPP_BUILD", "/work/tools/llama.cpp"))
    build_kw: dict[str, Any] = {"type": Path, "default": default_build,
                                "help": "llama.cpp cmake build directory ($LLAMA_CPP_BUILD)"}
    p = sub.add_parser("convert", help="checkpoint -> GGUF (convert_hf_to_gguf.py)")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--outtype", default="f32", choices=("f32", "f16", "bf16", "q8_0"))
    p.add_argument("--src", type=Path, default=Path(os.environ.get("LLAMA_CPP_SRC", "/work/tools/llama.cpp-src")),
                   help="llama.cpp source directory ($LLAMA_CPP_SRC)")
    p.add_argument("--pre", help="force the converter's pre-tokenizer name (e.g. glm4) for unknown tokenizers")
    p.set_defaults(fn=_cmd_convert)
    p = sub.add_parser("quantize", help="GGUF -> GGUF of another type (llama-quantize)")
    p.add_argument("gguf", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("type", help="Q8_0, Q4_0, Q4_K_M, ...")
    p.add_argument("--allow-requantize", action="store_true", help="source is already quantized (e.g. Q8_0)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--build", **build_kw)
    p.set_defaults(fn=_cmd_quantize)
    p = sub.add_parser("bench", help="decode tok/s of GGUFs, interleaved rounds (llama-bench tg)")
    p.add_argument("gguf", type=Path, nargs="+")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--depth", type=int, default=0, help="tokens already in the context when decoding starts")
    p.add_argument("--prompt", type=int, default=0, help="also measure prefill of this many tokens (pp)")
    p.add_argument("--build", **build_kw)
    p.set_defaults(fn=_cmd_bench)
    p = sub.add_parser("ppl", help="perplexity; with several GGUFs also KL / top-1 vs the first (llama-perplexity)")
    p.add_argument("gguf", type=Path, nargs="+", help="reference first")
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--chunks", type=int, help="at most this many windows (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tmp", type=Path, help="directory for the reference logits file (default: $TMPDIR)")
    p.add_argument("--json", type=Path)
    p.add_argument("--build", **build_kw)
    p.set_defaults(fn=_cmd_ppl)
    a = ap.parse_args(argv)
    try:
        a.fn(a)
    except LlamaCppError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
