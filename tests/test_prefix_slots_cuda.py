"""The prefix cache's device <-> host slot copies (engine_trt.copy_slots_to_host / _from_host, used by the
TensorRT engine and ONNX Runtime on CUDA) checked without a GPU: cudart's strided 2-D copy is emulated on host
memory, so the pointer arithmetic (row, head pitch, start slot) is what is tested."""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np
import pytest

from glm_runtime import engine_trt


class FakeCudart:
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyDeviceToHost=2, cudaMemcpyHostToDevice=1)

    @staticmethod
    def cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, kind, stream):
        for h in range(height):
            ctypes.memmove(dst + h * dpitch, src + h * spitch, width)
        return (0,)

    @staticmethod
    def cudaStreamSynchronize(stream):
        return (0,)


def test_slot_copies_address_the_right_row_heads_and_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_trt, "_cudart", lambda: FakeCudart)
    rows, heads, cache_len, dim = 3, 2, 16, 4
    device = np.arange(rows * heads * cache_len * dim, dtype=np.float16).reshape(rows, heads, cache_len, dim)
    out = np.empty((heads, 5, dim * 2), np.uint8)
    engine_trt.copy_slots_to_host(device.ctypes.data, heads, cache_len, 1, 7, out)
    np.testing.assert_array_equal(out.view(np.float16), device[1, :, 7:12])
    engine_trt.copy_slots_from_host(device.ctypes.data, heads, cache_len, 2, 3, out)
    np.testing.assert_array_equal(device[2, :, 3:8], device[1, :, 7:12])
    assert device[2, :, :3].tolist() == np.arange(rows * heads * cache_len * dim, dtype=np.float16).reshape(
        rows, heads, cache_len, dim)[2, :, :3].tolist()  # nothing outside the slots written
