"""The public API: ``load(artifact)`` gives an :class:`LLM` with ``generate`` (text or ids, batched) and ``chat``.

This layer owns everything about text: prompts to ids (tokenizer, chat template, OpenAI-style messages),
generated ids to streamed text (incremental UTF-8, stop strings held back until they can no longer match,
GLM-4's ``metadata\\ncontent`` answer format, tool calls), and the defaults from the artifact's
``generation_config.json``. The decode loop below it (:mod:`glm_runtime.generator`) sees token ids only.

``LLM.chat`` keeps the conversation's KV cache: call it again with the history plus a new message and only
the new suffix is prefilled. An ``LLM`` is not thread-safe; use one per thread (they can share nothing).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glm_runtime.config import ModelConfig
from glm_runtime.engine import Engine, format_bytes
from glm_runtime.generator import DEFAULT_PREFILL_CHUNK, DecodeBatch, Generator, Session, fit_context
from glm_runtime.manifest import ArtifactError, model_config, read_manifest
from glm_runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from glm_runtime.tool_calls import ParsedOutput

log = logging.getLogger(__name__)

#: max_new_tokens when neither the caller nor generation_config.json says (capped by the context left).
DEFAULT_MAX_NEW_TOKENS = 512
#: transformers' default top_k when a generation config does not set one; GLM-4's does not.
HF_DEFAULT_TOP_K = 50


class TokenizerMissingError(ValueError):
    """Text in or out was asked of an artifact exported without tokenizer files."""


# ---- results ------------------------------------------------------------------------------------------
@dataclass
class Completion:
    """One sequence's result. ``output_ids`` includes the stop token that ended it (``text`` does not)."""

    prompt_ids: list[int]
    output_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" | "length" | "tool_calls" | "interrupted"
    timings: dict[str, Any]
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tool_error: str | None = None

    @property
    def message(self) -> dict[str, Any]:
        """The answer as an OpenAI-style assistant message (append it to the history for the next turn)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg

    def to_dict(self) -> dict[str, Any]:
        d = {"prompt_ids": self.prompt_ids, "output_ids": self.output_ids, "text": self.text,
             "finish_reason": self.finish_reason, "timings": self.timings}
        if self.tool_calls or self.tool_error:
            d["tool_calls"], d["tool_error"] = self.tool_calls, self.tool_error
        return d


@dataclass
class Chunk:
    """A streamed piece of sequence ``index``: the new token(s) and the text they completed (maybe ``""``).

    The last chunk of a sequence has ``finish_reason`` set and carries the whole :class:`Completion`.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    completion: Completion | None = None


@dataclass
class RequestSpec:
    """One sequence's request, resolved: prompt ids (fitted to the context), length, sampling, stops."""

    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams
    stop_ids: list[int]
    stops: list[str]


