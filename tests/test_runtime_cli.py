"""``glm-runtime`` on the tiny artifact: generate (ids, text, messages, JSON), chat, errors, Ctrl-C."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from glm_runtime import load
from glm_runtime.cli import app
from tests.conftest import copy_without_tokenizer

REPO = Path(__file__).resolve().parents[1]
FAST = ["--verify", "size", "--threads", "2"]


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def reference(tiny_artifact: Path):
    return load(tiny_artifact, verify="size", threads=2)


def test_generate_prompt_ids_json(tiny_artifact: Path, reference) -> None:
    result = invoke("generate", tiny_artifact, "--prompt-ids", "5,17,300", "--max-new-tokens", "4",
                    "--temperature", "0", "--json", *FAST)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == {"prompt_ids", "output_ids", "text", "finish_reason", "timings"}
    assert out["prompt_ids"] == [5, 17, 300]  # nothing added
    expected = reference.generate(prompt_ids=[5, 17, 300], max_new_tokens=4, temperature=0)
    assert out["output_ids"] == expected.output_ids and out["text"] == expected.text
    assert out["finish_reason"] == expected.finish_reason
    assert {"ttft_s", "decode_tokens_per_s", "overhead_fraction"} <= set(out["timings"])


def test_attention_kernel_flag(tiny_artifact: Path, reference) -> None:
    """Both attention kernels give the greedy tokens of the default load (the tiny model's logits agree to float32
    rounding, tests/test_attention_kernel.py); an unknown value is a usage error."""
    expected = reference.generate(prompt_ids=[5, 17, 300], max_new_tokens=4, temperature=0).output_ids
    for mode in ("ort", "auto"):
        result = invoke("generate", tiny_artifact, "--prompt-ids", "5,17,300", "--max-new-tokens", "4",
                        "--temperature", "0", "--json", "--attention-kernel", mode, *FAST)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["output_ids"] == expected
    result = invoke("generate", tiny_artifact, "--prompt-ids", "5", "--attention-kernel", "fast", *FAST)
    assert result.exit_code == 2 and "fast" in result.output


def test_generate_prompt_and_messages_use_the_chat_template(tiny_artifact: Path, tmp_path: Path,
                                                             reference) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "用一句话介绍你自己"}]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(messages, ensure_ascii=False), encoding="utf-8")
    result = invoke("generate", tiny_artifact, "--messages", path, "--max-new-tokens", "6", "--temperature", "0",
                    "--json", *FAST)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["prompt_ids"] == reference.tokenizer.apply_chat_template(messages)
    assert out["output_ids"] == reference.chat(messages, max_new_tokens=6, temperature=0,
                                               reuse_cache=False).output_ids
    result = invoke("generate", tiny_artifact, "--prompt", "用一句话介绍你自己", "--max-new-tokens", "6",
                    "--temperature", "0", *FAST)
    assert result.exit_code == 0, result.output
    text = reference.chat([{"role": "user", "content": "用一句话介绍你自己"}], max_new_tokens=6, temperature=0,
                          reuse_cache=False).text
    assert result.stdout == text + "\n"


@pytest.mark.parametrize(("args", "message"), [
    (["--prompt-ids", "5,x"], "comma-separated integers"),
    (["--prompt", "hi", "--prompt-ids", "1"], "exactly one of"),
    (["--prompt-ids", "1", "--max-new-tokens", "9000"], "exceeds the model's context of 8192"),
    (["--prompt-ids", "1", "--kv-budget-gb", "0.000001"], "request refused: KV cache"),
    (["--prompt-ids", "1", "--temperature", "-1"], "temperature"),
])
def test_generate_errors_are_one_clear_line(tiny_artifact: Path, args: list[str], message: str) -> None:
    result = invoke("generate", tiny_artifact, *args, *FAST)
    assert result.exit_code == 1
    assert "error:" in result.output and message in result.output.replace("\n", " ")
    assert "Traceback" not in result.output


def test_missing_artifact_and_no_tokenizer(tiny_artifact: Path, tmp_path: Path) -> None:
    result = invoke("generate", tmp_path / "nowhere", "--prompt-ids", "1")
    assert result.exit_code == 1 and "not a glm-export artifact" in result.output
    bare = copy_without_tokenizer(tiny_artifact, tmp_path / "bare")
    ok = invoke("generate", bare, "--prompt-ids", "5,17,300", "--max-new-tokens", "3", *FAST)
    assert ok.exit_code == 0 and "no tokenizer" in ok.output
    assert len(ok.stdout.strip().strip(",").split(",")) == 3  # the ids, comma-separated
    text = invoke("generate", bare, "--prompt", "hi", *FAST)
    assert text.exit_code == 1 and "needs a tokenizer" in text.output


def test_chat_multi_turn_reset_and_exit(tiny_artifact: Path, reference) -> None:
    turns = "hello\nand more\n/reset\nhello\n/exit\nnever read\n"
    result = CliRunner().invoke(app, ["chat", str(tiny_artifact), "--max-new-tokens", "8", "--temperature", "0",
                                      *FAST], input=turns)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    first = reference.chat([{"role": "user", "content": "hello"}], max_new_tokens=8, temperature=0,
                           reuse_cache=False)
    second = reference.chat([{"role": "user", "content": "hello"}, first.message,
                             {"role": "user", "content": "and more"}], max_new_tokens=8, temperature=0,
                            reuse_cache=False)
    assert lines == [first.text, second.text, first.text]  # after /reset the conversation starts over
    assert "(conversation reset)" in result.output
    assert "(8 reused)" not in result.output.split("(conversation reset)")[1]


def test_ctrl_c_in_chat_ends_the_answer_not_the_program(tiny_artifact: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'runtime'}{os.pathsep}{REPO}", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", "from glm_runtime.cli import app; app()", "chat", str(tiny_artifact),
           "--max-new-tokens", "6000", "--temperature", "0", "--verify", "none", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        proc.stdin.write(b"hello\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "no answer started"
        os.read(proc.stdout.fileno(), 1)  # the answer is streaming: the interrupt handler is in place
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.stdin.write(b"/exit\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    assert b"[interrupted]" in err
    assert time.monotonic() - t0 < 10  # far less than 6000 tokens take
