"""Refuse weights that cannot be right: NaN or infinite values, and (optionally) magnitudes no trained model has.

Why: one NaN in a checkpoint tensor exported cleanly and the runtime then emitted one constant token with no
warning (issue 19, D8); an Inf surfaced only as "validation failed: max |logit diff| nan". Every tensor read from a
checkpoint (:meth:`glm_export.checkpoint.Checkpoint.tensor`) passes through :func:`check_tensor`, which costs one
pass over memory the read touches anyway, and the error names the checkpoint tensor and the first bad position so
the user can tell a corrupt download (re-download that shard) from a diverged training run.
"""

from __future__ import annotations

import torch


class WeightError(ValueError):
    """A checkpoint tensor holds values that cannot be exported; the message names the tensor and position."""


CHECK_CHUNK = 1 << 24  # elements per step of the scan of a large tensor


def check_tensor(name: str, t: torch.Tensor, max_abs: float | None = None, where: str = "") -> None:
    """Raise :class:`WeightError` if ``t`` has a non-finite value, or one whose magnitude exceeds ``max_abs``.

    Large tensors are scanned in chunks first: on a bf16 tensor ``isfinite`` of the whole costs several times its
    size in temporaries (GLM-4-9B's 1.24 GB output layer: RSS +3.4 GB, the streamed quantize step's peak; measured);
    only a tensor with a bad value takes the whole-tensor path below, which says where."""
    flat = t.reshape(-1)
    if flat.numel() > CHECK_CHUNK:
        clean = True
        for i in range(0, flat.numel(), CHECK_CHUNK):
            c = flat[i:i + CHECK_CHUNK]
            if not bool(torch.isfinite(c).all()) or (max_abs is not None and bool((c.abs() > max_abs).any())):
                clean = False
                break
        if clean:
            return
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = ~finite
        count = int(bad.sum())
        pos = [int(i) for i in bad.nonzero()[0]]
        value = float(t[tuple(pos)])
        raise WeightError(f"checkpoint tensor {name}{where} has {count} non-finite value{'s' * (count > 1)} (first: "
                          f"{value} at index {pos} of shape {list(t.shape)}): the checkpoint is corrupt or the model "
                          f"diverged; re-download or re-convert it (glm-export refuses to build from it)")
    if max_abs is not None and t.numel():
        big = t.abs() > max_abs
        if bool(big.any()):
            pos = [int(i) for i in big.nonzero()[0]]
            raise WeightError(f"checkpoint tensor {name}{where} has {int(big.sum())} value(s) beyond "
                              f"--max-weight-abs {max_abs:g} (first: {float(t[tuple(pos)]):g} at index {pos} of "
                              f"shape {list(t.shape)}): check the checkpoint, or raise the limit if it is genuine")