# ---- text helpers -------------------------------------------------------------------------------------
class StopStrings:
    """Finds user stop strings in streamed text, holding back any tail that could still become one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buffer = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """``(text safe to emit, whether a stop string matched)``; after a match, the rest is dropped."""
        if not self.stops:
            return text, False
        buf = self.buffer + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.buffer = ""
            return buf[:min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self.buffer = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


class AssistantText:
    """GLM-4 answers ``<metadata>\\n<content>``: an empty first line for text, a tool's name for a call.

    Streams the content of a text answer; buffers the first line while it may still name an offered tool,
    and the whole answer once it does (the tool call is parsed at the end, not streamed as text).
    """

    def __init__(self, tool_names: set[str]) -> None:
        self.tool_names = tool_names
        self.mode = "head"
        self.head = ""

    def feed(self, text: str) -> str:
        if self.mode == "text":
            return text
        if self.mode == "tool":
            return ""
        self.head += text
        meta, newline, rest = self.head.partition("\n")
        name = meta.strip()
        if newline:
            if not name:
                self.mode = "text"
                return rest
            self.mode = "tool" if name in self.tool_names else "text"
            return "" if self.mode == "tool" else self.head
        if name and not any(t.startswith(name) for t in self.tool_names):
            self.mode = "text"
            return self.head
        return ""

    def finish(self) -> str:
        if self.mode == "head":
            self.mode = "text"
            return self.head.lstrip("\n")
        return ""


class RowText:
    """Ids -> text for one sequence: incremental detokenization, stop strings, (chat) the answer format.

    ``feed(token) -> (text, stop string matched)``; ``finish(stopped_by_string) -> tail``; ``text``: all of it.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], stop_ids: frozenset[int],
                 assistant: AssistantText | None) -> None:
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.stops = StopStrings(stops)
        self.stop_ids = stop_ids
        self.assistant = assistant
        self.parts: list[str] = []

    def _emit(self, text: str) -> str:
        if self.assistant is not None:
            text = self.assistant.feed(text)
        self.parts.append(text)
        return text

    def feed(self, token: int) -> tuple[str, bool]:
        if token in self.stop_ids:
            return "", False
        text, hit = self.stops.feed(self.decoder.step(token))
        return self._emit(text), hit

    def finish(self, stopped_by_string: bool) -> str:
        tail = ""
        if not stopped_by_string:
            text, hit = self.stops.feed(self.decoder.finish())
            tail = self._emit(text) + ("" if hit else self._emit(self.stops.flush()))
        if self.assistant is not None:
            extra = self.assistant.finish()
            self.parts.append(extra)
            tail += extra
        return tail

    @property
    def text(self) -> str:
        return "".join(self.parts)


