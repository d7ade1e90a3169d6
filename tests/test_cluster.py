"""The cluster and scheduled-job files: cluster.yaml against Ray's own schema, the k8s manifests,
the runtime env and the example campaign. Fast: no cluster, no cloud, no network."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"
COMMAND_LISTS = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                 "head_start_ray_commands", "worker_start_ray_commands"]


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _docs(path: Path) -> dict[str, dict]:
    """The documents of a multi-document manifest, by kind (each kind appears once in our files)."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), f"{path.name}: a kind appears twice"
    return by_kind


def _ray_up_checks(config: dict) -> None:
    """What `ray up` checks before it talks to the cloud: prepare_config merges the provider's
    defaults.yaml and fills per-type worker bounds, then validate_config applies ray-schema.json
    and its own cross-field rules. (validate_config alone refuses any hand-written file: it wants
    keys only the defaults supply, and says so as a Ray version mismatch.) The AWS step after it,
    auto-detecting node resources, needs AWS, so cluster.yaml states every node type's resources."""
    validate_config(prepare_config(copy.deepcopy(config)))


# ---------------------------------------------------------------- cluster.yaml


@pytest.fixture(scope="module")
def cluster() -> dict:
    return _load(ROOT / "cluster.yaml")


def test_cluster_yaml_passes_rays_validator(cluster):
    _ray_up_checks(cluster)


def _misspelled_key(c):
    c["max_worker"] = c.pop("max_workers")


def _max_workers_string(c):
    c["max_workers"] = "8"


def _unknown_node_type_field(c):
    c["available_node_types"]["gpu_worker"]["gpus"] = 1


