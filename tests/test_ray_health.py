"""GLMReplica.check_health (what Serve calls every health_check_period_s) on a scheduler over a scripted engine,
without Ray: it runs the engine when idle, passes on progress when busy, and fails when the engine fails or its
thread is gone."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from glm_runtime.manifest import model_config, read_manifest
from glm_runtime.scheduler import Scheduler
from tests.test_server import ScriptedRowEngine

ray_app = pytest.importorskip("glm_runtime.ray_app")


class FailingEngine(ScriptedRowEngine):
    def step(self, cache, input_ids, position_ids, logits_index) -> np.ndarray:
        raise RuntimeError("device lost")


def replica(engine: ScriptedRowEngine) -> SimpleNamespace:
    """What check_health reads of a GLMReplica: its scheduler and the progress seen at the last check."""
    return SimpleNamespace(scheduler=Scheduler(engine, max_concurrency=2, max_queue=0, kv_budget_bytes=1 << 28),
                           _progress=-1)


def check(r: SimpleNamespace) -> None:
    asyncio.run(ray_app.GLMReplica.check_health(r))


def test_health_runs_the_engine_when_idle_and_fails_with_it(tiny_artifact: Path) -> None:
    config = model_config(read_manifest(tiny_artifact, verify="none"))
    ok = replica(ScriptedRowEngine(config))
    try:
        check(ok)
        check(ok)
        assert ok.scheduler.stats.submitted == 2 and ok.scheduler.stats.finished == {"length": 2}  # two probes
    finally:
        ok.scheduler.close()
    with pytest.raises(RuntimeError, match=r"engine thread has stopped|scheduler is closed"):
        check(ok)

    bad = replica(FailingEngine(config))
    try:
        with pytest.raises(RuntimeError, match=r"the engine failed a one-token probe: .*device lost"):
            check(bad)
    finally:
        bad.scheduler.close()