# ---- the API ------------------------------------------------------------------------------------------
class LLM:
    """A loaded artifact: engine, tokenizer (if the artifact has one), defaults and a conversation cache."""

    def __init__(self, artifact: Path, manifest: dict[str, Any], engine: Engine, tokenizer: Any | None,
                 generation_config: dict[str, Any], prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 kv_budget_bytes: int | None = None) -> None:
        self.artifact = artifact
        self.manifest = manifest
        self.config: ModelConfig = engine.config
        self.engine = engine
        self.tokenizer = tokenizer
        self.generation_config = generation_config
        self.generator = Generator(engine, prefill_chunk, kv_budget_bytes)
        self.session = Session()

    # ---- requests -------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        *,
        prompt_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        truncate: bool = False,
        stream: bool = False,
    ) -> Completion | list[Completion] | Iterator[Chunk]:
        """Continue raw text (``[gMASK]<sop>`` + the text, as GLM-4's tokenizer encodes it) or raw ids.

        One prompt (a ``str`` or a flat id list) gives one :class:`Completion`, several give a list, in order;
        they run as one batch. ``stream=True`` yields :class:`Chunk` s instead. Sampling settings left ``None``
        come from the artifact's ``generation_config.json``; ``temperature=0`` is greedy.
        ``stop_token_ids=()`` disables the default stop ids.
        """
        t0 = time.perf_counter()
        single, ids = self._prompt_ids(prompts, prompt_ids)
        batch, texts = self._start(ids, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
                                   stop, stop_token_ids, truncate, None, None, t0)
        events = self._drive(batch, texts, None)
        if stream:
            return events
        done = self._collect(events, len(ids))
        return done[0] if single else done

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        truncate: bool = False,
        stream: bool = False,
        reuse_cache: bool = True,
    ) -> Completion | Iterator[Chunk]:
        """Answer an OpenAI-style conversation (system/user/assistant/tool messages, optional ``tools``).

        The conversation's KV cache is kept: the next call with this history plus new messages prefills only
        what is new (``reuse_cache=False`` starts from scratch). A tool call ends with
        ``finish_reason == "tool_calls"`` and OpenAI-style ``tool_calls``.
        """
        t0 = time.perf_counter()
        from glm_runtime.tool_calls import tool_names

        prompt = self.chat_prompt(messages, tools)
        functions, builtins = tool_names(tools)
        if not reuse_cache:
            self.session.reset()
        batch, texts = self._start([prompt], max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                                   seed, stop, None, truncate, self.session, functions | builtins, t0)
        events = self._drive(batch, texts, list(tools) if tools else None)
        if stream:
            return events
        return self._collect(events, 1)[0]

    def reset(self) -> None:
        """Forget the cached conversation (the next ``chat`` prefills its whole prompt)."""
        self.session.reset()

    # ---- request preparation, shared with the server (glm_runtime.server) ------------------------------
    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
                    assistant_prefix: str | None = None) -> list[int]:
        """The prompt ids of an OpenAI-style conversation (sandboxed chat template, tools on a system message).

        ``assistant_prefix``: text the answer is made to start with (the server forces a tool call by putting
        the tool's name on GLM-4's metadata line).
        """
        tok = self._need_tokenizer("chat")
        from glm_runtime.tool_calls import openai_to_glm_messages

        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        prompt = list(tok.apply_chat_template(openai_to_glm_messages(messages, tools)))
        return prompt + (tok.encode(assistant_prefix) if assistant_prefix else [])

    def text_prompt_ids(self, prompts: str | Sequence[str] | None,
                        prompt_ids: Sequence[int] | Sequence[Sequence[int]] | None) -> list[list[int]]:
        """Prompts to ids as :meth:`generate` takes them: text (``[gMASK]<sop>`` + text) or raw ids."""
        return self._prompt_ids(prompts, prompt_ids)[1]

    def request_spec(self, prompt: list[int], max_new_tokens: int | None = None, temperature: float | None = None,
                     top_p: float | None = None, top_k: int | None = None,
                     repetition_penalty: float | None = None, seed: int | None = None,
                     stop: str | Sequence[str] | None = None, stop_token_ids: Sequence[int] | None = None,
                     truncate: bool = False) -> RequestSpec:
        """One sequence's settings resolved against the artifact's defaults, checked (raises ``ValueError``)."""
        params, stops, stop_ids = self._settings(temperature, top_p, top_k, repetition_penalty, seed, stop,
                                                 stop_token_ids)
        ids, n = self._fit(prompt, max_new_tokens, truncate)
        return RequestSpec(ids, n, params, stop_ids, stops)

    def row_text(self, spec: RequestSpec, tool_names: set[str] | None = None) -> RowText | None:
        """Ids -> streamed text for one sequence (``None`` without a tokenizer); ``tool_names``: chat answers."""
        if self.tokenizer is None:
            return None
        return RowText(self.tokenizer, spec.stops, frozenset(spec.stop_ids),
                       AssistantText(tool_names) if tool_names is not None else None)

    def parse_tool_calls(self, output_ids: Sequence[int], stop_ids: frozenset[int] | set[int],
                         tools: Sequence[Mapping[str, Any]], prefix: str = "") -> ParsedOutput:
        """GLM-4's answer (``prefix`` + the generated ids without the final stop id) as a
        :class:`~glm_runtime.tool_calls.ParsedOutput`."""
        from glm_runtime.tool_calls import parse_assistant_output

        tok = self._need_tokenizer("tool calls")
        ids = list(output_ids[:-1]) if output_ids and output_ids[-1] in stop_ids else list(output_ids)
        return parse_assistant_output(prefix + tok.decode(ids, skip_special_tokens=False), tools)

    # ---- internals ------------------------------------------------------------------------------------
    def _need_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise TokenizerMissingError(
                f"{what} needs a tokenizer, and the artifact {self.artifact} has none (it was exported from a "
                f"checkpoint without tokenizer files). Give token ids instead (generate(prompt_ids=[...]), "
                f"glm-runtime generate --prompt-ids 1,2,3), or re-export from a checkpoint that has "
                f"tokenizer.model / tokenizer.json")
        return self.tokenizer

    def _prompt_ids(self, prompts: str | Sequence[str] | None,
                    prompt_ids: Sequence[int] | Sequence[Sequence[int]] | None) -> tuple[bool, list[list[int]]]:
        if (prompts is None) == (prompt_ids is None):
            raise ValueError("give either prompts (text) or prompt_ids (token ids), not both or neither")
        if prompt_ids is not None:
            if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence) or not prompt_ids:
                raise ValueError("prompt_ids must be a non-empty list of token ids (or a list of such lists)")
            single = not isinstance(prompt_ids[0], Sequence)
            lists = [prompt_ids] if single else list(prompt_ids)
            out = []
            for i, ids in enumerate(lists):
                if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not all(
                        isinstance(t, int) and not isinstance(t, bool) for t in ids):
                    raise ValueError(f"prompt_ids[{i}] must be a list of integer token ids")
                out.append([int(t) for t in ids])
            return single, out
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)  # type: ignore[list-item]
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"prompt {i} is a {type(text).__name__}, not a str (token ids: prompt_ids=)")
            if not text:
                raise ValueError(f"prompt {i} is empty")
        tok = self._need_tokenizer("a text prompt")
        prefix = [tok.special_ids[s] for s in ("[gMASK]", "<sop>") if s in tok.special_ids]
        return single, [prefix + ids for ids in tok.encode_batch(texts)]

    def _sampling(self, temperature: float | None, top_p: float | None, top_k: int | None,
                  repetition_penalty: float | None, seed: int | None) -> SamplingParams:
        g = self.generation_config
        if temperature is None:
            temperature = float(g.get("temperature", 1.0)) if g.get("do_sample", False) else 0.0
        return SamplingParams(
            temperature=temperature,
            top_p=float(g.get("top_p", 1.0)) if top_p is None else top_p,
            top_k=int(g.get("top_k", HF_DEFAULT_TOP_K)) if top_k is None else top_k,
            repetition_penalty=float(g.get("repetition_penalty", 1.0)) if repetition_penalty is None
            else repetition_penalty,
            seed=seed)

    def default_max_new_tokens(self) -> int:
        """``max_new_tokens`` of generation_config.json, else :data:`DEFAULT_MAX_NEW_TOKENS` (before capping)."""
        return int(self.generation_config.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)

    def default_stop_ids(self) -> list[int]:
        eos = self.generation_config.get("eos_token_id", list(self.config.eos_token_ids))
        return [int(e) for e in (eos if isinstance(eos, list) else [eos])]

    def _settings(self, temperature: float | None, top_p: float | None, top_k: int | None,
                  repetition_penalty: float | None, seed: int | None, stop: str | Sequence[str] | None,
                  stop_token_ids: Sequence[int] | None) -> tuple[SamplingParams, list[str], list[int]]:
        params = self._sampling(temperature, top_p, top_k, repetition_penalty, seed)
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        if stops:
            self._need_tokenizer("stop strings")
        stop_ids = self.default_stop_ids() if stop_token_ids is None else [int(s) for s in stop_token_ids]
        return params, stops, stop_ids

    def _fit(self, ids: list[int], max_new_tokens: int | None, truncate: bool) -> tuple[list[int], Any]:
        """``(prompt, max_new_tokens)``: the default length capped by the context left; the prompt truncated if
        asked. A bad ``max_new_tokens`` passes through for the generator to refuse with its message."""
        max_pos = self.config.max_position
        n = max_new_tokens
        if n is None:  # a default never makes a request fail: it is capped by the context left
            n = self.default_max_new_tokens()
            n = min(n, max_pos - len(ids)) if len(ids) < max_pos else n
        keep = 2 if self.tokenizer is not None and ids[:2] == [
            self.tokenizer.special_ids.get("[gMASK]"), self.tokenizer.special_ids.get("<sop>")] else 0
        fitted = fit_context(ids, n, max_pos, truncate, keep) if isinstance(n, int) and n > 0 else ids
        return fitted, n

    def _start(self, prompts: list[list[int]], max_new_tokens: int | None, temperature: float | None,
               top_p: float | None, top_k: int | None, repetition_penalty: float | None, seed: int | None,
               stop: str | Sequence[str] | None, stop_token_ids: Sequence[int] | None, truncate: bool,
               session: Session | None, tool_names: set[str] | None,
               t0: float) -> tuple[DecodeBatch, list[RowText | None]]:
        params, stops, stop_ids = self._settings(temperature, top_p, top_k, repetition_penalty, seed, stop,
                                                 stop_token_ids)
        specs = [RequestSpec(*self._fit(ids, max_new_tokens, truncate), params, stop_ids, stops) for ids in prompts]
        batch = self.generator.start([s.prompt_ids for s in specs], [s.max_new_tokens for s in specs], params,
                                     stop_ids, session, t_request=t0)
        return batch, [self.row_text(spec, tool_names) for spec in specs]

    def _drive(self, batch: DecodeBatch, texts: list[RowText | None],
               tools: list[Mapping[str, Any]] | None) -> Iterator[Chunk]:
        """Step the batch to the end, turning tokens into chunks; closing the iterator ends the request."""
        stopped = [False] * batch.batch
        try:
            while not batch.done:
                for b, tok in batch.step():
                    rt = texts[b]
                    text = ""
                    if rt is not None:
                        text, hit = rt.feed(tok)
                        if hit:
                            stopped[b] = True
                            batch.finish(b, "stop")
                    reason = batch.rows[b].finish_reason
                    if reason is None:
                        yield Chunk(b, text, [tok])
                    else:
                        tail = rt.finish(stopped[b]) if rt is not None else ""
                        done = self._completion(batch, b, rt, tools)
                        yield Chunk(b, text + tail, [tok], done.finish_reason, done)
        except GeneratorExit:
            for b in batch.active():
                batch.finish(b, "interrupted")
            raise

    def _completion(self, batch: DecodeBatch, b: int, rt: RowText | None,
                    tools: list[Mapping[str, Any]] | None) -> Completion:
        row = batch.rows[b]
        timings = batch.timings.to_dict()
        timings["generated_tokens"] = len(row.output)
        done = Completion(row.prompt, list(row.output), rt.text if rt is not None else None,
                          row.finish_reason or "stop", timings)
        if tools and self.tokenizer is not None:
            parsed = self.parse_tool_calls(row.output, batch.stop_ids, tools)
            if parsed.tool_calls:
                done.tool_calls, done.finish_reason = parsed.tool_calls, "tool_calls"
                done.text = parsed.content
            done.tool_error = parsed.error
        return done

    @staticmethod
    def _collect(events: Iterator[Chunk], n: int) -> list[Completion]:
        out: list[Completion | None] = [None] * n
        for chunk in events:
            if chunk.completion is not None:
                out[chunk.index] = chunk.completion
        assert all(c is not None for c in out)
        return out  # type: ignore[return-value]