def _fractional_gpu(c):
    c["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5


def _missing_head_type(c):
    c["head_node_type"] = "no-such-type"


def _min_workers_over_global_max(c):
    c["available_node_types"]["gpu_worker"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize("mutate, error", [
    (_misspelled_key, jsonschema.ValidationError),
    (_max_workers_string, jsonschema.ValidationError),
    (_unknown_node_type_field, jsonschema.ValidationError),
    (_fractional_gpu, jsonschema.ValidationError),
    (_missing_head_type, ValueError),
    (_min_workers_over_global_max, ValueError),
])
def test_rays_validator_rejects_broken_variations(cluster, mutate, error):
    broken = copy.deepcopy(cluster)
    mutate(broken)
    with pytest.raises(error):
        _ray_up_checks(broken)


def test_cluster_has_cpu_head_and_autoscaled_gpu_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_workers = {name: t for name, t in types.items()
                   if name != cluster["head_node_type"] and t["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, "no worker type offers a GPU"
    for t in gpu_workers.values():
        assert t.get("min_workers", 0) < t["max_workers"] <= cluster["max_workers"]


def test_cluster_installs_the_package_and_owns_every_command_list(cluster):
    # Ray takes each top-level key left out from its defaults, whose setup_commands install a Ray
    # nightly: so every command list must be spelled out in the file.
    assert [k for k in COMMAND_LISTS if k not in cluster] == []
    setup = " ".join(cluster["setup_commands"])
    assert "pip install" in setup and "gfprune-ray" in setup and "torch" in setup
    assert any("ray start --head" in c and "--autoscaling-config" in c for c in cluster["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cluster["worker_start_ray_commands"])


# ---------------------------------------------------------------- runtime env


def _check_runtime_env(env: dict) -> None:
    RuntimeEnv(**env)  # Ray's own parsing of the fields
    packages = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
    assert any(p.startswith("gfprune-ray") for p in packages)
    assert any(p.startswith("torch") for p in packages)
    assert env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"


def test_runtime_env_names_the_package():
    _check_runtime_env(_load(JOBS / "runtime_env.yaml"))


# ---------------------------------------------------------------- KubeRay RayJob


def _gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _model_lines(text: str) -> list[str]:
    """models.txt lines that name a model, whitespace normalised."""
    lines = (line.split("#", 1)[0].split() for line in text.splitlines())
    return [" ".join(tokens) for tokens in lines if tokens]


@pytest.fixture(scope="module")
def rayjob_docs() -> dict[str, dict]:
    return _docs(JOBS / "rayjob.yaml")


def test_rayjob_runs_a_sweep_on_autoscaled_gpu_workers(rayjob_docs):
    job = rayjob_docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("gfprune-ray sweep")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    _check_runtime_env(yaml.safe_load(spec["runtimeEnvYAML"]))

    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert all(_gpus(c) == 0 for c in head["containers"])
    gpu_groups = [g for g in cluster["workerGroupSpecs"] if any(_gpus(c) >= 1 for c in g["template"]["spec"]["containers"])]
    assert gpu_groups and all(g["minReplicas"] < g["maxReplicas"] for g in gpu_groups)
    tag = cluster["rayVersion"]
    for c in head["containers"] + [c for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]:
        assert c["image"].split(":")[1].startswith(tag), "image tag and rayVersion differ"


def test_rayjob_mounts_the_campaign_and_its_data(rayjob_docs):
    spec = rayjob_docs["RayJob"]["spec"]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in head["containers"][0]["volumeMounts"]}

    config_path = Path(re.search(r"--config (\S+)", spec["entrypoint"]).group(1))
    campaign_cm = rayjob_docs["ConfigMap"]
    assert mounts[str(config_path.parent)]["configMap"]["name"] == campaign_cm["metadata"]["name"]
    campaign = yaml.safe_load(campaign_cm["data"][config_path.name])
    assert campaign["models"] in campaign_cm["data"]  # the models file sits next to it

    claim = rayjob_docs["PersistentVolumeClaim"]["metadata"]["name"]
    data_dirs = [path for path, v in mounts.items() if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
    assert data_dirs, "the data volume is not mounted on the head"
    for key in ("out", "cache_dir"):
        assert campaign[key].startswith(data_dirs[0] + "/"), f"{key} would not outlive the job"

    # the task that cuts a model writes it under out on whichever node it runs: every worker
    # mounts the same volume at the same place, so it must be shareable
    assert "ReadWriteMany" in rayjob_docs["PersistentVolumeClaim"]["spec"]["accessModes"]
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod.get("volumes", [])}
        worker_mounts = {m["mountPath"]: claims.get(m["name"]) for m in pod["containers"][0].get("volumeMounts", [])}
        assert worker_mounts.get(data_dirs[0]) == claim, f"worker group {group['groupName']} does not see {data_dirs[0]}"


def test_rayjob_campaign_matches_the_example_files(rayjob_docs):
    data = rayjob_docs["ConfigMap"]["data"]
    assert yaml.safe_load(data["campaign.yaml"]) == _load(JOBS / "campaign.yaml")
    assert _model_lines(data["models.txt"]) == _model_lines((JOBS / "models.txt").read_text())


# ---------------------------------------------------------------- CronJob


def test_cronjob_creates_the_same_rayjob_on_a_schedule(rayjob_docs):
    docs = _docs(JOBS / "cronjob.yaml")
    cron = docs["CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    assert len(cron["spec"]["schedule"].split()) == 5
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    command = " ".join(pod["containers"][0]["command"])
    mount = pod["containers"][0]["volumeMounts"][0]
    assert f"kubectl create -f {mount['mountPath']}/rayjob.yaml" in command

    # the manifest it creates: a fresh name per run, otherwise exactly the one-off RayJob
    template_cm = {v["name"]: v for v in pod["volumes"]}[mount["name"]]["configMap"]["name"]
    assert docs["ConfigMap"]["metadata"]["name"] == template_cm
    job = yaml.safe_load(docs["ConfigMap"]["data"]["rayjob.yaml"])
    oneoff = rayjob_docs["RayJob"]
    assert job["kind"] == "RayJob" and job["apiVersion"] == oneoff["apiVersion"]
    assert "name" not in job["metadata"] and job["metadata"]["generateName"]
    assert job["metadata"]["labels"] == oneoff["metadata"]["labels"]
    assert job["spec"] == oneoff["spec"]

    # and the permissions to do it, bound to the pod's service account
    rules = docs["Role"]["rules"]
    assert any("ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and {"create", "list"} <= set(r["verbs"])
               for r in rules)
    binding = docs["RoleBinding"]
    assert binding["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert {"kind": "ServiceAccount", "name": pod["serviceAccountName"]} in binding["subjects"]


# ---------------------------------------------------------------- example campaign


def test_example_campaign_parses():
    # Syntax only; the campaign schema itself is gfprune_ray.farm.campaign's to check.
    campaign = _load(JOBS / "campaign.yaml")
    assert isinstance(campaign, dict) and campaign["models"]
    models = (JOBS / campaign["models"]).read_text()
    lines = _model_lines(models)
    assert lines
    for line in lines:
        assert all("=" in token for token in line.split()[1:]), line
