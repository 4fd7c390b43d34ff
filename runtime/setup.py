"""The one compiled part of glm-runtime: csrc/q4_matmul.c, ONNX Runtime's int4 MatMulNBits done faster on x86 CPUs
(glm_runtime/cpu_kernel.py). Optional: without a C compiler the install still succeeds and the runtime uses ONNX
Runtime's own kernel (``glm-runtime env`` says which)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "glm_runtime._q4_matmul",
    sources=["csrc/q4_matmul.c"],
    extra_compile_args=["-O3", "-std=c11", "-D_GNU_SOURCE", "-pthread", "-fvisibility=default"],
    extra_link_args=["-pthread"],
    optional=True,
)])
