"""GLM-4's rotary position embedding, in one place.

Three details make or break GLM-4 numerics (see ``docs/model.md``), and each is here once:
- only the first ``rotary_dim`` (= head_dim / 2) dims of a head are rotated; the rest pass through;
- pairs are *interleaved* (dims 0&1, 2&3, ...), GPT-J style, not half-split like Llama;
- the base is ``10000 * rope_ratio`` (5e6 for glm-4-9b-chat), already folded into ``ModelConfig.rope_base``.

Angles are computed from each token's position id in fp32 and then cast to the model dtype, as the original
THUDM code does, so bf16 results match it. In the exported graph the same cos/sin feed ONNX's
``RotaryEmbedding`` (opset 23, ``interleaved=1``), which ONNX Runtime and TensorRT both run as one kernel;
computing them in-graph from ``position_ids`` avoids a ``max_position x rotary_dim/2`` table constant
(16 MB for 128K context, 128 MB for the 1M model).
"""

from __future__ import annotations

import torch

from glm_runtime.config import ModelConfig


def inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """``base^(-2i/rotary_dim)`` for i in [0, rotary_dim/2), fp32."""
    exponents = torch.arange(0, cfg.rotary_dim, 2, dtype=torch.float32) / cfg.rotary_dim
    return 1.0 / (cfg.rope_base**exponents)


def cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape ``[batch, seq, rotary_dim/2]`` for the given positions, computed in fp32."""
    angles = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, onnx_op: bool) -> torch.Tensor:
    """Rotate ``x`` of shape ``[batch, heads, seq, head_dim]``.

    With ``onnx_op`` the computation is ``torch.onnx.ops.rotary_embedding`` so the exporter emits a single
    ``RotaryEmbedding`` node; eagerly the explicit math below is used (it is the readable reference and
    faster than the op's eager fallback).
    """
    if onnx_op:
        return torch.onnx.ops.rotary_embedding(x, cos, sin, interleaved=True, rotary_embedding_dim=rotary_dim)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    even, odd = rot[..., 0::2], rot[..., 1::2]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    rotated = torch.stack((even * c - odd * s, odd * c + even * s), dim=-1).flatten(-2)
    return torch.cat((rotated, rest), dim=-1)
