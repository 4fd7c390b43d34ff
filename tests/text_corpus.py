"""A deterministic ~1 MB multilingual test corpus, generated (not stored) from a fixed seed.

Used by the tokenizer exactness tests and ``scripts/bench_tokenizer.py``. Every document mixes the things a
byte-level BPE port gets wrong: CJK and other scripts, emoji with ZWJ / skin tones / flags / keycaps, code
with tabs and ``\\r\\n``, digit runs, contractions in any case, whitespace runs (including Unicode spaces that
``\\s`` must match), very long words, random code points, and special-token text inside ordinary text.
All words below are generated or are plain dictionary words; nothing is copied from any text.
"""

from __future__ import annotations

import atexit
import random
import shutil
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

SEED = 20241105
TARGET_BYTES = 1_048_576

_EN = (
    "the of and to in is it you that he was for on are with as his they be at one have this from or "
    "had by word but what some we can out other were all there when up use your how said an each she "
    "which do their time if will way about many then them write would like so these her long make "
    "thing see him two has look more day could go come did number sound no most people my over know "
    "water than call first who may down side been now find any new work part take get place made "
    "live where after back little only round man year came show every good me give our under name "
    "very through just form sentence great think say help low line differ turn cause much mean "
    "before move right boy old too same tell does set three want air well also play small end put "
    "home read hand port large spell add even land here must big high such follow act why ask men "
    "change went light kind off need house picture try us again animal point mother world near build "
    "self earth father head stand own page should country found answer school grow study still learn "
    "plant cover food sun four between state keep eye never last let thought city tree cross farm "
    "hard start might story saw far sea draw left late run while press close night real life few "
    "north open seem together next white children begin got walk example ease paper group always "
    "music those both mark often letter until mile river car feet care second book carry took "
    "science eat room friend began idea fish mountain stop once base hear horse cut sure watch color "
    "face wood tokenizer engine quantize tensor gradient latency throughput kernel buffer cache "
    "export runtime decoder"
).split()
_EN_CONTRACTIONS = (
    "'s",
    "'t",
    "'re",
    "'ve",
    "'m",
    "'ll",
    "'d",
    "'S",
    "'T",
    "'RE",
    "'Ve",
    "'M",
    "'LL",
    "'D",
    "'x",
)
_ZH_WORDS = (
    "我们 你好 今天 天气 学习 模型 数据 计算 中文 世界 问题 时间 工作 朋友 城市 音乐 电脑 手机 程序 代码 "
    "人工智能 语言 训练 推理 速度 内存 显卡 文件 目录 测试 结果 错误 成功 失败 开始 结束 因为 所以 但是 "
    "如果 那么 可以 应该 需要 已经 正在 非常 一些 这个 那个 什么 怎么 为什么 北京 上海 长江 黄河 春天 秋天"
).split()
_ZH_PUNCT = "，。！？；：、“”‘’（）《》【】…—·"
_JA = "こんにちは ありがとう すし カタカナ ひらがな 東京 日本語 学校 先生 テスト コンピュータ ラーメン".split()
_KO = "안녕하세요 감사합니다 한국어 서울 컴퓨터 사랑 학교 음악 친구 시간".split()
_RU = "привет мир спасибо Москва компьютер язык модель данные время работа ПРОВЕРКА Ёлка".split()
_AR = "مرحبا بالعالم شكرا لغة حاسوب كتاب مدرسة سلام العربية".split()
_TH = "สวัสดี ขอบคุณ ภาษาไทย คอมพิวเตอร์ กรุงเทพ โรงเรียน น้ำ ใจ".split()
_OTHER = "नमस्ते दुनिया Γειά σου κόσμε שלום עולם Xin chào Türkçe ğüşiöç Ελλάδα ÅÄÖ ñandú".split()
_EMOJI = (
    "😀",
    "🚀",
    "❤️",
    "👍🏽",
    "👩🏿‍💻",
    "👨‍👩‍👧‍👦",
    "🏳️‍🌈",
    "🇨🇳",
    "🇺🇸",
    "1️⃣",
    "#️⃣",
    "🧑‍🤝‍🧑",
    "✅",
    "⭐",
    "🐍",
    "🤖",
    "🫠",
    "👁️‍🗨️",
    "🏴‍☠️",
    "💯",
    "©",
    "™",
    "🎉🎉🎉",
    "🙏🏻",
    "🧪",
    "\u2764\ufe0f\u200d\U0001f525",
)
_SPACES = (
    " ",
    " ",
    " ",
    "\t",
    "\n",
    "\r\n",
    "\r",
    "\u00a0",
    "\u3000",
    "\x0b",
    "\x0c",
    "\x85",
    "\u2028",
    "\u2029",
    "\u202f",
    "\u2009",
    "\u200b",
    "\ufeff",
)
_SPECIAL_TEXT = (
    "<|user|>",
    "<|assistant|>",
    "[gMASK]",
    "<sop>",
    "<|endoftext|>",
    "<|observation|>",
    "<|user",
    "|>",
    "[MASK]",
    "<|system|>\n",
    "<eop>",
)
_PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def _english(rng: random.Random, n: int) -> str:
    out: list[str] = []
    for i in range(n):
        w = rng.choice(_EN)
        r = rng.random()
        if r < 0.08:
            w = w.capitalize()
        elif r < 0.11:
            w = w.upper()
        elif r < 0.16:
            w += rng.choice(_EN_CONTRACTIONS)
        out.append(w)
        if rng.random() < 0.1:
            out.append(rng.choice((",", ".", "!", "?", ";", ":", " -", "...", ".\n", "\n\n")))
        out.append(" " if i + 1 < n else "")
    return "".join(out)


