"""Quantization of an exported graph: one module per concern.

- :mod:`glm_export.quantize.rewrite`: options, per-channel int8/fp8 weights, SmoothQuant, and the ONNX rewrite of
  every MatMul (Q/DQ for TensorRT, MatMulInteger / MatMulNBits for ONNX Runtime); :func:`quantize_into` is the
  whole-model path.
- :mod:`glm_export.quantize.int4`: int4 block quantization, AWQ scale search and clip search.
- :mod:`glm_export.quantize.kv`: the KV-cache dtype (int8 / fp8 cache) and its ranges.
- :mod:`glm_export.quantize.stream`: the same rewrite one decoder layer at a time for models that do not fit in
  memory twice (GLM-4-9B on a 24 GB host).

Calibration (:mod:`glm_export.calibrate`) and the layer-at-a-time runner (:mod:`glm_export.layerwise`) stay at the
package top: the accuracy report uses them too.
"""