def _tensorrt_engine(artifact: Path, manifest: dict[str, Any], cfg: ModelConfig) -> Engine | None:
    """The artifact's TensorRT engine when one was built and an NVIDIA GPU is here; ``None``: use ONNX Runtime.

    An engine that cannot run on this GPU / TensorRT raises with the fix; pass ``providers`` to use ONNX
    Runtime instead.
    """
    entries = manifest.get("engines") or []
    gpus = Path("/proc/driver/nvidia/gpus")
    if not entries or not (gpus.is_dir() and any(gpus.iterdir())):
        return None
    from glm_runtime.engine_trt import TrtEngine

    log.info("using the artifact's %s engine (%s)", entries[0]["flavour"], entries[0]["file"])
    return TrtEngine(artifact, entries[0], cfg)


def load(artifact: str | Path, *, providers: list[str] | None = None, threads: int | None = None,
         verify: str = "hash", prefill_chunk: int = DEFAULT_PREFILL_CHUNK, kv_budget_bytes: int | None = None,
         log_severity: int = 2, int4_kernel: str | None = None, attention_kernel: str | None = None,
         hugepages: bool | None = None) -> LLM:
    """Open an artifact directory made by ``glm-export``: check it, start the engine, load the tokenizer.

    ``verify``: ``"hash"`` (sha256 of every file, the default), ``"size"`` (fast for tens of GB) or
    ``"none"``. ``providers``: ONNX Runtime execution providers (default: TensorRT/CUDA when a GPU and
    onnxruntime-gpu are present, else CPU). ``kv_budget_bytes``: memory KV caches may use (default: 80% of
    the RAM available once the model is loaded). ``int4_kernel``: ``"auto"`` (the runtime's int4 kernel on CPU
    when it is built, see :mod:`glm_runtime.cpu_kernel`) or ``"ort"`` (ONNX Runtime's MatMulNBits); default
    $GLM_RUNTIME_INT4_KERNEL, else auto. ``attention_kernel``: ``"auto"`` (the runtime's decode attention on a CPU
    with AVX-512: its cost follows the context, not the KV buffer) or ``"ort"``; default
    $GLM_RUNTIME_ATTENTION_KERNEL, else auto. ``hugepages``: after loading, move the int4 kernel's weights onto
    transparent huge pages in the background (decode ~11 % faster once done; the first steps are slower while it
    copies); default $GLM_RUNTIME_HUGEPAGES (0 or 1), else on.
    """
    import onnxruntime

    from glm_runtime.engine_ort import load_engine

    artifact = Path(artifact)
    if verify not in ("hash", "size", "none"):
        raise ValueError(f"verify must be 'hash', 'size' or 'none', got {verify!r}")
    if verify == "hash" and (artifact / "manifest.json").is_file():
        try:
            files = json.loads((artifact / "manifest.json").read_text(encoding="utf-8")).get("files", {})
            total = sum(int(f.get("bytes", 0)) for f in files.values())
            log.info("verifying %d files (%s, sha256) in %s", len(files), format_bytes(total), artifact)
        except (ValueError, AttributeError, TypeError):
            pass  # read_manifest reports a broken manifest properly
    manifest = read_manifest(artifact, verify=verify)
    cfg = model_config(manifest)
    made_with = manifest.get("producer", {}).get("onnxruntime")
    if made_with and _version(onnxruntime.__version__) < _version(made_with):
        log.warning("this artifact was exported with onnxruntime %s; %s is installed (older)", made_with,
                    onnxruntime.__version__)
    engine = _tensorrt_engine(artifact, manifest, cfg) if providers is None else None
    if engine is None:
        engine = load_engine(artifact, manifest, cfg, providers, threads, log_severity, int4_kernel,
                             attention_kernel, hugepages)
    tokenizer = None
    if manifest.get("tokenizer"):
        from glm_runtime.tokenizer import GLMTokenizer

        tokenizer = GLMTokenizer.from_dir(artifact)
        tokenizer.id_to_bytes  # noqa: B018  (built once here, not inside the first request's latency)
    else:
        log.warning("%s has no tokenizer: it generates from token ids only (text in/out needs a tokenizer)",
                    artifact)
    generation_config = read_generation_config(artifact / "generation_config.json")
    return LLM(artifact, manifest, engine, tokenizer, generation_config, prefill_chunk, kv_budget_bytes)


