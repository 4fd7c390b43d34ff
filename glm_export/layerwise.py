"""The checkpoint run one decoder layer at a time: the reference for calibration and accuracy on models that
do not fit in memory in float32.

GLM-4-9B in float32 is 37.6 GB; one of its decoder layers is 0.87 GB. A sequential pipeline (as GPTQModel,
llm-compressor and AutoAWQ do) keeps the hidden states of every sequence (16 x 128 tokens x 4096 x 4 bytes is
32 MB) and pushes them through layer 0, then layer 1, ..., loading each layer from the memory-mapped
safetensors just before it runs and dropping it (and unmapping the shard) right after. The layer is the same
:class:`~glm_export.model.Layer` the whole model runs, on the same per-sequence inputs, so every number equals
what :func:`~glm_export.checkpoint.load_model` + a full forward would give (tests/test_stream_quant.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from glm_export import rotary
from glm_export.checkpoint import Checkpoint
from glm_export.model import Layer, is_matmul_weight
from glm_runtime.config import ModelConfig

LAYER_MODULES = ("input_norm.weight", "qkv.weight", "qkv.bias", "o_proj.weight", "post_attn_norm.weight",
                 "gate_up.weight", "down.weight")
HEAD_ROWS = 16384  # lm_head rows converted to float32 at a time (256 MB for hidden 4096)


def load_layer(ckpt: Checkpoint, i: int, dtype: torch.dtype = torch.float32) -> Layer:
    """Decoder layer ``i`` alone, its weights read from the checkpoint (converted to ``dtype``)."""
    cfg = ckpt.config
    with torch.device("meta"):
        layer = Layer(cfg, dtype)
    state = {}
    for short in LAYER_MODULES:
        name = f"layers.{i}.{short}"
        if short == "qkv.bias" and not cfg.qkv_bias:
            continue
        t = ckpt.tensor(name, dtype)
        state[short] = t.t() if is_matmul_weight(name) else t
    layer.load_state_dict(state, assign=True, strict=True)
    return layer.eval().requires_grad_(False)


def embed(ckpt: Checkpoint, ids: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[1, n, hidden]``: the rows of the embedding for ``ids``, gathered from the mapped checkpoint tensor
    before any conversion (the whole table in float32 would be 2.5 GB for a 151552-token vocabulary)."""
    table = ckpt.tensor("embed.weight")
    rows = F.embedding(torch.tensor([list(ids)], dtype=torch.int64), table).to(dtype)
    ckpt.release()
    return rows


def step_inputs(n: int, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """What :meth:`GLM4.forward` computes once per step for every layer: cos, sin, write index, mask."""
    pos = torch.arange(n).view(1, n)
    cos, sin = rotary.cos_sin(pos, rotary.inv_freq(cfg), dtype)
    slots = torch.arange(n)
    mask = slots.view(1, 1, 1, n) <= pos.unsqueeze(1).unsqueeze(-1)
    return cos, sin, pos[:, 0], mask


def run_layers(ckpt: Checkpoint, hidden: list[torch.Tensor],
               before: Callable[[int, Layer], Callable[[], None] | None] | None = None,
               after_seq: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
               before_seq: Callable[[int], None] | None = None,
               dtype: torch.dtype = torch.float32, progress: Callable[[], None] | None = None,
               start: int = 0, after_layer: Callable[[int, list[torch.Tensor]], None] | None = None
               ) -> list[torch.Tensor]:
    """Push every sequence's hidden states (``[1, n, hidden]`` each, a prefill from position 0) through all
    decoder layers, one layer in memory at a time; returns the final hidden states (before the final norm).

    ``before(i, layer)`` may install hooks and return a function that removes them; ``before_seq(s)`` runs
    before sequence ``s`` enters a layer; ``after_seq(i, s, k, v)`` sees the K (after RoPE) and V each
    sequence wrote into the layer's cache. ``start``: ``hidden`` is the output of layer ``start - 1`` (a resumed
    run); ``after_layer(i, hidden)`` runs once layer ``i`` has processed every sequence (to store the progress).
    """
    cfg = ckpt.config
    inputs = {}
    for i in range(start, cfg.num_layers):
        layer = load_layer(ckpt, i, dtype)
        undo = before(i, layer) if before else None
        try:
            with torch.no_grad():
                for s, x in enumerate(hidden):
                    n = x.shape[1]
                    if n not in inputs:
                        inputs[n] = step_inputs(n, cfg, dtype)
                    shape = (1, cfg.num_kv_heads, n, cfg.head_dim)
                    k, v = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
                    if before_seq:
                        before_seq(s)
                    hidden[s], k, v = layer(x, *inputs[n], k, v, False)
                    if after_seq:
                        after_seq(i, s, k, v)
        finally:
            if undo:
                undo()
        del layer
        ckpt.release()  # unmap the shard: the layer's pages would otherwise stay resident
        if after_layer:
            after_layer(i, hidden)
        if progress:
            progress()
    return hidden


def final_norm(ckpt: Checkpoint, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    cfg = ckpt.config
    w = ckpt.tensor("final_norm.weight", dtype)
    return F.rms_norm(x.float(), (x.shape[-1],), w.float(), cfg.rms_norm_eps).to(dtype)


def head_rows(ckpt: Checkpoint) -> Iterator[tuple[int, torch.Tensor]]:
    """The output layer ``[vocab, hidden]`` in float32 blocks of :data:`HEAD_ROWS` rows (start, block)."""
    name = "embed.weight" if ckpt.config.tie_word_embeddings else "lm_head.weight"
    w = ckpt.tensor(name)
    for start in range(0, w.shape[0], HEAD_ROWS):
        yield start, w[start:start + HEAD_ROWS].float()
    del w
    ckpt.release()


def logits(ckpt: Checkpoint, normed: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[n, vocab]`` float32 logits of each normed hidden state ``[1, n, hidden]``, the output layer streamed
    in row blocks (2.5 GB in float32 for GLM-4-9B: never whole)."""
    out = [torch.empty(x.shape[1], ckpt.config.vocab_size) for x in normed]
    with torch.no_grad():
        for start, block in head_rows(ckpt):
            for o, x in zip(out, normed, strict=True):
                o[:, start:start + block.shape[0]] = x[0].float() @ block.t()
    return out
