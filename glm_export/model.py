"""GLM-4 in PyTorch with an explicit, preallocated KV cache: the numerical reference and the thing we trace.

The cache of every layer is a buffer ``[batch, kv_heads, cache_len, head_dim]``; a step writes its new K/V
at each sequence's own write index (its first position id), in place, and attends over the whole buffer with
the mask "cache slot <= query position". Slot index == position, so right-padded batches need nothing
special: a padded tail writes slots that later steps overwrite before the mask ever admits them.

The same code runs eagerly (SDPA, explicit rotary math, ``scatter_``) and under ``torch.onnx.export``
(``onnx_ops=True``): then attention, rotary and the cache write become the standard ONNX ops ``Attention``
(opset 23), ``RotaryEmbedding`` (opset 23) and ``TensorScatter`` (opset 24) that both ONNX Runtime and
TensorRT fuse. See ``docs/graph.md`` for the graph's inputs and outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm_export import rotary
from glm_runtime.config import ModelConfig

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {sorted(TORCH_DTYPES)}") from None


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as the original THUDM code does."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return y.to(x.dtype)


class Linear(nn.Module):
    """``y = x @ weight (+ bias)`` with ``weight`` stored ``[in, out]``, the transpose of the checkpoint's.

    Storing the MatMul operand directly means the exported graph's initializer *is* the parameter, under
    its canonical name: ``nn.Linear`` would export as a Transpose that the exporter folds into an anonymous
    copy, which breaks streaming the weights from the checkpoint and quantizing them by name. Eagerly the
    loader assigns a transposed view of the memory-mapped tensor, so nothing is copied.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight
        return y if self.bias is None else y + self.bias


class Layer(nn.Module):
    """One pre-norm GLM-4 block: fused QKV with bias, GQA attention, fused gate/up SwiGLU."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.qkv = Linear(cfg.hidden_size, cfg.qkv_size, cfg.qkv_bias, dtype)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, False, dtype)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.gate_up = Linear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, False, dtype)
        self.down = Linear(cfg.ffn_hidden_size, cfg.hidden_size, False, dtype)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        write_index: torch.Tensor,
        mask: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        onnx_ops: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        b, s, _ = x.shape
        q, k, v = self.qkv(self.input_norm(x)).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(b, s, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(b, s, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(b, s, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        q = rotary.apply_rotary(q, cos, sin, cfg.rotary_dim, onnx_ops)
        k = rotary.apply_rotary(k, cos, sin, cfg.rotary_dim, onnx_ops)  # the cache holds K after RoPE
        k_cache = write_cache(k_cache, k, write_index, onnx_ops)
        v_cache = write_cache(v_cache, v, write_index, onnx_ops)
        scale = cfg.head_dim**-0.5  # the original's layer_number scaling cancels out
        if onnx_ops:
            attn = torch.onnx.ops.attention(q, k_cache, v_cache, mask, scale=scale)[0]
        else:
            attn = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, scale=scale, enable_gqa=True)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, s, cfg.q_size))
        gate, up = self.gate_up(self.post_attn_norm(x)).chunk(2, dim=-1)
        x = x + self.down(F.silu(gate) * up)
        return x, k_cache, v_cache


MATMUL_MODULES = ("qkv", "o_proj", "gate_up", "down", "lm_head")


def is_matmul_weight(name: str) -> bool:
    """Whether a canonical tensor is a :class:`Linear` weight, stored transposed in the model and the graph."""
    parts = name.split(".")
    return parts[-1] == "weight" and parts[-2] in MATMUL_MODULES


def write_cache(cache: torch.Tensor, new: torch.Tensor, write_index: torch.Tensor, onnx_ops: bool) -> torch.Tensor:
    """Write ``new`` [b, g, s, d] into ``cache`` [b, g, cache_len, d] at slots ``write_index[b] + 0..s-1``.

    Eagerly this is an in-place ``scatter_`` (no copy of the cache per step). Exported, it is ONNX
    ``TensorScatter`` (opset 24), which TensorRT maps to its KV-cache-update layer and ONNX Runtime runs in
    place when the same buffer is bound as input and output.
    """
    if onnx_ops:
        return torch.onnx.ops.symbolic(
            "::TensorScatter", [cache, new, write_index], attrs={"axis": 2},
            dtype=cache.dtype, shape=cache.shape, version=24,
        )
    b, g, s, d = new.shape
    slots = write_index.view(b, 1, 1, 1) + torch.arange(s, device=new.device).view(1, 1, s, 1)
    return cache.scatter_(2, slots.expand(b, g, s, d), new)


class GLM4(nn.Module):
    """The whole model. Parameter names are the canonical names of ``checkpoint.py``; ``Linear`` weights are
    stored transposed (``[in, out]``), see :class:`Linear`. Tied embeddings load the embedding's transpose
    into ``lm_head``."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, onnx_ops: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.onnx_ops = onnx_ops
        # _weight skips nn.Embedding's random init: at 151552 x 4096 that is seconds and 2.5 GB touched for nothing.
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                  _weight=torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype))
        self.layers = nn.ModuleList(Layer(cfg, dtype) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, dtype)
        # Not a parameter: the checkpoints' stored inv_freq ignores rope_ratio, so it is always recomputed.
        self.register_buffer("inv_freq", rotary.inv_freq(cfg), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        logits_index: torch.Tensor,
        *cache: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """One step: prefill (seq > 1) or decode (seq == 1).

        Args:
            input_ids: ``[batch, seq]`` int64.
            position_ids: ``[batch, seq]`` int64; ``position_ids[:, 0]`` is also where this step's K/V go.
            logits_index: ``[batch, k]`` int64, which of the ``seq`` positions to return logits for (the last
                real token when decoding; all positions when scoring text).
            cache: ``past_key_0, past_value_0, past_key_1, ...``, each ``[batch, kv_heads, cache_len, head_dim]``.

        Returns:
            ``(logits [batch, k, vocab] float32, present_key_0, present_value_0, ...)``; eagerly the presents
            are the same tensors as the inputs, updated in place.
        """
        cfg = self.cfg
        if len(cache) != 2 * cfg.num_layers:
            raise ValueError(f"expected {2 * cfg.num_layers} cache tensors, got {len(cache)}")
        x = self.embed(input_ids)
        cos, sin = rotary.cos_sin(position_ids, self.inv_freq, self.dtype)
        write_index = position_ids[:, 0]
        cache_len = cache[0].shape[2]
        slots = torch.arange(cache_len, device=input_ids.device)
        mask = (slots.view(1, 1, 1, cache_len) <= position_ids.unsqueeze(1).unsqueeze(-1))  # [b, 1, s, cache]
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, write_index, mask, cache[2 * i], cache[2 * i + 1], self.onnx_ops)
            presents += [k, v]
        gather = logits_index.unsqueeze(-1).expand(-1, -1, cfg.hidden_size)
        x = torch.gather(x, 1, gather)
        logits = self.lm_head(self.final_norm(x)).float()
        return (logits, *presents)

    def new_cache(self, batch: int, cache_len: int) -> list[torch.Tensor]:
        """Zeroed cache buffers ``[batch, kv_heads, cache_len, head_dim]`` in the model dtype, K and V per layer."""
        shape = (batch, self.cfg.num_kv_heads, cache_len, self.cfg.head_dim)
        device = self.embed.weight.device
        return [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(2 * self.cfg.num_layers)]
