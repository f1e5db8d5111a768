"""KubeRay manifests for an experiment: a RayJob that runs it, a RayCluster for interactive use.

    ift k8s configs/quickstart.yaml experiment.output_dir=/mnt/ift/runs/quickstart --out out/
    kubectl apply -f out/rayjob.yaml

Pure functions, config -> list of manifest dicts -> YAML; nothing here talks to a cluster. The
config file travels verbatim in a ConfigMap mounted into every Ray pod and the overrides ride on
the entrypoint (`ift run /etc/ift/config.yaml key=value ...`), so the job runs exactly the
experiment that was rendered and validated here. Relative paths in the config resolve against
`cluster.workdir`, the project folder inside the image (k8s/Dockerfile). Every container runs as
UID 1000 with no privilege escalation, no capabilities and the RuntimeDefault seccomp profile,
and has CPU and memory requests and limits; credentials only ever come from Secret references.
"""

from __future__ import annotations

import copy
import posixpath
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from launcher.config import Config, ConfigError, apply_overrides, from_dict, join

CONFIG_MOUNT = "/etc/ift"
CONFIG_FILE = "config.yaml"
UID = 1000
RAY_API = "ray.io/v1"
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
# Shared memory for Ray's object store and NCCL; Docker's 64 MiB default is far too small.
SHM_SIZE = "2Gi"
SUBMITTER_RESOURCES = {"cpu": "500m", "memory": "512Mi"}

Manifest = dict[str, Any]


def render_file(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, list[Manifest]]:
    """Read, override and validate a config file, then render it (see :func:`render`)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = p.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: top level must be a mapping of sections")
    # Paths stay as written (no resolve_paths): inside the pods they resolve against the image.
    cfg = from_dict(apply_overrides(raw, list(overrides)), str(path), cluster_side=True)
    return render(cfg, text, overrides, source=str(path))


def render(
    cfg: Config, config_text: str, overrides: Sequence[str] = (), source: str = "<config>"
) -> dict[str, list[Manifest]]:
    """All manifests by file name: `rayjob.yaml` and `raycluster.yaml`, each led by the ConfigMap.

    Args:
        cfg: the validated config, paths as written in the file (not resolved locally).
        config_text: the config file's text, shipped verbatim in the ConfigMap.
        overrides: the dotted overrides, carried onto the job's entrypoint.
        source: the config's name for error messages.

    Raises:
        ConfigError: listing every reason the config cannot run on Kubernetes.
    """
    problems = k8s_problems(cfg)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"config {source} cannot run on Kubernetes:\n{lines}")
    cm = config_map(cfg, config_text)
    spec = ray_cluster_spec(cfg)
    return {
        "rayjob.yaml": [cm, ray_job(cfg, spec, entrypoint(cfg, overrides))],
        "raycluster.yaml": [cm, ray_cluster(cfg, copy.deepcopy(spec))],
    }


def k8s_problems(cfg: Config) -> list[str]:
    """What only matters in pods: outputs on shared storage, MLflow reachable, a valid name."""
    c = cfg.cluster
    problems: list[str] = []
    outputs = [("experiment.output_dir", cfg.experiment.output_dir)]
    if cfg.data_dir != join(cfg.experiment.output_dir, "data"):
        outputs.append(("data.output_dir", cfg.data_dir))
    for key, path in outputs:
        if path.startswith("s3://"):
            if not c.s3_credentials_secret:
                problems.append(
                    f"{key}: {path} needs AWS credentials in the pods; set "
                    "cluster.s3_credentials_secret to a Secret holding AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL / AWS_REGION as needed)"
                )
        elif "://" in path:
            continue  # another remote filesystem: the pods reach it like the driver does
        elif c.storage_pvc is None:
            problems.append(
                f"{key}: {path!r} is a local path but cluster.storage_pvc is unset; the outputs "
                "would vanish with the pod. Set cluster.storage_pvc or use s3://"
            )
        elif not _under(pod_path(cfg, path), c.storage_mount_path):
            example = posixpath.join(c.storage_mount_path, "runs", job_name(cfg) or "ift")
            problems.append(
                f"{key}: {path!r} is {pod_path(cfg, path)} in the pods, outside the shared "
                f"volume cluster.storage_mount_path={c.storage_mount_path}; every node must see "
                f"the outputs: e.g. {key}={example}"
            )
    t = cfg.tracking
    uri = t.tracking_uri
    if t.enabled and not uri.startswith(("http://", "https://")) and not c.mlflow_configmap:
        sqlite = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
        if (
            sqlite is None
            or c.storage_pvc is None
            or not _under(pod_path(cfg, sqlite), c.storage_mount_path)
        ):
            problems.append(
                f"tracking.tracking_uri: {uri!r} would live inside the head pod and vanish with "
                "it; set cluster.mlflow_configmap (k8s/base creates `ift-mlflow`), an "
                "http(s):// MLflow server, or tracking.enabled=false"
            )
    if not job_name(cfg):
        problems.append(
            f"experiment.name: {cfg.experiment.name!r} leaves no valid Kubernetes name "
            "(lowercase letters, digits and '-')"
        )
    return problems


def pod_path(cfg: Config, path: str) -> str:
    """Where a config path points inside the pods (relative paths start at cluster.workdir)."""
    return posixpath.normpath(posixpath.join(cfg.cluster.workdir, path))


def _under(path: str, root: str) -> bool:
    root = posixpath.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def job_name(cfg: Config) -> str:
    """experiment.name as a DNS-1123 label, short enough for KubeRay's derived pod names."""
    name = re.sub(r"[^a-z0-9-]+", "-", cfg.experiment.name.lower()).strip("-")
    return name[:40].rstrip("-")


