"""The built-in tiny tokenizer: a GLM-4-shaped tokenizer this project can ship and regenerate offline.

The real GLM-4 ``tokenizer.model`` is the publisher's data and is never committed, yet the built-in random
tiny model must work from a fresh install. This writes a stand-in with the same *shape*:

- ``tokenizer.model``: a tiktoken ranks file with exactly 151329 ranks, so GLM-4's special ids
  (151329..151342) and the 151552-row embedding stay the real ones. Ranks 0..255 are the single bytes in
  GPT-2 byte order (as in GLM-4's file); then the merges that byte-level BPE training (``tokenizers``'
  ``BpeTrainer``, GLM-4's split regex) learns on the small corpus in ``glm_export/data/``; then filler
  tokens up to rank 151328. Fillers are two existing word tokens joined at a space (" river" + " light" ->
  " river light"): each is a valid merge of two lower ranks, every one is unique, a random model's output
  made of them reads as words, and the split regex never yields a piece with a letter, a space and a
  letter, so no text ever encodes to a filler -- the encoding of real text is the trained part alone.
- ``tokenizer_config.json``: the real file's keys with a chat template written here (not GLM-4's) that
  produces GLM-4's chat format token for token; only the wording of the tools' system prompt differs.

``glm_runtime.tokenizer.write_tokenizer_json`` then converts it like the real one, which exercises that path
without the real files. Output is byte-for-byte deterministic.
"""

from __future__ import annotations

import base64
import json
from importlib import resources
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from glm_export.atomic import write_text
from glm_runtime.tokenizer import FIRST_SPECIAL_ID, GLM4_PATTERN, SPECIAL_TOKENS, bytes_to_unicode

CORPUS_FILES = ("builtin_corpus_en.txt", "builtin_corpus_zh.txt", "builtin_corpus_code.txt")
#: Size the BPE trainer aims for (bytes + merges); the small corpus supports about this many useful merges.
TRAINED_VOCAB = 6000

# Written for this project. Produces GLM-4's format: [gMASK]<sop>, then per message with content
# <|role|>{metadata}\n{content}; a message's tools as a <|system|> block before it; <|assistant|> to generate.
BUILTIN_CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for message in messages -%}"
    "{%- if message.role not in ['system', 'user', 'assistant', 'observation'] -%}"
    "{{- raise_exception('unknown role ' ~ message.role ~ ': use system, user, assistant or observation') -}}"
    "{%- endif -%}"
    "{%- if message.tools is defined and message.tools -%}"
    "<|system|>\nYou are a helpful assistant that can call tools.\n\n# Tools"
    "{%- for tool in message.tools -%}"
    "{%- if tool.type == 'function' -%}"
    "\n\n## {{ tool.function.name }}\n\n{{ tool.function | tojson(indent=4) }}\n"
    "To call it, write its name on one line and its arguments as a JSON object on the next."
    "{%- else -%}"
    "\n\n## {{ tool.type }}\n\nBuilt-in tool `{{ tool.type }}`: write its name on one line and its input "
    "on the next."
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message.content -%}"
    "<|{{ message.role }}|>{{ message.metadata if message.metadata is defined else '' }}"
    "\n{{ message.content }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def corpus_texts() -> list[str]:
    """The shipped training texts (package data, so this works from an installed wheel)."""
    data = resources.files("glm_export") / "data"
    return [(data / name).read_text(encoding="utf-8") for name in CORPUS_FILES]


def train_merges(texts: list[str], vocab_size: int = TRAINED_VOCAB) -> list[bytes]:
    """New tokens, in the order byte-level BPE training learned them (GLM-4's split regex)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(texts, trainer)
    to_byte = {ch: b for b, ch in bytes_to_unicode().items()}
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    out: list[bytes] = []
    for merge in merges:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        out.append(bytes(to_byte[c] for c in left + right))
    return out


def _is_word(token: bytes, leading_space: bool) -> bool:
    try:
        text = token.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if leading_space:
        return len(text) > 2 and text[0] == " " and text[1:].isascii() and text[1:].isalpha()
    return len(text) >= 2 and all("\u4e00" <= ch <= "\u9fff" for ch in text)


def build_ranks(texts: list[str] | None = None, n_ranks: int = FIRST_SPECIAL_ID) -> list[bytes]:
    """Token bytes by rank: 256 bytes (GPT-2 order), trained merges, then fillers up to ``n_ranks``."""
    tokens = [bytes([b]) for b in bytes_to_unicode()]
    seen = set(tokens)
    for token in train_merges(corpus_texts() if texts is None else texts):
        if token not in seen:
            tokens.append(token)
            seen.add(token)
    # Fillers: first + second, second always " english-word" (see the module docstring for why).
    seconds = [t for t in tokens if _is_word(t, leading_space=True)]
    firsts = seconds + [t for t in tokens if _is_word(t, leading_space=False)]
    if len(firsts) * len(seconds) < n_ranks:
        raise RuntimeError(f"corpus yields too few word tokens ({len(firsts)} x {len(seconds)}) for {n_ranks} ranks")
    shift = 0
    while len(tokens) < n_ranks:
        shift += 1
        for i, first in enumerate(firsts):
            filler = first + seconds[(i + shift) % len(seconds)]
            if filler not in seen:
                tokens.append(filler)
                seen.add(filler)
                if len(tokens) == n_ranks:
                    break
    return tokens


def tokenizer_config() -> dict[str, object]:
    """``tokenizer_config.json`` with the real file's keys and this project's chat template."""
    return {
        "added_tokens_decoder": {
            str(FIRST_SPECIAL_ID + i): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, token in enumerate(SPECIAL_TOKENS)
        },
        "additional_special_tokens": list(SPECIAL_TOKENS),
        "clean_up_tokenization_spaces": False,
        "chat_template": BUILTIN_CHAT_TEMPLATE,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 128000,
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_builtin_tokenizer(out_dir: Path) -> None:
    """Write ``tokenizer.model`` and ``tokenizer_config.json`` of the built-in tokenizer into ``out_dir``."""
    out_dir = Path(out_dir)
    ranks = build_ranks()
    lines = [f"{base64.b64encode(token).decode('ascii')} {rank}\n" for rank, token in enumerate(ranks)]
    write_text(out_dir / "tokenizer.model", "".join(lines))
    write_text(out_dir / "tokenizer_config.json", json.dumps(tokenizer_config(), ensure_ascii=False, indent=2) + "\n")