#: generation_config.json keys the runtime reads, and the values each may hold.
_GEN_NUMBERS = ("temperature", "top_p", "repetition_penalty")
_GEN_COUNTS = ("top_k", "max_new_tokens")


def read_generation_config(path: Path) -> dict[str, Any]:
    """``generation_config.json`` (``{}`` when absent), with the keys the runtime reads checked: a wrong type
    there surfaced later as a TypeError or OverflowError inside a request (issue 19, parser fuzzing)."""
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # also invalid UTF-8 and Python's integer-digit limit
        raise ArtifactError(f"{path} is not valid JSON ({e}): rebuild the artifact") from e
    if not isinstance(config, dict):
        raise ArtifactError(f"{path} must hold a JSON object: rebuild the artifact")
    config = {k: v for k, v in config.items() if v is not None}  # null means "not set" (transformers writes them)

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 31

    problems = [f"{k} must be a finite number, got {config[k]!r:.40}" for k in _GEN_NUMBERS
                if config.get(k) is not None and not number(config[k])]
    problems += [f"{k} must be a non-negative integer, got {config[k]!r:.40}" for k in _GEN_COUNTS
                 if config.get(k) is not None and not count(config[k])]
    if "do_sample" in config and not isinstance(config["do_sample"], bool):
        problems.append(f"do_sample must be true or false, got {config['do_sample']!r:.40}")
    eos = config.get("eos_token_id")
    if eos is not None and not (count(eos) or (isinstance(eos, list) and all(count(e) for e in eos))):
        problems.append(f"eos_token_id must be a token id or a list of them, got {eos!r:.40}")
    if problems:
        raise ArtifactError(f"{path}: " + "; ".join(problems) + ": fix or remove the file")
    return config


def _version(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("+")[0].split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)
