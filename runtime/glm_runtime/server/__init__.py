"""OpenAI-compatible HTTP server: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/health``,
``/metrics``, on top of the continuous-batching :class:`~glm_runtime.scheduler.Scheduler`.

Why this shape:
- Existing clients (the ``openai`` package, curl, LangChain, ...) speak OpenAI's wire format, so requests,
  responses, server-sent-event chunks and error bodies follow it (``{"error": {message, type, param, code}}``).
  Parameters OpenAI has and GLM-4 cannot honour (``logprobs``, penalties other than 0, JSON mode) are refused
  with a 400 that says so instead of being silently ignored. ``top_k``, ``repetition_penalty`` and
  ``ignore_eos`` are accepted as extensions (as vLLM does).
- Everything about text is :mod:`glm_runtime.api`'s (prompt ids, defaults, stop strings, the GLM-4 answer
  format, tool-call parsing): this package only maps HTTP onto it, so the CLI, the Python API and the server
  give the same answers.
- Nothing blocks the event loop: the engine runs in the scheduler's thread and pushes each token to the
  request's asyncio queue (``call_soon_threadsafe``); the chat template renders in a worker thread.
- Safety: loopback by default, optional bearer key compared in constant time, request bodies, ``max_tokens``,
  prompts per request, open connections, requests in flight and the time each phase of a request may take
  are bounded (:mod:`.limits`: idle and slow clients are shed, ``/health`` is always answered), and a full
  server answers 429 rather than queueing without end. The chat template is data rendered in jinja2's
  sandbox; no code from an artifact ever runs.

One module per concern: :mod:`.app` (the app factory and small routes), :mod:`.context` (what every request
shares: auth, body parsing, submitting sequences, reading their events), :mod:`.chat` and :mod:`.completions`
(the two generation endpoints), :mod:`.choices` (engine thread -> event loop, one choice's result),
:mod:`.schemas` (request bodies), :mod:`.errors`, :mod:`.metrics` (``/metrics`` and the counting middleware),
:mod:`.streaming` (server-sent events), :mod:`.limits` (deadlines, connection shedding, request slots),
:mod:`.run` (uvicorn, signals).

fastapi, pydantic and uvicorn are the ``server`` extra (``pip install 'glm-runtime[server]'``); the rest of the
runtime does not import this package.
"""

from glm_runtime.server.app import create_app
from glm_runtime.server.context import ServerSettings
from glm_runtime.server.errors import APIError
from glm_runtime.server.limits import Limits
from glm_runtime.server.run import LOOPBACK, read_api_key, serve

__all__ = ["LOOPBACK", "APIError", "Limits", "ServerSettings", "create_app", "read_api_key", "serve"]
