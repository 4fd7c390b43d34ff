"""Our PyTorch GLM-4 against transformers' GlmForCausalLM, the independent oracle.

transformers reads our hf-layout checkpoint with ``from_pretrained`` (so its config.json parsing and name
mapping are checked too); our model reads the same weights. Prefill 16 tokens, then 16 single-token decode
steps with the cache, fp32, max abs logit difference within the float32 rounding bound of numerics.py
(about 1e-4 x the largest logit for these sizes; seen: ~1e-6).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from glm_export import numerics
from glm_export.checkpoint import load_model
from glm_export.random_model import PRESETS, write_random_model
from tests.conftest import TEST_STD

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

# Real GLM-4 head geometry (head_dim 128, 2 groups, rotary 64, rope_ratio 500), small otherwise.
HEAD128 = dataclasses.replace(PRESETS["tiny"], hidden_size=512, num_heads=4, num_kv_heads=2, head_dim=128,
                              rotary_dim=64, ffn_hidden_size=1024, vocab_size=4096, max_position=8192,
                              pad_token_id=0, eos_token_ids=(1,))
PROMPT, DECODE = 16, 16


def tol(model: torch.nn.Module, ref: torch.Tensor, context: int) -> float:
    """What float32 rounding allows between two eager implementations summing in different orders."""
    return numerics.fp32_logit_bound(model.cfg, context, float(ref.abs().max()))


@pytest.fixture(scope="module")
def head128_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("ckpt") / "head128", HEAD128, "hf", seed=2, std=TEST_STD,
                              builtin_tokenizer=False)


def oracle(ckpt: Path) -> torch.nn.Module:
    model = transformers.GlmForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def oracle_logits(model: torch.nn.Module, prompt: list[int], decode: list[int], start: int) -> torch.Tensor:
    """Last-position logits after the prompt and after each decode token: [1 + len(decode), vocab]."""
    ids = torch.tensor([prompt])
    pos = torch.arange(start, start + len(prompt)).unsqueeze(0)
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=pos, use_cache=True)
        rows, past = [out.logits[0, -1]], out.past_key_values
        for i, tok in enumerate(decode):
            p = torch.tensor([[start + len(prompt) + i]])
            out = model(input_ids=torch.tensor([[tok]]), position_ids=p, past_key_values=past, use_cache=True)
            rows.append(out.logits[0, -1])
            past = out.past_key_values
    return torch.stack(rows)


def ours_logits(model: torch.nn.Module, prompts: list[list[int]], decodes: list[list[int]], start: int) -> torch.Tensor:
    """Same as :func:`oracle_logits` for a right-padded batch: [batch, 1 + steps, vocab]."""
    b, longest = len(prompts), max(map(len, prompts))
    ids = torch.zeros(b, longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    pos = start + torch.arange(longest).expand(b, longest)
    last = torch.tensor([[len(p) - 1] for p in prompts])
    cache = model.new_cache(b, start + longest + len(decodes[0]))
    with torch.no_grad():
        rows = [model(ids, pos, last, *cache)[0][:, 0]]
        for step in range(len(decodes[0])):
            tok = torch.tensor([[d[step]] for d in decodes])
            p = torch.tensor([[start + len(pr) + step] for pr in prompts])
            rows.append(model(tok, p, torch.zeros(b, 1, dtype=torch.long), *cache)[0][:, 0])
    return torch.stack(rows, dim=1)


def random_tokens(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("which", ["tiny", "head128"])
def test_matches_transformers_batch1_and_batch3(request: pytest.FixtureRequest, which: str) -> None:
    start = 0
    ckpt = request.getfixturevalue("tiny_checkpoint_hf" if which == "tiny" else "head128_checkpoint")
    ref_model, our_model = oracle(ckpt), load_model(ckpt, torch.float32)
    vocab = our_model.cfg.vocab_size
    lengths = [PROMPT, 9, 13]
    prompts = [random_tokens(n, vocab, seed=10 + i) for i, n in enumerate(lengths)]
    decodes = [random_tokens(DECODE, vocab, seed=20 + i) for i in range(3)]

    ours = ours_logits(our_model, prompts, decodes, start)
    worst, bound = 0.0, float("inf")
    for i in range(3):
        ref = oracle_logits(ref_model, prompts[i], decodes[i], start)
        assert ref.abs().max() > 0.5, "logits too small for the tolerance to mean anything"
        bound = min(bound, tol(our_model, ref, PROMPT + DECODE))
        worst = max(worst, (ours[i] - ref).abs().max().item())
        if i == 0:  # batch 1 on its own too
            alone = ours_logits(our_model, prompts[:1], decodes[:1], start)[0]
            assert (alone - ref).abs().max().item() <= bound
    assert worst <= bound, f"max abs diff {worst:.3g} > {bound:.3g}"


@pytest.mark.parametrize("which", ["tiny", "head128"])
def test_matches_transformers_long_prompt(request: pytest.FixtureRequest, which: str) -> None:
    """A 2500-token prompt: where a wrong rope base or rotation layout shows most."""
    ckpt = request.getfixturevalue("tiny_checkpoint_hf" if which == "tiny" else "head128_checkpoint")
    ref_model, our_model = oracle(ckpt), load_model(ckpt, torch.float32)
    prompt, decode = random_tokens(2500, our_model.cfg.vocab_size, 7), random_tokens(4, our_model.cfg.vocab_size, 8)
    ref = oracle_logits(ref_model, prompt, decode, 0)
    diff = (ours_logits(our_model, [prompt], [decode], 0)[0] - ref).abs().max()
    assert diff.item() <= tol(our_model, ref, 2504)


def test_rope_ratio_matters(head128_checkpoint: Path) -> None:
    """The test above can fail: the same weights with GLM's rope_ratio dropped (base 10000) differ."""
    model = load_model(head128_checkpoint, torch.float32)
    prompt = [random_tokens(PROMPT, 4096, seed=1)]
    decode = [random_tokens(4, 4096, seed=2)]
    good = ours_logits(model, prompt, decode, 0)
    model.inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    assert (ours_logits(model, prompt, decode, 0) - good).abs().max() > 100 * tol(model, good, PROMPT + 4)


def test_layouts_give_identical_logits(tiny_checkpoint: Path, tiny_checkpoint_hf: Path) -> None:
    a, b = load_model(tiny_checkpoint), load_model(tiny_checkpoint_hf)
    prompt, decode = [random_tokens(PROMPT, 151552, 3)], [random_tokens(4, 151552, 4)]
    assert torch.equal(ours_logits(a, prompt, decode, 0), ours_logits(b, prompt, decode, 0))


@pytest.mark.parametrize("dtype,unit", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
def test_half_precisions_run_close_to_fp32(tiny_checkpoint: Path, dtype: torch.dtype, unit: float) -> None:
    prompts, decodes = [random_tokens(PROMPT, 151552, 5)], [random_tokens(4, 151552, 6)]
    ref = ours_logits(load_model(tiny_checkpoint, torch.float32), prompts, decodes, 0)
    half = ours_logits(load_model(tiny_checkpoint, dtype), prompts, decodes, 0)
    assert half.dtype == torch.float32  # logits always come out in fp32
    bound = numerics.half_logit_bound(load_model(tiny_checkpoint).cfg, unit, float(ref.abs().max()))
    assert (half - ref).abs().max().item() < bound < float(ref.abs().max())  # the bound is smaller than the logits
