"""Probe: build a TensorRT(-RTX) engine of an artifact with its weights as network inputs (a weightless plan).

Not a feature yet (docs/memory.md, "TensorRT(-RTX) engines"): the engine builder holds ~3.9x the fp16 weights
when they are constants, so a GLM-4-9B engine cannot be built on a 24 GB host, and TensorRT-RTX's weight-stripped
plans need a GPU at build time. Declaring every large initializer a network input instead leaves the builder
nothing to hold: the plan is kernels and shapes only, and a runtime would bind the artifact's weight tensors
(uploaded to the GPU once) like the KV-cache buffers. Whether TensorRT fuses and tiles those GEMMs as well as
with constant weights can only be measured on a GPU; this script measures the build side.

    python scripts/trt_weightless_probe.py ARTIFACT OUT [--precision fp16] [--backend tensorrt-rtx]

OUT gets a ``model.onnx`` with the weights as inputs, links to ARTIFACT's other files, and
``engine/<backend>/model.engine``; ARTIFACT is not modified. Prints the engine's size, build time, peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import onnx

from glm_export import engine

MIN_ELEMENTS = 4096  # smaller initializers (norm weights, scales, rotary tables) stay constants


def weights_as_inputs(src: Path, dst: Path) -> int:
    """Write ``dst/model.onnx`` with every initializer of >= MIN_ELEMENTS elements as a graph input; link the rest
    of ``src``. Returns the number of weight elements moved."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in ("engine", "model.onnx"):
            (dst / f.name).symlink_to(f.resolve())
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    moved, keep = 0, []
    for init in model.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        if n >= MIN_ELEMENTS:
            model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
            moved += n
        else:
            keep.append(init)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    (dst / "model.onnx").write_bytes(model.SerializeToString())
    return moved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "int8", "fp8", "int4"])
    ap.add_argument("--backend", default="tensorrt-rtx", choices=["tensorrt-rtx", "tensorrt"])
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--max-prefill", type=int, default=512)
    args = ap.parse_args()
    if not (args.artifact / "model.onnx").is_file():
        sys.exit(f"error: {args.artifact} has no model.onnx (give a glm-export artifact)")
    moved = weights_as_inputs(args.artifact, args.out)
    print(f"{moved / 1e9:.2f} B weight elements are network inputs")

    builtin_profile = engine._profile

    def profile_of_dynamic_inputs(builder: Any, network: Any, spec: Any, max_seq: int, opt_seq: int) -> Any:
        """The build's own profiles, over the inputs with dynamic dimensions only (the weights are static)."""

        class Dynamic:
            def __init__(self) -> None:
                self.inputs = [t for t in (network.get_input(i) for i in range(network.num_inputs))
                               if -1 in tuple(t.shape)]
                self.num_inputs = len(self.inputs)

            def get_input(self, i: int) -> Any:
                return self.inputs[i]

        return builtin_profile(builder, Dynamic(), spec, max_seq, opt_seq)

    engine._profile = profile_of_dynamic_inputs
    spec = engine.EngineSpec(backend=args.backend, max_batch=1, max_context=args.max_context,
                             max_prefill=args.max_prefill)
    t0 = time.perf_counter()
    entry = engine.build_engine(args.out, spec, args.precision, args.max_context)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"{args.precision} engine: {entry['bytes'] / 1e6:.1f} MB, built in {time.perf_counter() - t0:.1f} s, "
          f"peak RSS {peak:.2f} GB (this process)")


if __name__ == "__main__":
    main()