def _chinese(rng: random.Random, n: int) -> str:
    out: list[str] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.6:
            out.append(rng.choice(_ZH_WORDS))
        elif r < 0.8:
            out.append(chr(rng.randint(0x4E00, 0x9FFF)))
        elif r < 0.95:
            out.append(rng.choice(_ZH_PUNCT))
        else:
            out.append(rng.choice((" ", "\n", "GLM-4", "ONNX", "2024年", "3.14", " AI ")))
    return "".join(out)


def _code(rng: random.Random) -> str:
    name = "_".join(rng.choice(_EN) for _ in range(rng.randint(1, 3)))
    indent = rng.choice(("    ", "\t", "  ", "        "))
    n = rng.randint(0, 99999)
    kind = rng.randrange(5)
    if kind == 0:
        text = (
            f"def {name}(x: int, *args, **kwargs) -> dict[str, int]:\n"
            f'{indent}"""Return {name} for x={n}."""\n'
            f"{indent}if x >= {n} and not kwargs.get('{name}'):\n"
            f"{indent}{indent}return {{'{name}': x ** 2 // 3, \"n\": [{n}, 0x{n:X}, {n / 7:.5f}]}}\n"
            f"{indent}# TODO(dev): don't forget the edge-case   \n"
            f'{indent}raise ValueError(f"bad {{x!r}}")\n\n\n'
        )
    elif kind == 1:
        text = (
            f"function {name}(a, b) {{\n{indent}const r = a.map((v) => v * {n}).filter(Boolean);\n"
            f"{indent}return r.length === 0 ? null : `${{r[0]}}-{name}`; // ok\n}}\n"
        )
    elif kind == 2:
        text = (
            f"#include <stdio.h>\nint {name}(int *p, size_t n) {{\n{indent}for (size_t i = 0; i < n; ++i) "
            f"{{ p[i] += {n}; }}\n{indent}return p[0] != 0 && p[1] <= -1 ? 1 : 0;\n}}\n"
        )
    elif kind == 3:
        text = (
            f'{{"name": "{name}", "id": {n}, "ok": true, "tags": ["a", "b"], "nested": {{"x": -1.5e-3, '
            f'"zh": "{rng.choice(_ZH_WORDS)}"}}}}\n'
        )
    else:
        text = (
            f'<div class="{name}">\n{indent}<a href="https://example.com/{name}?q={n}&lang=zh#top">'
            f"{rng.choice(_ZH_WORDS)}</a>&nbsp;&amp;\n</div>\n"
        )
    if rng.random() < 0.3:
        text = text.replace("\n", "\r\n")
    return text


