"""Train a small GLM-4-architecture model on text every machine of this kind has, and write a real checkpoint.

Why: quantization defaults chosen on random weights say little about trained ones (the logits of a random
model carry no learned structure, so an int4 output layer looks harmless). This script makes a model whose
held-out perplexity is far below the untrained one, so ``glm-export eval`` measures something real.

- Architecture: transformers' ``GlmModel`` (the same blocks as GLM-4: partial interleaved RoPE, GQA with qkv
  bias, SwiGLU, RMSNorm), the real GLM-4 vocabulary (151552 rows) and tokenizer (``../shared/glm4-reference``).
- Text (offline, deterministic order): the Python standard library's ``.py`` sources (English prose in
  docstrings and comments + code) and, where installed, the Chinese (zh_CN) gettext catalogs under
  ``/usr/share/locale`` (English msgid next to its Chinese msgstr) and vim's Chinese tutor. Files are split
  into training and held-out by a hash of their path (about 1 in 20 held out); ``heldout.txt`` is written
  beside the checkpoint, and the sha256 of both token streams goes into ``train.json``.
- Output layer: only the rows of token ids that occur in the training text are trained (a full 151552-way
  softmax would cost 5x the rest of the model per token). The other rows share one trained vector ``u``,
  and the loss is the exact full-vocabulary cross-entropy: log Z = logsumexp(seen logits, u.h + log n_unseen).
  The written ``lm_head`` therefore scores every id, as a real checkpoint does.
- Written as a real ``GlmForCausalLM`` (hf layout) checkpoint in bf16, with tokenizer files; the reported
  perplexities are of those bf16 weights computed in fp32.

Deterministic for a given machine and thread count (fixed seeds, fixed data order). Run it with ``nice``: it
uses every core it is given. ``--preset ci`` is a configuration small enough for a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import gettext
import hashlib
import json
import math
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "runtime"))

from glm_export import atomic  # noqa: E402
from glm_export.random_model import GLM4_9B, copy_tokenizer_files, hf_config  # noqa: E402
from glm_runtime.config import ModelConfig  # noqa: E402

DEFAULT_TOKENIZER = REPO.parent / "shared" / "glm4-reference" / "glm-4-9b-chat"


@dataclasses.dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    head_dim: int
    ffn: int
    steps: int
    batch: int
    seq: int
    lr: float
    train_tokens: int  # cap on the training stream (tokenizing all of it takes time too)
    heldout_tokens: int


PRESETS = {
    # Held-out ppl 956 (untrained 152522). 0.45 s a step on 2 quiet cores (AMD EPYC, a 500-step run took 235 s
    # in all), so ~13 min; 89 min at --threads 1 on a machine shared with 3 other jobs (load 7-10).
    "default": Preset(hidden=128, layers=4, heads=4, head_dim=32, ffn=344, steps=1600, batch=8, seq=256,
                      lr=6e-3, train_tokens=2_000_000, heldout_tokens=16_384),
    # A test-sized run of the same code (~1 min).
    "ci": Preset(hidden=64, layers=2, heads=4, head_dim=16, ffn=160, steps=60, batch=8, seq=128, lr=5e-3,
                 train_tokens=200_000, heldout_tokens=4096),
}


def model_config(p: Preset) -> ModelConfig:
    return dataclasses.replace(GLM4_9B, hidden_size=p.hidden, num_layers=p.layers, num_heads=p.heads,
                               num_kv_heads=2, head_dim=p.head_dim, rotary_dim=p.head_dim // 2,
                               ffn_hidden_size=p.ffn, max_position=8192, layout="hf")


def corpus_documents(include_chinese: bool = True) -> list[tuple[str, str]]:
    """(name, text) of every source document, in a fixed order."""
    docs: list[tuple[str, str]] = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3") for part in rel.split("/")):
            continue
        try:
            docs.append((f"python/{rel}", path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    if include_chinese:
        for path in sorted(Path("/usr/share/locale/zh_CN/LC_MESSAGES").glob("*.mo")):
            try:
                with open(path, "rb") as f:
                    catalog = gettext.GNUTranslations(f)._catalog  # type: ignore[attr-defined]
            except Exception:  # a malformed catalog is skipped, not fatal
                continue
            pairs = [(k, v) for k, v in catalog.items() if isinstance(k, str) and k and isinstance(v, str) and v]
            text = "\n\n".join(f"{k}\n{v}" for k, v in sorted(pairs))
            if text:
                docs.append((f"zh_CN/{path.name}", text))
        tutor = Path("/usr/share/vim").glob("vim*/tutor/tutor.zh_cn.utf-8")
        for path in sorted(tutor):
            docs.append((f"vim/{path.name}", path.read_text(encoding="utf-8", errors="replace")))
    return docs


def is_heldout(name: str) -> bool:
    return zlib.crc32(name.encode()) % 20 == 0


def load_tokenizer(directory: Path, work: Path):  # -> GLMTokenizer
    from glm_runtime.tokenizer import GLMTokenizer, write_tokenizer_json

    if (directory / "tokenizer.json").is_file():
        return GLMTokenizer.from_dir(directory)
    work.mkdir(parents=True, exist_ok=True)
    copy_tokenizer_files(directory, work)
    write_tokenizer_json(work / "tokenizer.model", work / "tokenizer.json")
    return GLMTokenizer.from_dir(work)


def token_stream(tok, docs: list[tuple[str, str]], cap: int) -> list[int]:
    """Documents joined by a blank line, as ``heldout.txt`` joins them, cut at ``cap`` tokens."""
    sep = tok.encode("\n\n")
    out: list[int] = []
    for k in range(0, len(docs), 64):
        for ids in tok.encode_batch([t for _, t in docs[k:k + 64]]):
            out += ids + sep
        if len(out) >= cap:
            break
    return out[:cap]


class TinyGLM(torch.nn.Module):
    """transformers' GlmModel + an output layer trained on the seen ids only (module docstring)."""

    def __init__(self, cfg: ModelConfig, seen: torch.Tensor) -> None:
        super().__init__()
        import transformers

        # The body's embedding has one row per seen id too (inputs are remapped to rows): a dense 151552-row
        # embedding would put 19M parameters into every optimizer step.
        body = {k: v for k, v in hf_config(cfg, "hf").items() if k not in ("architectures", "torch_dtype")}
        body.update(vocab_size=len(seen), pad_token_id=None, eos_token_id=None)
        self.body = transformers.GlmModel(transformers.GlmConfig(**body))
        self.register_buffer("seen", seen, persistent=False)
        self.head = torch.nn.Parameter(torch.randn(len(seen), cfg.hidden_size) * 0.02)
        self.unseen = torch.nn.Parameter(torch.zeros(cfg.hidden_size))
        self.log_unseen = math.log(cfg.vocab_size - len(seen))

    def loss(self, rows: torch.Tensor, target_rows: torch.Tensor) -> torch.Tensor:
        """Mean full-vocabulary cross-entropy; ``rows`` and ``target_rows`` index ``seen`` (all ids are seen)."""
        with torch.autocast("cpu", dtype=torch.bfloat16):  # 2x on CPUs with bf16 dot products; fp32 master
            h = self.body(input_ids=rows).last_hidden_state
            logits = h @ self.head.T
            other = (h @ self.unseen + self.log_unseen).unsqueeze(-1)
        return F.cross_entropy(torch.cat([logits, other], -1).flatten(0, 1).float(), target_rows.flatten())

    def full_lm_head(self, vocab: int) -> torch.Tensor:
        w = self.unseen.detach().expand(vocab, -1).clone()
        w[self.seen] = self.head.detach()
        return w


