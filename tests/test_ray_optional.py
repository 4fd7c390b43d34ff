"""Ray is optional: without it the runtime (CLI, server, API) imports and works as before, and ``serve --ray`` says
how to install it. With it, the deployment options follow the scheduler's limits. No Ray instance is started here
(tests/test_ray_serve.py does that)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

BLOCK_RAY = textwrap.dedent("""
    import sys
    class _NoRay:
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                raise ModuleNotFoundError("No module named 'ray'", name="ray")
            return None
    sys.meta_path.insert(0, _NoRay())
""")


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK_RAY + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_runtime_without_ray_imports_nothing_of_it(tmp_path: Path) -> None:
    r = run_python(f"""
        import glm_runtime, glm_runtime.cli, glm_runtime.server, glm_runtime.scheduler
        from typer.testing import CliRunner
        runner = CliRunner()
        help_ = runner.invoke(glm_runtime.cli.app, ["serve", "--help"])
        assert help_.exit_code == 0 and "--ray" in help_.output, help_.output
        res = runner.invoke(glm_runtime.cli.app, ["serve", {str(tmp_path)!r}, "--ray", "--verify", "none"])
        print("EXIT", res.exit_code)
        print(res.output)
        assert not [m for m in sys.modules if m == "ray" or m.startswith("ray.")]
    """)
    assert r.returncode == 0, r.stderr
    assert "EXIT 1" in r.stdout
    assert "pip install 'glm-runtime[ray]'" in " ".join(r.stdout.split())


def test_importing_the_runtime_does_not_import_ray() -> None:
    code = "import sys, glm_runtime.cli, glm_runtime.server; print(sorted(m for m in sys.modules if m == 'ray'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


# ---- with ray installed: options, no cluster --------------------------------------------------------------
def test_deployment_options_follow_the_scheduler() -> None:
    ray_app = pytest.importorskip("glm_runtime.ray_app")
    cfg = ray_app.ReplicaConfig("/art", max_concurrency=4, max_queue=12, threads=2)
    opts = ray_app.deployment_options(cfg, replicas=3)
    assert opts["max_ongoing_requests"] == 16 and opts["num_replicas"] == 3
    assert opts["ray_actor_options"] == {"num_cpus": 2.0}
    assert opts["request_router_config"].request_router_class == ray_app.AFFINITY_ROUTER
    auto = ray_app.deployment_options(cfg, replicas=3, autoscale=(1, 8), router="pow2")
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 8, "initial_replicas": 3,
                                         "target_ongoing_requests": 4}
    assert auto["request_router_config"].request_router_class == ray_app.DEFAULT_ROUTER
    for bad in [dict(replicas=0), dict(autoscale=(3, 2)), dict(router="random")]:
        with pytest.raises(ValueError):
            ray_app.deployment_options(cfg, **bad)
    with pytest.raises(ValueError, match="MIN:MAX"):
        ray_app.parse_autoscale("4")


def test_app_builder_parses_serve_run_arguments() -> None:
    ray_app = pytest.importorskip("glm_runtime.ray_app")
    cfg = ray_app.ReplicaConfig.from_args({"artifact": "/a", "max_concurrency": "3", "kv_budget_gb": "1.5",
                                           "providers": "CPUExecutionProvider", "model_name": "none"})
    assert (cfg.max_concurrency, cfg.kv_budget_gb, cfg.providers, cfg.model_name) == (
        3, 1.5, ["CPUExecutionProvider"], None)
    with pytest.raises(ValueError, match="unknown replica option"):
        ray_app.ReplicaConfig.from_args({"artifact": "/a", "max_concurency": "3"})
    with pytest.raises(ValueError, match="artifact=PATH"):
        ray_app.ReplicaConfig.from_args({})
    built = ray_app.app({"artifact": "/a", "replicas": "2", "router": "pow2", "num_cpus": "0.5"})
    deployment = built._bound_deployment
    assert deployment.name == ray_app.DEPLOYMENT_NAME and deployment.num_replicas == 2
    assert deployment.ray_actor_options["num_cpus"] == 0.5
