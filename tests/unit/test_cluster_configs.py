"""cluster/: the autoscaler YAML, KubeRay manifests and runtime envs load, validate with Ray's
own checks, agree with each other (images, Ray version, GPUs, resources) and point at job
entrypoints and configs that exist in the repo."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from cellfoundry.config import (
    CorpusJobConfig,
    EmbedJobConfig,
    PerturbJobConfig,
    PretrainJobConfig,
    TuneJobConfig,
    load_config,
)
from cellfoundry.paths import REPO_ROOT

CLUSTER = REPO_ROOT / "cluster"
AUTOSCALER = sorted((CLUSTER / "autoscaler").glob("ray-cluster.*.yaml"))
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
RUNTIME_ENVS = sorted((CLUSTER / "runtime_env").glob("*.yaml"))
IMAGE = re.compile(r"^rayproject/ray:(?P<ray>[\d.]+)-(?P<py>py3\d+)-(?P<kind>cpu|gpu|cu\d+)$")
JOB_CONFIGS = {
    "corpus": CorpusJobConfig,
    "pretrain": PretrainJobConfig,
    "embed": EmbedJobConfig,
    "perturb": PerturbJobConfig,
    "tune": TuneJobConfig,
}
KUBERAY_NAME = {"RayCluster": "ray-cluster.", "RayJob": "ray-job.", "RayService": "ray-service."}


def _load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path}: not a YAML mapping"
    return doc


def _torch_pin() -> str:
    pins = [
        line
        for line in (REPO_ROOT / "constraints.txt").read_text().splitlines()
        if line.startswith("torch==")
    ]
    assert len(pins) == 1
    return pins[0]


def _check_images(images: list[str], where: str) -> set[str]:
    """All images: rayproject/ray with the installed Ray version and one Python tag."""
    kinds, pys = set(), set()
    for image in images:
        m = IMAGE.match(image)
        assert m, f"{where}: image {image!r} is not rayproject/ray:<ray>-py3XX-<cpu|gpu>"
        assert m["ray"] == ray.__version__, (
            f"{where}: {image} but Ray {ray.__version__} is installed"
        )
        kinds.add(m["kind"])
        pys.add(m["py"])
    assert len(pys) == 1, f"{where}: images mix Python versions {pys}"
    return kinds


def test_cluster_folder_is_complete() -> None:
    assert [p.name for p in AUTOSCALER] == ["ray-cluster.cpu-gpu.yaml"]
    names = {p.name for p in KUBERAY}
    assert {
        "ray-cluster.cpu-gpu.yaml",
        "ray-service.serve.yaml",
        "ray-job.corpus.yaml",
        "ray-job.pretrain.yaml",
    } <= names
    assert {p.name for p in RUNTIME_ENVS} >= {"local.yaml", "cluster.yaml"}


# --- runtime envs --------------------------------------------------------------------------


def _check_runtime_env(env: dict[str, Any], where: str) -> None:
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray's own validation of every field
    env_vars = env["env_vars"]
    assert env_vars["PYTHONPATH"] == "platform", (
        f"{where}: workers must import the uploaded platform/"
    )
    assert (REPO_ROOT / env_vars["PYTHONPATH"] / "cellfoundry" / "__init__.py").is_file()
    assert "CELLFOUNDRY_SHARED" in env_vars, (
        f"{where}: set CELLFOUNDRY_SHARED for the {{shared}} paths"
    )
    packages = env.get("pip", {}).get("packages", [])
    if packages:
        assert packages[0] == _torch_pin(), f"{where}: pin {_torch_pin()} first in the pip list"
        assert not any(re.match(r"^(ray|cellfoundry)\b", p) for p in packages), where


@pytest.mark.parametrize("path", RUNTIME_ENVS, ids=lambda p: p.name)
def test_runtime_env(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)  # working_dir "." is the repo root
    env = _load(path)
    assert env["working_dir"] == "."
    _check_runtime_env(env, str(path))
    assert {".venv", "artifacts", "bench/out"} <= set(env["excludes"])


def test_bare_cluster_pip_list_covers_the_package_dependencies() -> None:
    import tomllib

    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\[<>=~!; ]", d, maxsplit=1)[0].lower() for d in deps} - {"ray"}
    packages = _load(CLUSTER / "runtime_env" / "cluster.yaml")["pip"]["packages"]
    listed = {re.split(r"[\[<>=~!; ]", p, maxsplit=1)[0].lower() for p in packages}
    assert names <= listed, f"add {sorted(names - listed)} to cluster/runtime_env/cluster.yaml"


# --- ray up (autoscaler) -------------------------------------------------------------------


def _install_order(commands: list[str], where: str) -> None:
    pips = [c for c in commands if "pip install" in c]
    assert pips, f"{where}: no pip install in the setup commands"
    assert _torch_pin() in pips[0], f"{where}: install {_torch_pin()} first"
    package = [i for i, c in enumerate(pips) if "cellfoundry" in c and "constraints.txt" in c]
    assert package and package[0] > 0, (
        f"{where}: install the package (with -c constraints.txt) after torch"
    )


@pytest.mark.parametrize("path", AUTOSCALER, ids=lambda p: p.name)
def test_autoscaler_config(path: Path) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(path)
    validate_config(prepare_config(raw))  # Ray's schema and checks, with the provider defaults
    types = raw["available_node_types"]
    assert raw["file_mounts"].get("~/cellfoundry") == "."
    default_image = raw["docker"]["image"]
    images = [default_image]
    for name, node in types.items():
        where = f"{path.name}: {name}"
        assert (
            node.get("min_workers", 0) <= node.get("max_workers", 0)
            or name == raw["head_node_type"]
        ), where
        image = node.get("docker", {}).get("worker_image", default_image)
        images.append(image)
        gpus = node["resources"].get("GPU", 0)
        kind = IMAGE.match(image)["kind"] if IMAGE.match(image) else ""
        assert (gpus > 0) == (kind != "cpu"), (
            f"{where}: GPU nodes need the GPU image, CPU nodes the CPU one"
        )
        if name == raw["head_node_type"]:
            commands = raw["setup_commands"] + raw["head_setup_commands"]
        else:
            commands = raw["setup_commands"] + node.get(
                "worker_setup_commands", raw.get("worker_setup_commands", [])
            )
        _install_order(commands, where)
    _check_images(images, path.name)
    pools = {n: t for n, t in types.items() if n != raw["head_node_type"]}
    assert any(
        t["resources"].get("GPU", 0) == 0 and t["max_workers"] > 0 for t in pools.values()
    ), "a CPU pool"
    assert any(t["resources"].get("GPU", 0) >= 8 for t in pools.values()), "an 8-GPU pool"
    assert any(t["resources"].get("GPU", 0) == 1 for t in pools.values()), "a 1-GPU pool"
    assert sum(t["max_workers"] for t in pools.values()) <= raw["max_workers"]


# --- KubeRay -------------------------------------------------------------------------------


def _groups(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("head", cluster["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster["workerGroupSpecs"]
    ]


def _check_ray_cluster_spec(spec: dict[str, Any], where: str) -> list[dict[str, float]]:
    """Checks one RayCluster spec; returns the worker groups' pods as resources with max counts."""
    assert spec["rayVersion"] == ray.__version__, (
        f"{where}: rayVersion != installed Ray {ray.__version__}"
    )
    images, pods = [], []
    for name, group in _groups(spec):
        params = {k: str(v) for k, v in group.get("rayStartParams", {}).items()}
        containers = group["template"]["spec"]["containers"]
        ray_container = containers[0]
        images += [c["image"] for c in containers]
        limits = ray_container["resources"]["limits"]
        requests = ray_container["resources"].get("requests", limits)
        gpus = int(limits.get("nvidia.com/gpu", 0))
        assert int(requests.get("nvidia.com/gpu", 0)) == gpus, (
            f"{where}/{name}: GPU requests != limits"
        )
        assert int(params.get("num-gpus", 0)) == gpus, (
            f"{where}/{name}: rayStartParams num-gpus != nvidia.com/gpu"
        )
        if gpus:
            assert IMAGE.match(ray_container["image"])["kind"] != "cpu", (
                f"{where}/{name}: GPU group with a CPU image"
            )
        cpus = float(str(limits["cpu"]).removesuffix("m")) / (
            1000 if str(limits["cpu"]).endswith("m") else 1
        )
        if "num-cpus" in params:
            assert float(params["num-cpus"]) <= cpus, (
                f"{where}/{name}: num-cpus above the CPU limit"
            )
        if name != "head":
            assert (
                group["minReplicas"]
                <= group.get("replicas", group["minReplicas"])
                <= group["maxReplicas"]
            ), where
            pods.append(
                {
                    "CPU": float(params.get("num-cpus", cpus)),
                    "GPU": gpus,
                    "max": group["maxReplicas"],
                }
            )
    _check_images(images, where)
    return pods


