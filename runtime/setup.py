"""The one compiled part of glm-runtime, one ONNX Runtime custom-op library (glm_runtime/cpu_kernel.py): ONNX
Runtime's int4 MatMulNBits (csrc/q4_matmul.c, its weights moved onto huge pages by csrc/hugepages.c) and ONNX's
Attention (csrc/attention.c) done faster on x86 CPUs.
Optional: without a C compiler the install still succeeds and the runtime uses ONNX Runtime's own kernels
(``glm-runtime env`` says which)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "glm_runtime._q4_matmul",
    sources=["csrc/q4_matmul.c", "csrc/attention.c", "csrc/hugepages.c"],
    depends=["csrc/ort_abi.h", "csrc/hugepages.h"],
    extra_compile_args=["-O3", "-std=c11", "-D_GNU_SOURCE", "-pthread", "-fvisibility=default"],
    extra_link_args=["-pthread"],
    optional=True,
)])