def labels(cfg: Config) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "ift",
        "app.kubernetes.io/instance": job_name(cfg),
        "app.kubernetes.io/managed-by": "ift-k8s",
    }


def _meta(cfg: Config, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": cfg.cluster.namespace, "labels": labels(cfg)}


def config_map(cfg: Config, config_text: str) -> Manifest:
    """The experiment's config file, verbatim, mounted at /etc/ift/config.yaml in every pod."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(cfg, f"{job_name(cfg)}-config"),
        "data": {CONFIG_FILE: config_text},
    }


def entrypoint(cfg: Config, overrides: Sequence[str] = ()) -> str:
    """The RayJob's shell command: `cd WORKDIR && ift STAGE /etc/ift/config.yaml overrides...`.

    Ray runs a job's entrypoint in a shell on the head pod, so the MLflow URI can come from the
    environment (the ConfigMap named by cluster.mlflow_configmap) without being rendered here.
    """
    c = cfg.cluster
    args = ["ift", c.stage, posixpath.join(CONFIG_MOUNT, CONFIG_FILE), *overrides]
    command = f"cd {shlex.quote(c.workdir)} && {shlex.join(args)}"
    uri = cfg.tracking.tracking_uri
    if cfg.tracking.enabled and c.mlflow_configmap and not uri.startswith(("http://", "https://")):
        command += ' "tracking.tracking_uri=${MLFLOW_TRACKING_URI}"'
    return command


def security_context() -> dict[str, Any]:
    """Container securityContext: non-root, no privilege escalation, no capabilities."""
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "fsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _resources(
    cpu: str, cpu_limit: str | None, mem: str, mem_limit: str | None, gpus: int = 0
) -> dict[str, Any]:
    requests: dict[str, Any] = {"cpu": cpu, "memory": mem}
    limits: dict[str, Any] = {"cpu": cpu_limit or cpu, "memory": mem_limit or mem}
    if gpus:
        # Extended resources cannot be overcommitted: request must equal limit.
        requests["nvidia.com/gpu"] = gpus
        limits["nvidia.com/gpu"] = gpus
    return {"requests": requests, "limits": limits}


def _env_from(cfg: Config) -> list[dict[str, Any]]:
    c = cfg.cluster
    out: list[dict[str, Any]] = []
    if c.mlflow_configmap:
        out.append({"configMapRef": {"name": c.mlflow_configmap}})
    if c.mlflow_secret:
        out.append({"secretRef": {"name": c.mlflow_secret}})
    if c.s3_credentials_secret:
        out.append({"secretRef": {"name": c.s3_credentials_secret}})
    return out


def _volumes(cfg: Config) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    c = cfg.cluster
    volumes: list[dict[str, Any]] = [
        {"name": "ift-config", "configMap": {"name": f"{job_name(cfg)}-config"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "ift-config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if c.storage_pvc:
        volumes.append(
            {"name": "ift-storage", "persistentVolumeClaim": {"claimName": c.storage_pvc}}
        )
        mounts.append({"name": "ift-storage", "mountPath": c.storage_mount_path})
    return volumes, mounts


def _pod_template(cfg: Config, container: dict[str, Any], worker: bool) -> dict[str, Any]:
    c = cfg.cluster
    volumes, mounts = _volumes(cfg)
    container = {
        **container,
        "image": c.image,
        "imagePullPolicy": c.image_pull_policy,
        "workingDir": c.workdir,
        "volumeMounts": mounts,
        "securityContext": security_context(),
    }
    env_from = _env_from(cfg)
    if env_from:
        container["envFrom"] = env_from
    spec: dict[str, Any] = {
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    if c.tolerations:
        spec["tolerations"] = [t.model_dump(exclude_none=True) for t in c.tolerations]
    if worker and c.node_selector:
        spec["nodeSelector"] = dict(c.node_selector)
    return {"metadata": {"labels": labels(cfg)}, "spec": spec}


def ray_cluster_spec(cfg: Config) -> dict[str, Any]:
    """Head group plus one worker group sized from `train` and `cluster` (the RayCluster spec)."""
    c, t = cfg.cluster, cfg.train
    gpus = c.gpus(t)
    replicas = c.replicas(t)
    head = {
        "name": "ray-head",
        "ports": [{"name": n, "containerPort": p} for n, p in HEAD_PORTS.items()],
        "resources": _resources(c.head_cpu, c.head_cpu_limit, c.head_memory, c.head_memory_limit),
    }
    worker = {
        "name": "ray-worker",
        "resources": _resources(
            c.worker_cpu, c.worker_cpu_limit, c.worker_memory, c.worker_memory_limit, gpus
        ),
    }
    spec: dict[str, Any] = {
        "rayVersion": c.ray_version,
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0"},
            "template": _pod_template(cfg, head, worker=False),
        },
        "workerGroupSpecs": [
            {
                "groupName": "gpu-workers" if gpus else "cpu-workers",
                "replicas": replicas,
                "minReplicas": replicas,
                "maxReplicas": replicas,
                "rayStartParams": {},
                "template": _pod_template(cfg, worker, worker=True),
            }
        ],
    }
    if c.ray_auth:
        spec["authOptions"] = {"mode": "token"}
    return spec


def ray_job(cfg: Config, cluster_spec: dict[str, Any], command: str) -> Manifest:
    """The RayJob: a fresh cluster, the entrypoint, its lifetime and retry policy."""
    c = cfg.cluster
    submitter = {
        "name": "ray-job-submitter",
        "image": c.image,
        "imagePullPolicy": c.image_pull_policy,
        "resources": {"requests": SUBMITTER_RESOURCES, "limits": SUBMITTER_RESOURCES},
        "securityContext": security_context(),
    }
    spec: dict[str, Any] = {
        "entrypoint": command,
        "shutdownAfterJobFinishes": c.shutdown_after_job_finishes,
        "backoffLimit": c.backoff_limit,
        "submissionMode": "K8sJobMode",
        # KubeRay fills in the `ray job submit` command; the template adds limits and the
        # non-root securityContext its default submitter pod lacks.
        "submitterPodTemplate": {
            "metadata": {"labels": labels(cfg)},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": pod_security_context(),
                "containers": [submitter],
            },
        },
        "rayClusterSpec": cluster_spec,
    }
    if c.shutdown_after_job_finishes:
        spec["ttlSecondsAfterFinished"] = c.ttl_seconds_after_finished
    if c.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = c.active_deadline_seconds
    return {
        "apiVersion": RAY_API,
        "kind": "RayJob",
        "metadata": _meta(cfg, job_name(cfg)),
        "spec": spec,
    }


def ray_cluster(cfg: Config, cluster_spec: dict[str, Any]) -> Manifest:
    """A long-lived RayCluster with the same pods, for interactive use and `ift submit`."""
    return {
        "apiVersion": RAY_API,
        "kind": "RayCluster",
        "metadata": _meta(cfg, f"{job_name(cfg)}-cluster"),
        "spec": cluster_spec,
    }


def to_yaml(docs: Sequence[Manifest]) -> str:
    """A multi-document YAML stream, keys in the order they were built."""

    class _Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:  # no &id001 anchors: kubectl-style YAML
            return True

    def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, explicit_start=True, width=4096)


def write(manifests: dict[str, list[Manifest]], out_dir: str | Path) -> list[Path]:
    """Write each file of :func:`render` into out_dir; return the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, docs in manifests.items():
        path = out / name
        path.write_text(to_yaml(docs))
        paths.append(path)
    return paths


def main(config: str, overrides: Sequence[str], out: str | None) -> int:
    """`ift k8s CONFIG [overrides] [--out DIR]`: write the files, or print the RayJob's YAML."""
    manifests = render_file(config, overrides)
    if out is None:
        print(to_yaml(manifests["rayjob.yaml"]), end="")
        return 0
    for path in write(manifests, out):
        print(path)
    return 0