def _capacity(pods: list[dict[str, float]], cpu: float, gpu: float) -> int:
    """How many {CPU: cpu, GPU: gpu} bundles the groups hold at their maximum size."""
    total = 0
    for pod in pods:
        fits = [
            pod["CPU"] // cpu if cpu else float("inf"),
            pod["GPU"] // gpu if gpu else float("inf"),
        ]
        total += int(min(fits)) * int(pod["max"]) if min(fits) != float("inf") else 0
    return total


def _check_entrypoint(entrypoint: str, where: str) -> tuple[str, Any]:
    args = shlex.split(entrypoint)
    assert args[0] == "python" and args[1].startswith("jobs/"), (
        f"{where}: entrypoint {entrypoint!r}"
    )
    assert (REPO_ROOT / args[1]).is_file(), f"{where}: {args[1]} does not exist"
    config = args[args.index("--config") + 1]
    assert (REPO_ROOT / config).is_file(), f"{where}: {config} does not exist"
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    stage = Path(args[1]).stem
    return stage, load_config(
        JOB_CONFIGS[stage], REPO_ROOT / config, sets
    ) if stage in JOB_CONFIGS else None


def _check_remote_runtime_env(env: dict[str, Any], where: str) -> None:
    assert re.match(r"^(s3|gs|https)://.+\.zip$", env["working_dir"]), (
        f"{where}: working_dir must be a remote zip"
    )
    _check_runtime_env(env, where)
    bare = _load(CLUSTER / "runtime_env" / "cluster.yaml")
    assert env["env_vars"] == bare["env_vars"], (
        f"{where}: env_vars differ from runtime_env/cluster.yaml"
    )
    assert env["pip"]["packages"] == bare["pip"]["packages"], (
        f"{where}: pip list differs from cluster.yaml"
    )


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest(path: Path) -> None:
    doc = _load(path)
    kind = doc["kind"]
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    assert path.name.startswith(KUBERAY_NAME[kind]), (
        f"{path.name}: a {kind} file is named {KUBERAY_NAME[kind]}<x>.yaml"
    )
    spec = doc["spec"]
    if kind == "RayCluster":
        assert spec["enableInTreeAutoscaling"] is True
        pods = _check_ray_cluster_spec(spec, path.name)
        assert any(p["GPU"] == 0 and p["CPU"] > 0 for p in pods) and any(p["GPU"] > 0 for p in pods)
    elif kind == "RayJob":
        pods = _check_ray_cluster_spec(spec["rayClusterSpec"], path.name)
        _check_remote_runtime_env(yaml.safe_load(spec["runtimeEnvYAML"]), path.name)
        stage, cfg = _check_entrypoint(spec["entrypoint"], path.name)
        assert path.name == f"ray-job.{stage}.yaml"
        if stage == "pretrain":  # every Ray Train worker fits in the job's GPU pods
            sc = cfg.scaling
            cpu = sc.resources_per_worker.get("CPU", 1)
            gpu = sc.resources_per_worker.get("GPU", int(sc.use_gpu))
            n = sc.num_workers
        elif stage == "tune":  # the concurrent trials fit, one worker's resources each
            res = cfg.finetune.scaling.resources_per_worker
            cpu, gpu = res.get("CPU", 1), res.get("GPU", int(cfg.finetune.scaling.use_gpu))
            n = cfg.tune.max_concurrent_trials or 1
        elif stage in ("embed", "perturb"):  # every GPU actor fits, up to the pool's cap
            pool = cfg.compute.pool
            assert pool.max_actors is not None, f"{path.name}: a GPU pool needs max_actors"
            cpu, gpu, n = cfg.compute.num_cpus, cfg.compute.num_gpus, pool.max_actors
        else:
            cpu, gpu, n = 1, 0, 1
        assert _capacity(pods, cpu, gpu) >= n, (
            f"{path.name}: {n} x {{CPU: {cpu}, GPU: {gpu}}} do not fit"
        )
    else:
        _check_ray_service(spec, path.name)