def full_state_dict(model: TinyGLM, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """hf-layout tensors over the whole vocabulary; unseen embedding rows get the mean trained row."""
    sd = {f"model.{k}": v.detach().clone() for k, v in model.body.state_dict().items()}
    trained = sd["model.embed_tokens.weight"]
    emb = trained.mean(0).expand(cfg.vocab_size, -1).clone()
    emb[model.seen] = trained
    sd["model.embed_tokens.weight"] = emb
    sd["lm_head.weight"] = model.full_lm_head(cfg.vocab_size)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}


def perplexity(model: TinyGLM, stream: list[int], seq: int, vocab: int) -> float:
    """Full-vocabulary perplexity of the model's weights rounded to bf16 (as written), computed in fp32 over
    non-overlapping windows of ``seq`` tokens, every token after a window's first scored (as glm-export eval).

    Exact and cheap in the factored form: the written output layer has the trained rows for seen ids and ``u``
    for every other one, so log Z = logsumexp(seen logits, u.h + log n_unseen); an unseen input id has the
    mean embedding row (``full_state_dict``). ``glm-export eval`` on the written checkpoint gives the same number
    through the full 151552-row layer (the test of this script checks that)."""
    import copy

    m = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        emb = m.body.embed_tokens.weight
        mean_row = emb.mean(0).to(torch.bfloat16).float()
    k = len(m.seen)
    row = torch.full((vocab,), k, dtype=torch.long)  # unseen ids -> the extra embedding row / the "other" class
    row[m.seen] = torch.arange(k)
    embed = torch.cat([emb.detach(), mean_row[None]])
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(stream) - seq + 1, seq):
            rows = row[torch.tensor(stream[s:s + seq])]
            h = m.body(inputs_embeds=embed[rows][None]).last_hidden_state[0, :-1].double()
            logits = torch.cat([h @ m.head.double().T, (h @ m.unseen.double())[:, None]], -1)
            log_z = torch.logsumexp(torch.cat([logits[:, :k], logits[:, k:] + m.log_unseen], -1), -1)
            target = rows[1:]
            nll += float((log_z - logits.gather(1, target[:, None])[:, 0]).sum())
            n += seq - 1
    return math.exp(nll / n)