def _numbers(rng: random.Random) -> str:
    forms: list[Callable[[], str]] = [
        lambda: str(rng.randint(0, 10 ** rng.randint(1, 25))),
        lambda: f"{rng.uniform(-1e6, 1e6):.{rng.randint(0, 9)}f}",
        lambda: f"{rng.random():.3e}",
        lambda: f"{rng.randint(0, 10**9):,}",
        lambda: f"{rng.randint(1900, 2100)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        lambda: f"+86 {rng.randint(100, 199)} {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}",
        lambda: "".join(rng.choice("０１２３４５６７８９٠١٢٣٤٥٦٧٨٩①②③½²") for _ in range(rng.randint(1, 8))),
    ]
    return " ".join(rng.choice(forms)() for _ in range(rng.randint(3, 12)))


def _whitespace(rng: random.Random) -> str:
    return "".join(rng.choice(_SPACES) for _ in range(rng.randint(1, 40)))


def _long_word(rng: random.Random) -> str:
    n = rng.randint(100, 3000)
    kind = rng.randrange(7)
    if kind == 0:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCXYZ") for _ in range(n))
    if kind == 1:
        return "".join(rng.choice("0123456789") for _ in range(n))
    if kind == 2:
        return rng.choice("=-*#~_.!/ ") * n
    if kind == 3:
        return "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(n // 3))
    if kind == 4:
        return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/") for _ in range(n))
    if kind == 5:
        return "".join(rng.choice(_PUNCT) for _ in range(n // 4))
    return rng.choice(_EN) * (n // 5)


def _random_codepoints(rng: random.Random) -> str:
    out: list[str] = []
    for _ in range(rng.randint(5, 60)):
        plane = rng.random()
        if plane < 0.5:
            cp = rng.randint(0, 0xFFFF)
        elif plane < 0.8:
            cp = rng.randint(0x10000, 0x2FFFF)
        else:
            cp = rng.randint(0x30000, 0x10FFFF)
        if 0xD800 <= cp <= 0xDFFF:  # lone surrogates are tested separately (not valid text)
            cp -= 0x800
        out.append(chr(cp))
    return "".join(out)


def _other_scripts(rng: random.Random) -> str:
    words = [rng.choice(rng.choice((_JA, _KO, _RU, _AR, _TH, _OTHER))) for _ in range(rng.randint(5, 40))]
    return rng.choice((" ", "", "、", ", ")).join(words)


def _document(rng: random.Random) -> str:
    parts: list[str] = []
    makers: list[tuple[float, Callable[[], str]]] = [
        (0.22, lambda: _english(rng, rng.randint(20, 200))),
        (0.18, lambda: _chinese(rng, rng.randint(20, 200))),
        (0.14, lambda: _code(rng)),
        (0.07, lambda: _numbers(rng)),
        (
            0.07,
            lambda: "".join(rng.choice(_EMOJI) + rng.choice(("", " ", "\u200d", "\n")) for _ in range(10)),
        ),
        (0.10, lambda: _other_scripts(rng)),
        (0.08, lambda: _whitespace(rng)),
        (0.03, lambda: _long_word(rng)),
        (0.05, lambda: _random_codepoints(rng)),
        (0.06, lambda: rng.choice(_SPECIAL_TEXT)),
    ]
    weights = [w for w, _ in makers]
    for _ in range(rng.randint(3, 20)):
        make = rng.choices(makers, weights)[0][1]
        parts.append(make())
        parts.append(rng.choice(("", " ", "\n", "\n\n", "  ", "\t", "\r\n", _whitespace(rng))))
    return "".join(parts)


@lru_cache(maxsize=4)
def corpus_documents(target_bytes: int = TARGET_BYTES, seed: int = SEED) -> tuple[str, ...]:
    """Documents totalling at least ``target_bytes`` of UTF-8, the same on every run and platform."""
    rng = random.Random(seed)
    docs: list[str] = []
    total = 0
    while total < target_bytes:
        doc = _document(rng)
        docs.append(doc)
        total += len(doc.encode("utf-8"))
    return tuple(docs)


def corpus_text(target_bytes: int = TARGET_BYTES, seed: int = SEED) -> str:
    """The documents joined by blank lines: one big text for single-call encoding."""
    return "\n\n".join(corpus_documents(target_bytes, seed))


#: Strings that are not valid Unicode text (lone / split surrogates) plus short tricky cases; tiktoken defines
#: what happens to them.
EDGE_CASES: tuple[str, ...] = (
    "",
    " ",
    "\ud800",
    "a\udfffb",
    "\ud83d\ude00",  # a surrogate pair written as two code units: becomes one emoji
    "x\ud83dy\ude00z",
    "\udc80\udc81 abc",
    "'s",
    "'S'T'RE's",
    "don't DON'T Don'T",
    "\r\n\r\n\r\n",
    "  \n  \n",
    "a  \n  b",
    "\t\t\tx",
    "x   ",
    "x   \n",
    "   ",
    "\n",
    "\u3000\u3000测试",
    "🏳️‍🌈🏳️‍🌈",
    "<|user|><|user|>",
    "<|endoftext|>",
    "1234567",
    "١٢٣٤٥",
)


# --- shared by the tokenizer tests and the benchmark: built once per process -------------------------------

GLM4_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)  # transcribed from the GLM-4 docs, not imported from the code under test
GLM4_SPECIALS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)


@lru_cache(maxsize=4)
def tiktoken_reference(tokenizer_model: Path) -> Any:
    """The independent oracle: tiktoken built from the same ranks file with GLM-4's regex and special ids."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(tokenizer_model))
    specials = {token: 151329 + i for i, token in enumerate(GLM4_SPECIALS)}
    return tiktoken.Encoding(
        Path(tokenizer_model).stem, pat_str=GLM4_REGEX, mergeable_ranks=ranks, special_tokens=specials
    )


_TEMP_DIRS: list[str] = []
atexit.register(lambda: [shutil.rmtree(d, ignore_errors=True) for d in _TEMP_DIRS])


def scratch_dir(prefix: str) -> Path:
    """A temporary directory removed at interpreter exit (outlives a single test module)."""
    path = tempfile.mkdtemp(prefix=prefix)
    _TEMP_DIRS.append(path)
    return Path(path)


@lru_cache(maxsize=4)
def converted_tokenizer_dir(model_dir: Path) -> Path:
    """``tokenizer.json`` converted from ``model_dir/tokenizer.model`` plus that dir's tokenizer_config.json,
    in a scratch directory (conversion takes seconds: done once per process)."""
    from glm_runtime.tokenizer import write_tokenizer_json

    out = scratch_dir("glm-tok-")
    write_tokenizer_json(Path(model_dir) / "tokenizer.model", out / "tokenizer.json")
    if (Path(model_dir) / "tokenizer_config.json").is_file():
        shutil.copyfile(Path(model_dir) / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


@lru_cache(maxsize=1)
def builtin_raw_dir() -> Path:
    """The built-in tokenizer's ``tokenizer.model`` + ``tokenizer_config.json``, written once per process."""
    from glm_export.builtin_tokenizer import write_builtin_tokenizer

    raw = scratch_dir("glm-builtin-")
    write_builtin_tokenizer(raw)
    return raw


def builtin_tokenizer_dir() -> Path:
    """The built-in tokenizer converted to ``tokenizer.json`` (with its config), once per process."""
    return converted_tokenizer_dir(builtin_raw_dir())
