"""glm-export: GLM-4 checkpoints to ONNX, quantized graphs and TensorRT engines (the build side).

Layers, bottom to top: ``glm_runtime.config`` (shapes) -> ``checkpoint`` / ``model`` / ``rotary`` ->
``export`` / ``random_model`` -> ``build`` -> ``cli``. Nothing here is imported by ``glm_runtime``.
"""

__version__ = "0.1.0"
