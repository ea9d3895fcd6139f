"""infra/ and jobs/ definitions: KubeRay manifests against KubeRay's own CRD schemas, the GCP
cluster launcher config against Ray's schema, and entry points, configs and versions that agree."""

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from aisd_ray.cli import build_parser
from aisd_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO.parent / "shared" / "kuberay-crds"
MANIFESTS = ["raycluster.yaml", "rayjob-train.yaml", "rayjob-tune.yaml"]
IMAGE = "us-central1-docker.pkg.dev/PROJECT_ID/aisd-ray/aisd-ray:0.1.0"


def manifest(name):
    return yaml.safe_load((REPO / "infra" / "kuberay" / name).read_text())


def cluster_spec(doc):
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def unknown_fields(value, schema, path="") -> list[str]:
    """Keys the schema does not declare (the API server would prune or reject them): typos."""
    found = []
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in value.items():
            if key in schema["properties"]:
                found += unknown_fields(sub, schema["properties"][key], f"{path}.{key}")
            elif not (schema.get("additionalProperties") or schema.get("x-kubernetes-preserve-unknown-fields")):
                found.append(f"{path}.{key}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, sub in value.items():
            found += unknown_fields(sub, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifests_validate_against_the_kuberay_crds(name):
    if not CRDS.is_dir():
        pytest.skip(f"{CRDS} is absent: the KubeRay CRD schemas are not available to validate against")
    doc = manifest(name)
    assert doc["apiVersion"] == "ray.io/v1"
    crd = yaml.safe_load((CRDS / f"ray.io_{doc['kind'].lower()}s.yaml").read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    jsonschema.Draft7Validator(schema).validate(doc)
    assert unknown_fields(doc, schema) == []


def test_unknown_field_check_catches_a_typo():
    if not CRDS.is_dir():
        pytest.skip(f"{CRDS} is absent")
    crd = yaml.safe_load((CRDS / "ray.io_rayjobs.yaml").read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    doc = manifest("rayjob-train.yaml")
    doc["spec"]["shutdownAfterJobFinish"] = True
    assert unknown_fields(doc, schema) == [".spec.shutdownAfterJobFinish"]


@pytest.mark.parametrize("name", MANIFESTS[1:])
def test_rayjobs_carry_the_raycluster_spec_and_clean_up(name):
    job = manifest(name)
    assert job["spec"]["rayClusterSpec"] == manifest("raycluster.yaml")["spec"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 1
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["PYTHONUNBUFFERED"] == "1"


def test_gpu_worker_group_declares_gpus_and_the_head_none():
    spec = manifest("raycluster.yaml")["spec"]
    (group,) = spec["workerGroupSpecs"]
    pod = group["template"]["spec"]
    (container,) = pod["containers"]
    for kind in ("requests", "limits"):
        assert container["resources"][kind]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    shm = next(v for v in pod["volumes"] if v["emptyDir"].get("medium") == "Memory")
    assert {"name": shm["name"], "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert group["minReplicas"] == 0 < group["maxReplicas"] and spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    for pod_spec in (pod, spec["headGroupSpec"]["template"]["spec"]):
        assert pod_spec["serviceAccountName"] == "aisd-ray"  # Workload Identity, no key files
    assert spec["authOptions"]["mode"] == "token"


def commands(entrypoint: str) -> list[list[str]]:
    return [shlex.split(part) for part in entrypoint.split("&&")]


@pytest.mark.parametrize("name", MANIFESTS[1:])
def test_entry_points_configs_and_flags_in_the_rayjobs_are_real(name):
    for argv in commands(manifest(name)["spec"]["entrypoint"]):
        assert argv[0] == "python" and argv[1].startswith("/app/jobs/")
        script = REPO / argv[1].removeprefix("/app/")
        assert script.is_file(), script
        stage = script.stem
        assert f'main(["{stage}"' in script.read_text()
        args = build_parser().parse_args([stage, *argv[2:]])  # flags the CLI really takes
        if getattr(args, "config", None):
            config = REPO / args.config.removeprefix("/app/")
            cfg = load_config(config, args.set or [])  # the overrides are valid for this config
            assert cfg.train.use_gpu


def test_image_and_versions_agree_with_pyproject():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = dict(re.match(r"([A-Za-z0-9_.\-\[\],]+)~=(\S+)", d).groups() for d in pyproject["project"]["dependencies"]
                if "~=" in d)
    ray_pin = next(v for k, v in pins.items() if k.startswith("ray"))
    assert ray_pin == ray.__version__
    locked = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line)
    assert locked["ray"] == ray_pin and locked["tensorflow"] == pins["tensorflow"]  # the lock is in the range
    dockerfile = (REPO / "infra" / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={ray_pin}" in dockerfile and "FROM rayproject/ray:${RAY_VERSION}-" in dockerfile
    # the dependency layer: the tested versions, the CUDA build, before the code is copied in
    # (and MLflow's client: a run on the cluster can log to a tracker, --mlflow)
    deps = dockerfile.index('pip install --no-cache-dir -c constraints.txt ".[gpu,mlflow]"')
    assert deps < dockerfile.index("COPY --chown=ray:users aisd_ray ./aisd_ray")
    assert 'pip install --no-cache-dir --no-deps .' in dockerfile
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}$", dockerfile, re.M)  # no -gpu
    gpu = pyproject["project"]["optional-dependencies"]["gpu"]
    assert gpu == [f"tensorflow[and-cuda]~={pins['tensorflow']}"]
    python_tag = re.search(r"ARG PYTHON_TAG=py3(\d+)", dockerfile).group(1)
    assert int(python_tag) >= int(pyproject["project"]["requires-python"].split(".")[1].split()[0].strip('"'))
    for name in MANIFESTS:
        spec = cluster_spec(manifest(name))
        assert spec["rayVersion"] == ray_pin
        pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
        assert {c["image"] for p in pods for c in p["containers"]} == {IMAGE}
    assert yaml.safe_load((REPO / "infra" / "gcp" / "cluster.yaml").read_text())["docker"]["image"] == IMAGE


def test_gcp_cluster_launcher_config_validates_against_rays_schema():
    config = yaml.safe_load((REPO / "infra" / "gcp" / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    worker = config["available_node_types"]["gpu_worker"]
    assert worker["resources"]["GPU"] == worker["node_config"]["guestAccelerators"][0]["acceleratorCount"] == 1
    assert {"preemptible": True} in worker["node_config"]["scheduling"]
    assert config["available_node_types"][config["head_node_type"]]["resources"].get("GPU", 0) == 0


def test_runtime_env_and_bucket_script():
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert {".venv", ".git", "runs"} <= set(env["excludes"])
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    script = REPO / "infra" / "gcp" / "bucket.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "for prefix in data runs exports; do" in script.read_text()
