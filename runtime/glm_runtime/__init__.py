"""glm-runtime: run GLM-4 artifacts made by glm-export without torch, transformers or onnx.

Bottom to top: ``config`` and ``manifest``; tokenizer, chat template, tool calls; engines; generator; API.
"""

__version__ = "0.1.0"

from glm_runtime.api import LLM, Chunk, Completion, load

__all__ = ["LLM", "Chunk", "Completion", "__version__", "load"]
