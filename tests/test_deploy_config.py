"""docs/deploy/: the Serve config and the KubeRay RayService validate against Ray Serve's own config schema, build
the app they name (the builder accepts every argument), and agree with each other, the Dockerfile and the pinned
Ray version. No cluster is started."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
schema = pytest.importorskip("ray.serve.schema")
ray_app = pytest.importorskip("glm_runtime.ray_app")

DEPLOY = Path(__file__).resolve().parents[1] / "docs" / "deploy"
RUNTIME_PYPROJECT = Path(__file__).resolve().parents[1] / "runtime" / "pyproject.toml"


def check_serve_config(config: dict[str, Any]) -> Any:
    """Serve's schema, then the app each entry names, built from its args as `serve deploy` would."""
    parsed = schema.ServeDeploySchema.model_validate(config)
    for application in parsed.applications:
        assert application.import_path == "glm_runtime.ray_app:app"
        built = ray_app.app(application.args)
        deployment = built._bound_deployment
        names = {d.name for d in application.deployments}
        assert names <= {deployment.name}, f"config overrides unknown deployments {names - {deployment.name}}"
        args = application.args
        cfg = ray_app.ReplicaConfig.from_args({k: v for k, v in args.items() if k not in (
            "replicas", "autoscale", "router", "num_cpus", "shutdown_timeout")})
        assert deployment.max_ongoing_requests == cfg.max_concurrency + cfg.max_queue
        assert deployment.ray_actor_options["num_cpus"] == float(args["num_cpus"])
        if "autoscale" in args:
            auto = deployment._deployment_config.autoscaling_config
            assert (auto.min_replicas, auto.max_replicas) == ray_app.parse_autoscale(args["autoscale"])
            assert auto.target_ongoing_requests == cfg.max_concurrency
    return parsed


def test_serve_config_validates_and_builds() -> None:
    config = yaml.safe_load((DEPLOY / "serve-config.yaml").read_text())
    check_serve_config(config)
    with pytest.raises(ValueError, match="unknown replica option"):  # the check has teeth
        bad = yaml.safe_load((DEPLOY / "serve-config.yaml").read_text())
        bad["applications"][0]["args"]["max_concurency"] = 3
        check_serve_config(bad)


def test_rayservice_runs_the_same_app_with_its_volumes() -> None:
    service = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    check_serve_config(serve_config)
    local = yaml.safe_load((DEPLOY / "serve-config.yaml").read_text())
    assert serve_config["applications"][0]["args"] == local["applications"][0]["args"], (
        "rayservice.yaml's serveConfigV2 and serve-config.yaml run different apps")

    args = serve_config["applications"][0]["args"]
    for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        for path in (args["artifact"], args["api_key_file"]):
            assert any(path.startswith(m.rstrip("/") + "/") for m in mounts), f"{path} is on no volume of {group}"
        assert float(group["rayStartParams"]["num-cpus"]) >= float(args["num_cpus"]), "a replica fits no worker"
        cpu = pod["containers"][0]["resources"]["limits"]["cpu"]
        assert float(cpu) >= float(group["rayStartParams"]["num-cpus"])

    from glm_runtime.ray_proxy import CALLBACK

    spec = service["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:  # every node runs a proxy (proxy_location: EveryNode)
        for c in pod["containers"]:
            env = {e["name"]: e["value"] for e in c.get("env", [])}
            assert env.get("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH") == CALLBACK, c["name"]


def test_one_ray_version_everywhere() -> None:
    import ray

    pin = re.search(r'"ray\[serve\]>=([\d.]+),<([\d.]+)"', RUNTIME_PYPROJECT.read_text())
    assert pin, "runtime/pyproject.toml's ray extra must pin ray[serve] to a range"
    image = re.search(r"^FROM rayproject/ray:([\d.]+)-", (DEPLOY / "Dockerfile").read_text(), re.M)
    service = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    version = service["spec"]["rayClusterConfig"]["rayVersion"]
    assert image and image.group(1) == version

    def key(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split("."))

    for v in (version, ray.__version__):
        assert key(pin.group(1)) <= key(v) < key(pin.group(2)), f"ray {v} is outside the pin {pin.group(0)}"