def _check_ray_service(spec: dict[str, Any], where: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    from cellfoundry.config.serve import ServeJobConfig

    pods = _check_ray_cluster_spec(spec["rayClusterConfig"], where)
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # Ray Serve's own schema
    for app in serve_config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        assert app["import_path"] == "cellfoundry.serve.app:build_app"
        assert (REPO_ROOT / "platform" / (module.replace(".", "/") + ".py")).is_file()
        assert (
            f"def {attr}("
            in (REPO_ROOT / "platform" / (module.replace(".", "/") + ".py")).read_text()
        )
        _check_remote_runtime_env(app["runtime_env"], where)
        config = app["args"]["config"]
        assert (REPO_ROOT / config).is_file(), f"{where}: {config} does not exist"
        cfg = load_config(ServeJobConfig, REPO_ROOT / config, app["args"].get("set", []))
        replicas = _capacity(pods, cfg.num_cpus, cfg.num_gpus)
        assert replicas >= cfg.autoscaling.max_replicas, (
            f"{where}: {cfg.autoscaling.max_replicas} replicas do not fit"
        )
        if cfg.num_gpus:
            assert cfg.precision in ("bf16", "int8", "auto"), where


def test_docs_name_existing_files() -> None:
    text = (REPO_ROOT / "docs" / "clusters.md").read_text()
    paths = set(re.findall(r"\b((?:jobs|cluster|docs|tests)/[\w./-]+\.(?:py|yaml|md))\b", text))
    assert len(paths) > 10
    missing = sorted(p for p in paths if "<" not in p and not (REPO_ROOT / p).is_file())
    assert not missing, f"docs/clusters.md names files that do not exist: {missing}"
