"""GLM-4 tool-call text <-> OpenAI-style tool_calls, and the conversation mapping via the real template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glm_runtime.chat_template import render_chat_template
from glm_runtime.tool_calls import (
    ParsedOutput,
    ToolCallError,
    openai_to_glm_messages,
    parse_assistant_output,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def assert_openai_call(call: dict, name: str) -> None:
    assert set(call) == {"id", "type", "function"}
    assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) > 10
    assert call["function"]["name"] == name and isinstance(call["function"]["arguments"], str)


def test_function_call_becomes_openai_tool_call() -> None:
    out = parse_assistant_output('get_weather\n{"city": "北京", "days": 2}', [WEATHER])
    assert out.error is None and out.content is None and out.finish_reason == "tool_calls"
    (call,) = out.tool_calls
    assert_openai_call(call, "get_weather")
    assert json.loads(call["function"]["arguments"]) == {"city": "北京", "days": 2}
    assert out.to_openai_message() == {"role": "assistant", "content": None, "tool_calls": out.tool_calls}


def test_ids_are_unique() -> None:
    ids = {parse_assistant_output('get_weather\n{"city": "x"}', [WEATHER]).tool_calls[0]["id"] for _ in range(50)}
    assert len(ids) == 50


def test_tool_not_offered_is_plain_text() -> None:
    out = parse_assistant_output('get_weather\n{"city": "北京"}', tools=None)
    assert out.tool_calls == [] and out.content == 'get_weather\n{"city": "北京"}' and out.finish_reason == "stop"
    out = parse_assistant_output('search\n{"q": 1}', [WEATHER])
    assert out.tool_calls == [] and out.content == 'search\n{"q": 1}'


def test_plain_answer_starts_with_the_empty_metadata_line() -> None:
    out = parse_assistant_output("\n你好！我能帮你什么？\n第二行", [WEATHER])
    assert out == ParsedOutput(content="你好！我能帮你什么？\n第二行", tool_calls=[], error=None)
    assert parse_assistant_output("Hello there", None).content == "Hello there"
    assert parse_assistant_output("", None).content == ""


@pytest.mark.parametrize(
    ("text", "name", "arguments"),
    [
        ("python\nimport math\nprint(math.pi)", "python", "import math\nprint(math.pi)"),
        (
            'simple_browser\nsearch("GLM-4", recency_days=7)',
            "simple_browser",
            'search("GLM-4", recency_days=7)',
        ),
        (
            "cogview\nA red panda reading a book, watercolor",
            "cogview",
            "A red panda reading a book, watercolor",
        ),
    ],
)
def test_builtin_tools_carry_raw_payload(text: str, name: str, arguments: str) -> None:
    out = parse_assistant_output(text, None)
    (call,) = out.tool_calls
    assert_openai_call(call, name)
    assert call["function"]["arguments"] == arguments


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('get_weather\n{"city": "北京"', "not valid JSON"),
        ("get_weather\ncity=北京", "not valid JSON"),
        ('get_weather\n["北京"]', "a list, not an object"),
    ],
)
def test_malformed_function_arguments_are_reported(text: str, match: str) -> None:
    out = parse_assistant_output(text, [WEATHER])
    assert out.tool_calls == [] and out.error is not None and "get_weather" in out.error
    assert out.content == text  # the raw output is kept, not swallowed
    with pytest.raises(ToolCallError, match=match):
        out.raise_for_error()


def test_several_calls_separated_by_assistant_token() -> None:
    text = 'get_weather\n{"city": "A"}<|assistant|>get_weather\n{"city": "B"}<|assistant|>python\nprint(1)'
    out = parse_assistant_output(text, [WEATHER, {"type": "python"}])
    assert [c["function"]["name"] for c in out.tool_calls] == ["get_weather", "get_weather", "python"]
    assert [c["function"]["arguments"] for c in out.tool_calls] == [
        '{"city": "A"}',
        '{"city": "B"}',
        "print(1)",
    ]


def test_bad_tools_and_inputs() -> None:
    with pytest.raises(ValueError, match="unknown type 'retrieval'"):
        parse_assistant_output("x", [{"type": "retrieval"}])
    with pytest.raises(ValueError, match=r"without a function\.name"):
        parse_assistant_output("x", [{"type": "function", "function": {}}])
    with pytest.raises(TypeError):
        parse_assistant_output(None, None)  # type: ignore[arg-type]


OPENAI_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Beijing?"}],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "北京"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "上海"}},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 3}'},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"temp_c": 9}'},
    {"role": "assistant", "content": "北京 3°C，上海 9°C。"},
    {"role": "user", "content": "Thanks"},
]


def test_openai_conversation_maps_to_glm_messages() -> None:
    assert openai_to_glm_messages(OPENAI_CONVERSATION, tools=[WEATHER]) == [
        {"role": "system", "content": "", "tools": [WEATHER]},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Beijing?"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "上海"}'},
        {"role": "observation", "content": '{"temp_c": 3}'},
        {"role": "observation", "content": '{"temp_c": 9}'},
        {"role": "assistant", "content": "北京 3°C，上海 9°C。"},
        {"role": "user", "content": "Thanks"},
    ]


def test_mapped_conversation_renders_glm4_tool_format(chat_reference: Path) -> None:
    template = json.loads((chat_reference / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    text = render_chat_template(template, openai_to_glm_messages(OPENAI_CONVERSATION, tools=[WEATHER]))
    assert text.startswith("[gMASK]<sop><|system|>\n")
    assert "## get_weather" in text
    # The GLM-4 format from the model card: <|assistant|>NAME\n{json}, results as <|observation|>\n...
    assert (
        '<|system|>\nBe brief.<|user|>\nWeather in Beijing?<|assistant|>get_weather\n{"city": "北京"}'
        '<|assistant|>get_weather\n{"city": "上海"}'
        '<|observation|>\n{"temp_c": 3}<|observation|>\n{"temp_c": 9}'
        "<|assistant|>\n北京 3°C，上海 9°C。<|user|>\nThanks<|assistant|>"
    ) in text


def test_round_trip_model_output_to_history() -> None:
    generated = 'get_weather\n{"city": "北京"}'
    message = parse_assistant_output(generated, [WEATHER]).to_openai_message()
    (glm_message,) = openai_to_glm_messages([message])
    rendered = render_chat_template(
        "{% for m in messages %}<|assistant|>{{ m.metadata }}\n{{ m.content }}{% endfor %}",
        [glm_message],
        add_generation_prompt=False,
    )
    assert rendered == "<|assistant|>" + generated  # the history shows exactly what the model wrote


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "wizard", "content": "x"}], "unknown role 'wizard'"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "text parts only",
        ),
        ([{"role": "user", "content": 5}], "string or a list of text parts"),
        ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {}}]}], "tool_calls\\[0\\]"),
        ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]}], "arguments"),
        ("hi", "must be a list"),
    ],
)
def test_openai_mapping_errors(messages, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        openai_to_glm_messages(messages)


def test_developer_role_and_legacy_function_messages() -> None:
    out = openai_to_glm_messages(
        [
            {"role": "developer", "content": "rules"},
            {"role": "assistant", "content": "", "function_call": {"name": "f", "arguments": "{}"}},
            {"role": "function", "name": "f", "content": "ok"},
        ]
    )
    assert out == [
        {"role": "system", "content": "rules"},
        {"role": "assistant", "metadata": "f", "content": "{}"},
        {"role": "observation", "content": "ok"},
    ]