def train(out: Path, preset: str, tokenizer_dir: Path, seed: int, threads: int | None, overwrite: bool,
          steps: int | None = None) -> dict:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    p = PRESETS[preset]
    if steps is not None:
        p = dataclasses.replace(p, steps=steps)
    if threads:
        torch.set_num_threads(threads)
    cfg = model_config(p)
    started = time.time()
    docs = corpus_documents()
    train_docs = [d for d in docs if not is_heldout(d[0])]
    held_docs = [d for d in docs if is_heldout(d[0])]
    # Shuffle documents (by a hash of the name) so a capped stream has both languages.
    train_docs.sort(key=lambda d: zlib.crc32(d[0].encode()))
    held_docs.sort(key=lambda d: zlib.crc32(d[0].encode()))
    tok = load_tokenizer(tokenizer_dir, out.parent / f".{out.name}.tokenizer")
    train_ids = token_stream(tok, train_docs, p.train_tokens)
    held_ids = token_stream(tok, held_docs, p.heldout_tokens)
    heldout_text = tok.decode(held_ids)
    seen = torch.tensor(sorted(set(train_ids)))
    row = torch.full((cfg.vocab_size,), -1, dtype=torch.long)
    row[seen] = torch.arange(len(seen))
    data = torch.tensor(train_ids)
    chars = sum(len(t) for _, t in train_docs)
    print(f"corpus: {len(train_docs)} training documents ({chars} characters), {len(train_ids)} tokens "
          f"({len(seen)} distinct ids); "
          f"held out {len(held_docs)} documents, {len(held_ids)} tokens", flush=True)

    torch.manual_seed(seed)
    model = TinyGLM(cfg, seen)
    untrained = perplexity(model, held_ids, p.seq, cfg.vocab_size)
    print(f"untrained held-out perplexity {untrained:.1f} ({time.time() - started:.0f} s)", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, p.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / p.steps))))
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    with Progress(TextColumn("training"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"), TimeRemainingColumn()) as bar:
        task = bar.add_task("train", total=p.steps, loss="-")
        for step in range(p.steps):
            starts = torch.randint(0, len(data) - p.seq - 1, (p.batch,), generator=gen)
            chunk = torch.stack([data[s:s + p.seq + 1] for s in starts.tolist()])
            rows = row[chunk]
            loss = model.loss(rows[:, :-1], rows[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(task, advance=1, loss=f"{losses[-1]:.3f}")
            if not sys.stderr.isatty() and (step + 1) % 10 == 0:
                print(f"step {step + 1}/{p.steps} loss {sum(losses[-10:]) / 10:.3f} "
                      f"({time.time() - started:.0f} s)", flush=True)
    sd = full_state_dict(model, cfg)
    trained = perplexity(model, held_ids, p.seq, cfg.vocab_size)
    record = {
        "preset": preset, "config": dataclasses.asdict(p), "seed": seed, "threads": torch.get_num_threads(),
        "train_tokens": len(train_ids), "distinct_train_ids": len(seen), "heldout_tokens": len(held_ids),
        "train_sha256": hashlib.sha256(data.numpy().tobytes()).hexdigest(),
        "heldout_sha256": hashlib.sha256(heldout_text.encode()).hexdigest(),
        "sources": sorted({d[0].split("/")[0] for d in docs}), "python": sys.version.split()[0],
        "ppl_untrained": untrained, "ppl_heldout_bf16_weights": trained, "eval_window": p.seq,
        "loss_first_last": [losses[0], sum(losses[-20:]) / len(losses[-20:])],
        "wall_seconds": round(time.time() - started, 1), "torch": torch.__version__,
    }
    write_checkpoint(out, cfg, sd, tokenizer_dir, heldout_text, record, overwrite)
    print(json.dumps({k: record[k] for k in ("ppl_untrained", "ppl_heldout_bf16_weights", "wall_seconds")}))
    return record


def write_checkpoint(out: Path, cfg: ModelConfig, sd: dict[str, torch.Tensor], tokenizer_dir: Path,
                     heldout_text: str, record: dict, overwrite: bool) -> None:
    from safetensors.torch import save_file

    with atomic.atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(sd, tmp / "model.safetensors", metadata={"format": "pt"})
        total = sum(v.numel() * 2 for v in sd.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict.fromkeys(sorted(sd), "model.safetensors")}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, "hf"), indent=2) + "\n")
        gen = {"eos_token_id": list(cfg.eos_token_ids), "pad_token_id": cfg.pad_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        copy_tokenizer_files(tokenizer_dir, tmp)
        (tmp / "heldout.txt").write_text(heldout_text, encoding="utf-8")
        (tmp / "train.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="checkpoint directory to write")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--steps", type=int, default=None, help="override the preset's optimizer steps")
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                    help="directory with the GLM-4 tokenizer.model (default: ../shared/glm4-reference/glm-4-9b-chat)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if not (args.tokenizer / "tokenizer.model").is_file() and not (args.tokenizer / "tokenizer.json").is_file():
        print(f"error: {args.tokenizer} has no GLM-4 tokenizer.model; pass --tokenizer DIR", file=sys.stderr)
        return 1
    train(args.out, args.preset, args.tokenizer, args.seed, args.threads, args.overwrite, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
