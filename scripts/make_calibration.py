#!/usr/bin/env python3
"""Write the project's own calibration set (``calibration/default.jsonl``) and held-out set (``heldout.jsonl``).

Every sentence is composed here from small hand-written phrase tables with a seeded generator, so the output
is original, reproducible byte for byte, and small (< 1 MB), yet covers what activation statistics must see:
English and Chinese chat, code, math with worked steps, long documents (> 2K tokens), multi-turn dialogue and
tool calls with observations (GLM-4 message format: ``metadata`` names the tool, ``observation`` answers).

The held-out set is drawn with a different seed *and* from disjoint halves of the topic tables, so accuracy
measured on it is not measured on calibration text.

    python scripts/make_calibration.py            # rewrite both files
    python scripts/make_calibration.py --check    # exit 1 if the committed files are stale
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "calibration"

TOPICS_EN = [
    "river ecology", "bread baking", "bicycle repair", "solar panels", "tea cultivation", "glacier retreat",
    "urban gardening", "container shipping", "bird migration", "violin making", "desert irrigation",
    "railway signalling", "coral reefs", "paper recycling", "mountain weather", "ceramic glazes",
    "wind turbines", "beekeeping", "library cataloguing", "volcanic soils", "sourdough starters",
    "lighthouse keeping", "rice terraces", "tidal power", "wool dyeing", "subway ventilation",
    "orchard pruning", "map projections", "compost heaps", "satellite orbits", "bridge inspection",
    "cheese ripening",
]
TOPICS_ZH = [
    "城市绿化", "茶叶种植", "高铁调度", "古籍修复", "湿地保护", "面点制作", "风力发电", "候鸟迁徙",
    "陶瓷烧制", "梯田灌溉", "地铁通风", "果园管理", "纸张回收", "桥梁检测", "海洋牧场", "书法练习",
    "社区养老", "山区气象", "丝绸织造", "电池回收", "农村电商", "港口物流", "森林防火", "中药炮制",
    "天文观测", "水库调度", "古建测绘", "蜂蜜采集", "盐田晒盐", "冰川监测", "竹编工艺", "快递分拣",
]
SUBJ_EN = ["Most practitioners", "A careful beginner", "The local cooperative", "Our small team",
           "An experienced engineer", "The city council", "A visiting researcher", "Many hobbyists"]
VERB_EN = ["tends to underestimate", "spends a surprising amount of time on", "keeps detailed notes about",
           "argues endlessly about", "learns the most from", "often overlooks", "plans the whole season around",
           "measures twice before changing"]
OBJ_EN = ["the first week of work", "small daily adjustments", "the cost of spare parts", "seasonal changes",
          "the quality of raw materials", "unexpected failures", "the opinions of neighbours",
          "long-term maintenance"]
TAIL_EN = ["because mistakes there are expensive to undo.", "since nothing else depends on it so directly.",
           "and the results usually show within a month.", "which is why the manuals repeat it so often.",
           "even when the budget is tight.", "although few people talk about it openly.",
           "so a written checklist helps.", "and that habit pays off over the years."]
SUBJ_ZH = ["许多从业者", "刚入门的人", "当地合作社", "我们的小团队", "经验丰富的工程师", "街道办事处",
           "来访的研究员", "不少爱好者"]
VERB_ZH = ["往往低估了", "花了很多时间研究", "详细记录了", "经常讨论", "最看重", "容易忽视",
           "围绕着安排", "反复测量"]
OBJ_ZH = ["第一周的准备工作", "每天的小调整", "备件的成本", "季节的变化", "原材料的质量", "意外的故障",
          "邻居的意见", "长期的维护"]
TAIL_ZH = ["，因为这里出错代价很高。", "，毕竟别的环节都依赖它。", "，效果通常一个月内就能看到。",
           "，所以手册里反复强调。", "，即使预算很紧张也是如此。", "，虽然很少有人公开谈论。",
           "，因此一份书面清单很有帮助。", "，这个习惯多年后会有回报。"]
ASK_EN = ["Can you explain the basics of {t}?", "What should I know before starting with {t}?",
          "Give me three practical tips about {t}.", "Why do people find {t} difficult?",
          "Write a short paragraph about {t} for a school newsletter.", "Compare two approaches to {t}."]
ASK_ZH = ["请介绍一下{t}的基本知识。", "开始做{t}之前需要了解什么？", "关于{t}，给我三条实用建议。",
          "为什么很多人觉得{t}很难？", "为社区简报写一段关于{t}的短文。", "比较一下{t}的两种做法。"]
FUNCS = [("get_weather", "Current weather for a city", {"city": "string", "unit": "string"}),
         ("search_flights", "Find flights between two airports on a date",
          {"origin": "string", "destination": "string", "date": "string"}),
         ("convert_currency", "Convert an amount between currencies",
          {"amount": "number", "from": "string", "to": "string"}),
         ("lookup_stock", "Latest price of a stock ticker", {"ticker": "string"}),
         ("create_event", "Add an event to the calendar", {"title": "string", "start": "string", "minutes": "integer"}),
         ("query_library", "Search the library catalogue", {"keywords": "string", "limit": "integer"})]
CITIES = ["北京", "上海", "Chengdu", "Hangzhou", "Lisbon", "Nairobi", "Oslo", "Lima", "深圳", "Kyoto"]


def sentence_en(r: random.Random, topic: str) -> str:
    return f"In {topic}, {r.choice(SUBJ_EN).lower()} {r.choice(VERB_EN)} {r.choice(OBJ_EN)}, {r.choice(TAIL_EN)}"


def sentence_zh(r: random.Random, topic: str) -> str:
    return f"在{topic}方面，{r.choice(SUBJ_ZH)}{r.choice(VERB_ZH)}{r.choice(OBJ_ZH)}{r.choice(TAIL_ZH)}"


def paragraph(r: random.Random, topic: str, zh: bool, n: int) -> str:
    make = sentence_zh if zh else sentence_en
    return ("" if zh else " ").join(make(r, topic) for _ in range(n))


def chat(r: random.Random, topics: list[str], zh: bool) -> dict[str, Any]:
    t = r.choice(topics)
    ask = r.choice(ASK_ZH if zh else ASK_EN).format(t=t)
    msgs = [{"role": "user", "content": ask}, {"role": "assistant", "content": paragraph(r, t, zh, r.randint(2, 6))}]
    if r.random() < 0.3:
        system = "你是一个乐于助人的助手。" if zh else "You are a concise assistant."
        msgs.insert(0, {"role": "system", "content": system})
    return {"kind": "chat_zh" if zh else "chat_en", "messages": msgs}


def code_sample(r: random.Random) -> dict[str, Any]:
    name = r.choice(["totals", "scores", "prices", "lengths", "counts", "weights"])
    k = r.randint(2, 9)
    snippets = [
        f"def moving_average({name}: list[float], window: int = {k}) -> list[float]:\n"
        f"    \"\"\"Average of each run of `window` consecutive values.\"\"\"\n"
        f"    out = []\n    acc = sum({name}[:window])\n    out.append(acc / window)\n"
        f"    for i in range(window, len({name})):\n        acc += {name}[i] - {name}[i - window]\n"
        f"        out.append(acc / window)\n    return out\n",
        f"class Counter{k}:\n    def __init__(self) -> None:\n        self.{name}: dict[str, int] = {{}}\n\n"
        f"    def add(self, key: str) -> None:\n        self.{name}[key] = self.{name}.get(key, 0) + {k}\n\n"
        f"    def top(self, n: int = 3) -> list[tuple[str, int]]:\n"
        f"        return sorted(self.{name}.items(), key=lambda kv: -kv[1])[:n]\n",
        f"function chunk(arr, size = {k}) {{\n  const out = [];\n  for (let i = 0; i < arr.length; i += size) {{\n"
        f"    out.push(arr.slice(i, i + size));\n  }}\n  return out;\n}}\n"
        f"console.log(chunk([{', '.join(map(str, range(k + 3)))}]));\n",
        f"SELECT region, COUNT(*) AS n, AVG({name[:-1]}) AS mean_{name[:-1]}\nFROM orders\n"
        f"WHERE created_at >= DATE '2024-0{r.randint(1, 9)}-01'\nGROUP BY region\nHAVING COUNT(*) > {k * 10}\n"
        f"ORDER BY n DESC;\n",
        f"#include <stdio.h>\n\nint main(void) {{\n    long {name}[{k}] = {{0}};\n"
        f"    for (int i = 0; i < {k}; ++i) {name}[i] = (long)i * i + {k};\n"
        f"    for (int i = 0; i < {k}; ++i) printf(\"%ld\\n\", {name}[i]);\n    return 0;\n}}\n",
    ]
    code = r.choice(snippets)
    ask = r.choice(["Explain what this code does:", "Find a bug or an edge case in this code:",
                    "这段代码是做什么的？", "Add type hints and tests for this:"])
    answer = r.choice(["It walks the input once and keeps a running state, so it is linear in the input size. "
                       "An empty input is the edge case to guard.",
                       "这段代码只遍历一次输入，时间复杂度是线性的；需要注意输入为空的情况。",
                       "The logic is correct for ordinary input; check the boundary where the size is smaller "
                       "than the window."])
    return {"kind": "code", "messages": [{"role": "user", "content": f"{ask}\n```\n{code}```"},
                                         {"role": "assistant", "content": answer}]}


def math_sample(r: random.Random) -> dict[str, Any]:
    a, b, c = r.randint(2, 19), r.randint(1, 99), r.randint(100, 999)
    x = (c - b) / a
    if r.random() < 0.5:
        q = f"Solve for x: {a}x + {b} = {c}."
        ans = (f"Subtract {b} from both sides: {a}x = {c - b}. Divide by {a}: x = {c - b}/{a} = {x:.4g}. "
               f"Check: {a} * {x:.4g} + {b} = {a * x + b:.4g}.")
    else:
        q = f"一个仓库有{c}箱货物，每天运走{a}箱，又运进{b % 10}箱。多少天后少于{b}箱？"
        per = a - b % 10
        days = 0 if c < b else (c - b) // per + 1 if per > 0 else -1
        ans = (f"每天净减少{per}箱。需要满足 {c} - {per}·n < {b}，即 n > {(c - b) / per:.3g}，所以至少{days}天。"
               if per > 0 else "每天净增加或不变，所以永远不会少于这个数。")
    return {"kind": "math", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]}


def multi_turn(r: random.Random, topics: list[str]) -> dict[str, Any]:
    zh = r.random() < 0.5
    t = r.choice(topics)
    msgs: list[dict[str, Any]] = []
    for _ in range(r.randint(3, 5)):
        msgs.append({"role": "user", "content": r.choice(ASK_ZH if zh else ASK_EN).format(t=t)})
        msgs.append({"role": "assistant", "content": paragraph(r, t, zh, r.randint(1, 3))})
        if r.random() < 0.3:
            zh = not zh  # users switch language mid-conversation
    return {"kind": "multi_turn", "messages": msgs}


def tool_sample(r: random.Random) -> dict[str, Any]:
    chosen = r.sample(FUNCS, r.randint(1, 3))
    tools = [{"type": "function", "function": {
        "name": n, "description": d,
        "parameters": {"type": "object", "properties": {k: {"type": v} for k, v in p.items()},
                       "required": list(p)}}} for n, d, p in chosen]
    name, _, params = chosen[0]
    args = {k: (r.choice(CITIES) if v == "string" else r.randint(1, 500)) for k, v in params.items()}
    obs = {"status": "ok", "result": {k: (r.randint(-10, 35) if i % 2 else r.choice(CITIES))
                                      for i, k in enumerate(["value", "where", "updated", "note"])}}
    zh = r.random() < 0.5
    ask = (f"帮我用{name}查一下{args.get(next(iter(args)))}的情况。" if zh
           else f"Please use {name} for {args.get(next(iter(args)))}.")
    reply = "查到了，结果如上所示。" if zh else "Done: the tool returned the figures above."
    msgs = [{"role": "system", "content": "", "tools": tools}, {"role": "user", "content": ask},
            {"role": "assistant", "metadata": name, "content": json.dumps(args, ensure_ascii=False)},
            {"role": "observation", "content": json.dumps(obs, ensure_ascii=False)},
            {"role": "assistant", "content": reply}]
    return {"kind": "tool", "messages": msgs}


def long_doc(r: random.Random, topics: list[str], zh: bool) -> dict[str, Any]:
    t = r.choice(topics)
    # ~11K characters of English or ~5K of Chinese: over 2K tokens with GLM-4's tokenizer either way.
    sections = [f"{'第' + str(i + 1) + '节' if zh else 'Section ' + str(i + 1)}\n{paragraph(r, t, zh, 12)}"
                for i in range(10 if zh else 9)]
    ask = "请总结下面这篇文档的要点：\n\n" if zh else "Summarise the main points of this document:\n\n"
    answer = paragraph(r, t, zh, 3)
    return {"kind": "long_doc", "messages": [{"role": "user", "content": ask + "\n\n".join(sections)},
                                             {"role": "assistant", "content": answer}]}


def make(seed: int, n_chat: int, n_long: int, half: int) -> list[dict[str, Any]]:
    r = random.Random(seed)
    en = TOPICS_EN[half::2]  # calibration and held-out use disjoint topic halves
    zh = TOPICS_ZH[half::2]
    out: list[dict[str, Any]] = []
    for _ in range(n_chat):
        out += [chat(r, en, False), chat(r, zh, True), code_sample(r), math_sample(r), multi_turn(r, en + zh),
                tool_sample(r)]
    out += [long_doc(r, en if i % 2 else zh, zh=not i % 2) for i in range(n_long)]
    r.shuffle(out)
    return out


def write(path: Path, records: list[dict[str, Any]]) -> str:
    text = "".join(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n" for rec in records)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if the committed files differ from a fresh run")
    args = ap.parse_args()
    files = {OUT / "default.jsonl": make(seed=20261125, n_chat=46, n_long=12, half=0),
             OUT / "heldout.jsonl": make(seed=777, n_chat=4, n_long=2, half=1)}
    stale = False
    for path, records in files.items():
        text = write(path, records)
        if args.check:
            stale |= not path.is_file() or path.read_text(encoding="utf-8") != text
        else:
            path.write_text(text, encoding="utf-8")
            print(f"{path}: {len(records)} samples, {len(text.encode()) / 1024:.0f} KiB")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
