"""The int4 kernel's weights moved onto transparent huge pages (runtime/csrc/hugepages.c).

What must hold: only an unmodified private mapping of a file is ever moved (its pages are then dropped, which loses
nothing: they fault back in from the file); anything else (anonymous memory, a page written in place) is left
alone; the moved copy holds the same bytes, so an engine computes the same logits bit for bit with and without it;
and a copy goes away with its session.
"""

from __future__ import annotations

import ctypes
import mmap
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from glm_runtime import cpu_kernel

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages are a Linux path")


class Source(ctypes.Structure):
    _fields_ = [("path", ctypes.c_char * 4096), ("dev", ctypes.c_ulonglong), ("ino", ctypes.c_ulonglong),
                ("offset", ctypes.c_longlong), ("bytes", ctypes.c_size_t)]


def unmovable_why() -> str | None:
    """Why this host cannot move weights, read independently of the library: THP off, or no pagemap to read."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "no /sys/kernel/mm/transparent_hugepage"
    if "[never]" in mode:
        return "transparent huge pages are off here (never)"
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.read(8)
    except OSError:
        return "/proc/self/pagemap is not readable here"
    return None


@pytest.fixture
def lib() -> ctypes.CDLL:
    kernel = cpu_kernel.load(2)
    if kernel is None:
        pytest.skip("the kernel does not run on this CPU (no AVX2) or is not built")
    why = unmovable_why()
    if why:
        pytest.skip(f"weights cannot move onto huge pages on this host: {why}")
    kernel.lib.glm_huge_source.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(Source)]
    yield kernel.lib
    kernel.lib.glm_huge_select(1)


def address(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def test_only_unwritten_file_pages_are_moved(lib: ctypes.CDLL, tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8)
    path = tmp_path / "weights.bin"
    path.write_bytes(data.tobytes())
    with path.open("rb") as f:
        m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = address(m)
    src = Source()
    # a clean private file mapping (as ONNX Runtime maps external initializers): the file and offset are found
    assert lib.glm_huge_source(base + 8192 + 5, 100000, ctypes.byref(src)) == 1
    assert Path(src.path.decode()).resolve() == path.resolve() and src.offset == 8192 + 5 and src.bytes == 100000
    assert lib.glm_huge_source(base, len(data), ctypes.byref(src)) == 1
    # a range running past its mapping, or turned off: no
    assert lib.glm_huge_source(base + len(data) - 10, 4096, ctypes.byref(src)) == 0
    lib.glm_huge_select(0)
    assert lib.glm_huge_source(base, len(data), ctypes.byref(src)) == 0
    lib.glm_huge_select(1)
    # one byte written in place (a copy-on-write page, not the file's any more): dropping it would lose it
    m[(2 << 20) + 7] = 1
    assert lib.glm_huge_source(base, len(data), ctypes.byref(src)) == 0
    assert lib.glm_huge_source(base, 1 << 20, ctypes.byref(src)) == 1  # the pages before it are still clean
    # anonymous memory: never
    anon = np.ones(1 << 20, np.uint8)
    assert lib.glm_huge_source(anon.ctypes.data, anon.nbytes, ctypes.byref(src)) == 0
    del anon
    m.close()


PROMPT = [151331, 151333, 9703, 3837, 24718, 11, 100, 2000, 13, 512, 77, 3]


def run(engine: object, steps: int) -> np.ndarray:
    cache = engine.allocate(1, 64)
    rows = [engine.step(cache, np.array([PROMPT]), np.arange(len(PROMPT))[None],
                        np.array([[len(PROMPT) - 1]])).copy()]
    tok = int(rows[0][0].argmax())
    for i in range(steps):
        rows.append(engine.step(cache, np.array([[tok]]), np.array([[len(PROMPT) + i]]),
                                np.zeros((1, 1), np.int64)).copy())
        tok = int(rows[-1][0].argmax())
    return np.concatenate(rows)


def int4_bytes(artifact: Path) -> tuple[int, int]:
    """What the kernel should move: the packed weights and block scales of each MatMulNBits node whose two tensors
    are both in the external data file (mapped by ONNX Runtime); and how many nodes stay (a tensor inside
    model.onnx, copied into ONNX Runtime's own memory)."""
    import onnx

    m = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    sizes = {t.name: int(np.prod(t.dims)) * (1 if t.data_type == onnx.TensorProto.UINT8 else 4)
             for t in m.graph.initializer}
    external = {t.name for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    nodes = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    moved = [n for n in nodes if {n.input[1], n.input[2]} <= external]
    return sum(sizes[n.input[1]] + sizes[n.input[2]] for n in moved), len(nodes) - len(moved)


def test_engine_moves_its_weights_and_computes_the_same(lib: ctypes.CDLL, tiny_checkpoint: Path,
                                                        tmp_path: Path) -> None:
    """The tiny int4 artifact: after its first steps every MatMulNBits node reads a huge-page copy (the counter
    reaches exactly the artifact's int4 bytes), the logits before, during and after the switch are bit-identical
    to an engine that never moves, and the copies are gone with the engine."""
    import gc

    import onnx

    from glm_export.build import build_artifact
    from glm_export.quantize.rewrite import QuantOptions
    from glm_runtime.api import load

    built = tmp_path / "built"
    build_artifact(tiny_checkpoint, built, "int4", validate=False, backend="onnxruntime",
                   quant=QuantOptions(calib_samples=8, calib_seq_len=64, accuracy_samples=0, weight_method="rtn"))
    # the tiny model's weights are small enough to sit inside model.onnx, where ONNX Runtime copies them into its
    # own (anonymous) memory: nothing to move. Written as external data, as a 9B artifact is, they are mapped.
    art = tmp_path / "int4"
    shutil.copytree(built, art)
    onnx.save(onnx.load(str(built / "model.onnx")), str(art / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=1024)
    expected, inline = int4_bytes(art)
    assert expected > 6e6 and inline > 0  # both kinds present: the one that moves, the one that must not
    before = int(lib.glm_huge_bytes())
    plain = load(art, threads=2, verify="none", hugepages=False).engine
    want = run(plain, 6)
    assert int(lib.glm_huge_bytes()) == before  # hugepages=False: nothing moved
    del plain
    gc.collect()
    engine = load(art, threads=2, verify="none", hugepages=True).engine
    got = [run(engine, 6)]
    deadline = time.monotonic() + 30
    while int(lib.glm_huge_bytes()) - before < expected and time.monotonic() < deadline:
        got.append(run(engine, 6))  # each run drops what the copier finished since the last
        time.sleep(0.05)
    assert int(lib.glm_huge_bytes()) - before == expected and int(lib.glm_huge_pending()) == 0
    assert engine.settle() < 1.0  # nothing left to wait for
    got.append(run(engine, 6))  # all on the copies now
    for g in got:
        np.testing.assert_array_equal(g, want)
    del engine
    gc.collect()
    assert int(lib.glm_huge_bytes()) == before


def test_the_switch_comes_from_the_argument_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu_kernel.HUGEPAGES_ENV, raising=False)
    assert cpu_kernel.resolve_hugepages(None) is True
    monkeypatch.setenv(cpu_kernel.HUGEPAGES_ENV, "0")
    assert cpu_kernel.resolve_hugepages(None) is False and cpu_kernel.resolve_hugepages(True) is True
    monkeypatch.setenv(cpu_kernel.HUGEPAGES_ENV, "yes")
    with pytest.raises(ValueError, match="GLM_RUNTIME_HUGEPAGES must be 0 or 1"):
        cpu_kernel.resolve_hugepages(None)


def test_the_default_kv_budget_leaves_the_copies_to_come(monkeypatch: pytest.MonkeyPatch) -> None:
    """The int4 weights' file pages count as available memory until their anonymous copies replace them: the
    default KV budget is taken from what is available less the bytes still queued for a copy."""
    from glm_runtime import engine as engine_module

    class Copying:
        def memory_reserved(self) -> int:
            return 4 << 30

    monkeypatch.setattr(engine_module, "available_memory_bytes", lambda: 20 << 30)
    fraction = engine_module.DEFAULT_BUDGET_FRACTION
    assert engine_module.default_budget_bytes() == int(fraction * (20 << 30))
    assert engine_module.default_budget_bytes(Copying()) == int(fraction * (16 << 30))
    assert engine_module.default_budget_bytes(object()) == int(fraction * (20 << 30))  # engines without copies
