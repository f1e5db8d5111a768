"""Kubernetes manifests, validated offline: `ift k8s` output and the static k8s/ folder.

Nothing is mocked except that no Kubernetes API server exists here: the checks it would make
are done locally instead. RayJob / RayCluster are validated against KubeRay v1.7.0's CRD
`openAPIV3Schema` (vendored in tests/assets/k8s, see its NOTICE.md) with `jsonschema`, read the
way the API server reads it with strict field validation: unknown fields are errors,
`nullable`, `x-kubernetes-int-or-string`, list-map keys, list sets and int32/int64 formats are
enforced (the only rules not evaluated are the CEL `x-kubernetes-validations`, and a test
checks that no manifest sets a field that carries one). Core kinds (ConfigMap, Deployment,
Service, StatefulSet, PVC, Namespace, Secret, and the pod templates embedded in the Ray
objects) go through `kubernetes-validate` in strict mode, which ships the upstream schemas.
The kustomize overlays are built with `kubectl kustomize` when a kubectl binary is installed
(Debian: `apt-get install kubernetes-client`), and checked by applying their JSON patches to
the base in Python either way.
"""

from __future__ import annotations

import copy
import json
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from launcher import k8s
from launcher.cli import main
from launcher.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "tests" / "assets" / "k8s"
K8S_DIR = REPO / "k8s"
OVERLAYS = ["cpu-smoke", "gpu"]
QUICKSTART = "configs/quickstart.yaml"
K8S_VERSION = "1.32"
ON_PVC = "experiment.output_dir=/mnt/ift/runs/quickstart"
GPU = [
    ON_PVC,
    "train.use_gpu=true",
    "train.precision=bf16",
    "train.num_workers=4",
    "cluster.gpus_per_worker=2",
    "cluster.image=registry.example/ift:0.1.0",
    "cluster.worker_cpu=8",
    "cluster.worker_memory=64Gi",
    "cluster.worker_memory_limit=80Gi",
    "cluster.node_selector={nvidia.com/gpu.present: 'true'}",
    "cluster.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]",
    "cluster.active_deadline_seconds=86400",
    "cluster.backoff_limit=2",
    "cluster.ttl_seconds_after_finished=600",
]
S3 = [
    "experiment.output_dir=s3://bucket/runs/quickstart",
    "cluster.storage_pvc=null",
    "cluster.s3_credentials_secret=ift-s3",
    "cluster.mlflow_secret=ift-mlflow-auth",
    "cluster.stage=train",
]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    # Config paths (model, data files) are relative to the project root, as in the image.
    monkeypatch.chdir(REPO)


# --- the CRD schema, read like the API server does ------------------------------------------


def _crd_schema(kind: str) -> dict[str, Any]:
    doc = json.loads((ASSETS / f"{kind.lower()}.schema.json").read_text())
    assert doc["kind"] == kind and doc["group"] == "ray.io" and doc["version"] == "v1"
    return _structural(doc["openAPIV3Schema"])


def _structural(node: Any) -> Any:
    """OpenAPI v3 (Kubernetes dialect) -> JSON Schema: close objects that list their
    properties (strict field validation) and turn `nullable` into a null type."""
    if isinstance(node, list):
        return [_structural(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _structural(v) for k, v in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _int_or_string(validator, value, instance, schema) -> Iterator[jsonschema.ValidationError]:
    ok = isinstance(instance, str) or (isinstance(instance, int) and not isinstance(instance, bool))
    if value and not ok:
        yield jsonschema.ValidationError(f"{instance!r} is neither an integer nor a string")


def _list_type(validator, value, instance, schema) -> Iterator[jsonschema.ValidationError]:
    if not isinstance(instance, list):
        return
    if value == "set":
        seen = [json.dumps(i, sort_keys=True) for i in instance]
        if len(seen) != len(set(seen)):
            yield jsonschema.ValidationError(f"duplicate items in a list-type=set: {instance}")
    elif value == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        tuples = [tuple(json.dumps(i.get(k)) for k in keys) for i in instance]
        if len(tuples) != len(set(tuples)):
            yield jsonschema.ValidationError(f"duplicate {keys} in a list-type=map")


FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


KubeValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    {"x-kubernetes-int-or-string": _int_or_string, "x-kubernetes-list-type": _list_type},
)
_VALIDATORS: dict[str, Any] = {}


def crd_errors(doc: dict[str, Any]) -> list[str]:
    kind = doc["kind"]
    if kind not in _VALIDATORS:
        _VALIDATORS[kind] = KubeValidator(_crd_schema(kind), format_checker=FORMATS)
    errors = _VALIDATORS[kind].iter_errors(doc)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def _cel_paths(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(node, dict):
        if "x-kubernetes-validations" in node:
            yield path
        for key, child in node.get("properties", {}).items():
            yield from _cel_paths(child, (*path, key))
        if isinstance(node.get("items"), dict):
            yield from _cel_paths(node["items"], (*path, "*"))


def _has_path(doc: Any, path: tuple[str, ...]) -> bool:
    if not path:
        return True
    head, rest = path[0], path[1:]
    if head == "*":
        return isinstance(doc, list) and any(_has_path(d, rest) for d in doc)
    return isinstance(doc, dict) and head in doc and _has_path(doc[head], rest)


# --- core kinds ------------------------------------------------------------------------------


def core_errors(doc: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{doc['kind']}/{doc['metadata'].get('name')}: {e.message}"]
    return []


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) for every pod a manifest makes."""
    spec = doc.get("spec", {})
    if doc["kind"] == "RayJob":
        yield "submitter", spec["submitterPodTemplate"]
        spec = spec["rayClusterSpec"]
    if doc["kind"] in ("RayJob", "RayCluster"):
        yield "head", spec["headGroupSpec"]["template"]
        for group in spec["workerGroupSpecs"]:
            yield group["groupName"], group["template"]
    elif doc["kind"] in ("Deployment", "StatefulSet"):
        yield doc["metadata"]["name"], spec["template"]


def validate(doc: dict[str, Any]) -> list[str]:
    """Every problem the API server (strict field validation) would report for this object."""
    if doc["apiVersion"] == "ray.io/v1":
        problems = crd_errors(doc)
        # The pods inside a Ray object are core PodTemplateSpecs: check them upstream too.
        for where, template in pod_templates(doc):
            wrapped = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": where},
                "template": template,
            }
            problems += core_errors(wrapped)
        return problems
    return core_errors(doc)


def containers(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for where, template in pod_templates(doc):
        spec = template["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield f"{doc['kind']}/{doc['metadata']['name']}/{where}/{c['name']}", c, spec


def assert_secure(doc: dict[str, Any], uid: int | None = None) -> None:
    for where, c, pod in containers(doc):
        sc, psc = c.get("securityContext", {}), pod.get("securityContext", {})
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{where}: {kind} missing"
        assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where
        user = sc.get("runAsUser", psc.get("runAsUser"))
        assert user and (uid is None or user == uid), f"{where}: runAsUser {user}"
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
        assert sc.get("privileged") is not True, where
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {}))
        assert seccomp.get("type") == "RuntimeDefault", where
        for env in c.get("env", []):
            looks_secret = any(w in env["name"] for w in ("PASSWORD", "TOKEN", "SECRET", "KEY"))
            assert not (looks_secret and "value" in env), f"{where}: inline {env['name']}"


# --- rendering -------------------------------------------------------------------------------


def render(overrides: list[str], config: str = QUICKSTART) -> dict[str, list[dict[str, Any]]]:
    return k8s.render_file(config, overrides)


def by_kind(manifests: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for docs in manifests.values() for d in docs}


@pytest.mark.parametrize("variant", ["cpu", "gpu", "s3"])
def test_rendered_manifests_pass_crd_and_core_schemas(variant: str) -> None:
    overrides = {"cpu": [ON_PVC], "gpu": GPU, "s3": S3}[variant]
    manifests = render(overrides)
    assert sorted(manifests) == ["raycluster.yaml", "rayjob.yaml"]
    for name, docs in manifests.items():
        # What lands on disk is what is checked: round-trip through the YAML writer.
        parsed = list(yaml.safe_load_all(k8s.to_yaml(docs)))
        assert parsed == docs
        for doc in parsed:
            assert validate(doc) == [], name
            assert_secure(doc, uid=k8s.UID)


def test_validators_reject_what_the_api_server_would() -> None:
    """The schema checks bite: misspelt fields, wrong types, int-or-string, core kinds."""
    job = by_kind(render([ON_PVC]))["RayJob"]
    assert crd_errors(job) == []
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinish"] = True  # misspelt
    assert any("shutdownAfterJobFinish" in e for e in crd_errors(bad))
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert any("replicas" in e for e in crd_errors(bad))
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = 2**31
    assert any("int32" in e for e in crd_errors(bad))
    bad = copy.deepcopy(job)
    head = bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["resources"]["limits"]["cpu"] = ["2"]  # quantities are int-or-string
    assert any("neither an integer nor a string" in e for e in crd_errors(bad))
    bad = copy.deepcopy(job)
    del bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    assert any("groupName" in e for e in crd_errors(bad))
    bad = copy.deepcopy(job)
    head = bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["ports"].append(dict(head["ports"][0]))  # ports are a list-map keyed by port+protocol
    assert any("list-type=map" in e for e in crd_errors(bad))
    cm = by_kind(render([ON_PVC]))["ConfigMap"]
    assert core_errors(cm) == []
    assert core_errors({**cm, "datas": {}}) != []  # strict: unknown field
    bad = copy.deepcopy(job)
    pod = bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    pod["containers"][0]["securityContext"]["runAsUsr"] = 1000
    assert validate(bad) != []


def test_no_manifest_sets_a_field_guarded_by_cel_rules() -> None:
    """CEL `x-kubernetes-validations` are not evaluated offline: stay away from those fields."""
    manifests = by_kind(render(GPU))
    static = _static_docs()
    for kind in ("RayJob", "RayCluster"):
        paths = list(_cel_paths(_crd_schema(kind)))
        assert paths, kind
        docs = [manifests[kind]] + [d for d in static if d["kind"] == kind]
        for doc in docs:
            for path in paths:
                assert not _has_path(doc, path), f"{kind} sets {'.'.join(path)}"


def test_rendered_values_follow_the_config() -> None:
    manifests = render(GPU)
    docs = by_kind(manifests)
    job, cluster, cm = docs["RayJob"], docs["RayCluster"], docs["ConfigMap"]
    spec = job["spec"]
    assert spec["rayClusterSpec"] == cluster["spec"]  # the interactive cluster is the same
    assert manifests["rayjob.yaml"][0] == manifests["raycluster.yaml"][0] == cm
    assert cm["data"]["config.yaml"] == (REPO / QUICKSTART).read_text()
    assert job["metadata"]["name"] == "quickstart"
    assert cluster["metadata"]["name"] == "quickstart-cluster"
    assert job["metadata"]["namespace"] == cm["metadata"]["namespace"] == "ift"
    assert job["metadata"]["labels"]["app.kubernetes.io/instance"] == "quickstart"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 600
    assert spec["activeDeadlineSeconds"] == 86400
    assert spec["backoffLimit"] == 2
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert spec["rayClusterSpec"]["rayVersion"] == "2.60.0"

    # 4 Ray Train workers x 1 GPU each, 2 GPUs per pod -> 2 worker pods.
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert group["groupName"] == "gpu-workers"
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    pod = group["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": 2},
        "limits": {"cpu": "8", "memory": "80Gi", "nvidia.com/gpu": 2},
    }
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert pod["tolerations"] == [toleration]
    head_pod = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head_pod["tolerations"] == [toleration] and "nodeSelector" not in head_pod
    (head,) = head_pod["containers"]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    images = {c["image"] for _, c, _ in containers(job)}
    assert images == {"registry.example/ift:0.1.0"}

    # The config travels in the ConfigMap, mounted in every Ray pod; the PVC at the same path.
    for template in (spec["rayClusterSpec"]["headGroupSpec"]["template"], group["template"]):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["ift-config"]["configMap"]["name"] == cm["metadata"]["name"]
        assert volumes["ift-storage"]["persistentVolumeClaim"]["claimName"] == "ift-storage"
        mounts = {
            m["name"]: m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]
        }
        assert mounts["ift-config"] == "/etc/ift" and mounts["ift-storage"] == "/mnt/ift"
        env_from = template["spec"]["containers"][0]["envFrom"]
        assert env_from == [{"configMapRef": {"name": "ift-mlflow"}}]

    # The entrypoint runs the same experiment: same file, every override, in order.
    cd, run = spec["entrypoint"].split(" && ")
    assert cd == "cd /app"
    argv = shlex.split(run)
    assert argv[:3] == ["ift", "run", "/etc/ift/config.yaml"]
    assert argv[3:-1] == GPU
    assert argv[-1] == "tracking.tracking_uri=${MLFLOW_TRACKING_URI}"  # expanded by the shell


def test_cpu_config_gets_cpu_workers_one_per_ray_train_worker() -> None:
    docs = by_kind(render([ON_PVC, "train.num_workers=3", "cluster.worker_cpu=2"]))
    (group,) = docs["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["groupName"] == "cpu-workers" and group["replicas"] == 3
    res = group["template"]["spec"]["containers"][0]["resources"]
    assert res == {
        "requests": {"cpu": "2", "memory": "16Gi"},
        "limits": {"cpu": "2", "memory": "16Gi"},
    }
    assert "nodeSelector" not in group["template"]["spec"]


def test_s3_storage_and_one_stage() -> None:
    docs = by_kind(render(S3))
    spec = docs["RayJob"]["spec"]
    pod = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert "ift-storage" not in {v["name"] for v in pod["volumes"]}
    assert pod["containers"][0]["envFrom"] == [
        {"configMapRef": {"name": "ift-mlflow"}},
        {"secretRef": {"name": "ift-mlflow-auth"}},
        {"secretRef": {"name": "ift-s3"}},
    ]
    assert shlex.split(spec["entrypoint"].split(" && ")[1])[:2] == ["ift", "train"]


def test_gpus_without_train_use_gpu_are_rejected_naming_both_keys(capsys) -> None:
    bad = [ON_PVC, "cluster.gpus_per_worker=1"]
    with pytest.raises(ConfigError) as e:
        render(bad)
    assert "cluster.gpus_per_worker" in str(e.value) and "train.use_gpu" in str(e.value)
    assert main(["k8s", QUICKSTART, *bad]) == 2
    err = capsys.readouterr().err
    assert "cluster.gpus_per_worker" in err and "train.use_gpu is false" in err
    # ... and the other way round: a GPU run whose pods get none.
    with pytest.raises(ConfigError, match=r"train.use_gpu: true but cluster.gpus_per_worker"):
        render([ON_PVC, "train.use_gpu=true", "cluster.gpus_per_worker=0"])


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        ([], ["experiment.output_dir", "cluster.storage_mount_path", "/app/runs/quickstart"]),
        (
            ["experiment.output_dir=s3://b/x", "cluster.storage_pvc=null"],
            ["experiment.output_dir", "cluster.s3_credentials_secret"],
        ),
        ([ON_PVC, "cluster.storage_pvc=null"], ["experiment.output_dir", "cluster.storage_pvc"]),
        ([ON_PVC, "data.output_dir=/tmp/data"], ["data.output_dir", "/tmp/data"]),
        ([ON_PVC, "cluster.mlflow_configmap=null"], ["tracking.tracking_uri", "mlflow"]),
        ([ON_PVC, "cluster.worker_memory_limit=1Gi"], ["cluster.worker_memory_limit"]),
        ([ON_PVC, "cluster.head_cpu=lots"], ["cluster.head_cpu", "quantity"]),
        ([ON_PVC, "cluster.namespace=Not_A_Label"], ["cluster.namespace"]),
    ],
)
def test_configs_that_cannot_run_on_kubernetes_are_rejected(
    overrides: list[str], keys: list[str]
) -> None:
    with pytest.raises(ConfigError) as e:
        render(overrides)
    for key in keys:
        assert key in str(e.value)


def test_tracking_to_a_server_or_sqlite_on_the_volume_needs_no_configmap() -> None:
    for uri in ("http://mlflow.example:5000", "sqlite:////mnt/ift/mlflow.db"):
        job = by_kind(
            render([ON_PVC, "cluster.mlflow_configmap=null", f"tracking.tracking_uri={uri}"])
        )
        assert "MLFLOW_TRACKING_URI" not in job["RayJob"]["spec"]["entrypoint"]


def test_cli_writes_files_or_prints_yaml(tmp_path: Path, capsys) -> None:
    assert main(["k8s", QUICKSTART, ON_PVC, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [
        str(tmp_path / "out" / "rayjob.yaml"),
        str(tmp_path / "out" / "raycluster.yaml"),
    ]
    for path in printed:
        docs = list(yaml.safe_load_all(Path(path).read_text()))
        assert [d["kind"] for d in docs][0] == "ConfigMap"
        assert all(validate(d) == [] for d in docs)
    assert main(["k8s", QUICKSTART, ON_PVC]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]


# --- the static k8s/ folder ------------------------------------------------------------------


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomization(folder: Path) -> dict[str, Any]:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def _static_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S_DIR.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += _yaml_docs(path)
    return docs


def test_static_manifests_are_valid_and_secure() -> None:
    docs = _static_docs()
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "StatefulSet", "PersistentVolumeClaim", "ConfigMap"} <= kinds
    assert "RayCluster" in kinds
    for doc in docs:
        assert validate(doc) == [], doc["metadata"]["name"]
        assert_secure(doc)
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    assert sts["spec"]["volumeClaimTemplates"], "PostgreSQL keeps its data on a PVC"
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "ift-postgres"


def test_no_secret_is_part_of_the_build() -> None:
    """Credentials come from a Secret created by hand; the example is outside every build."""
    base = _kustomization(K8S_DIR / "base")
    listed = [K8S_DIR / "base" / r for r in base["resources"]]
    assert (K8S_DIR / "base" / "secret.example.yaml").is_file()
    assert K8S_DIR / "base" / "secret.example.yaml" not in listed
    for path in listed:
        assert all(d["kind"] != "Secret" for d in _yaml_docs(path)), path
    for overlay in OVERLAYS:
        k = _kustomization(K8S_DIR / "overlays" / overlay)
        assert "secretGenerator" not in k and "secretGenerator" not in base


def _json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """The add/replace/remove subset of RFC 6902 the overlays use."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in op["path"][1:].split("/")
        ]
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        key: Any = int(last) if isinstance(node, list) and last != "-" else last
        if op["op"] == "replace":
            assert (key < len(node)) if isinstance(node, list) else key in node, op["path"]
            node[key] = op["value"]
        elif op["op"] == "add":
            if isinstance(node, list):
                node.insert(len(node) if key == "-" else key, op["value"])
            else:
                node[key] = op["value"]
        elif op["op"] == "remove":
            del node[key]
        else:
            raise AssertionError(f"unsupported op {op['op']}")
    return doc


def _build_in_python(overlay: str) -> list[dict[str, Any]]:
    """What `kubectl kustomize` does with these files: resources, namespace, patches, images."""
    base_dir = K8S_DIR / "base"
    base = _kustomization(base_dir)
    docs = [d for r in base["resources"] for d in _yaml_docs(base_dir / r)]
    for d in docs:
        if d["kind"] != "Namespace":
            d["metadata"]["namespace"] = base["namespace"]
    folder = K8S_DIR / "overlays" / overlay
    k = _kustomization(folder)
    assert [(folder / b).resolve() for b in k["bases"]] == [base_dir.resolve()]
    for patch in k.get("patchesJson6902", []):
        t = patch["target"]
        api = f"{t['group']}/{t['version']}" if t.get("group") else t["version"]
        matches = [
            i
            for i, d in enumerate(docs)
            if (d["apiVersion"], d["kind"], d["metadata"]["name"]) == (api, t["kind"], t["name"])
        ]
        assert len(matches) == 1, f"{overlay}: patch target {t} matches {len(matches)} objects"
        ops = json.loads((folder / patch["path"]).read_text())
        docs[matches[0]] = _json_patch(docs[matches[0]], ops)
    for image in k.get("images", []):
        for d in docs:
            for _, c, _ in containers(d):
                if c["image"].split(":")[0] == image["name"]:
                    c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return docs


def _key(d: dict[str, Any]) -> tuple[str, str]:
    return d["kind"], d["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_patches_apply_and_validate_in_python(overlay: str) -> None:
    docs = _build_in_python(overlay)
    for doc in docs:
        assert validate(doc) == [], f"{overlay}: {_key(doc)}"
        assert_secure(doc)
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == (overlay == "gpu")
    storage = next(d for d in docs if _key(d) == ("PersistentVolumeClaim", "ift-storage"))
    mode = "ReadWriteOnce" if overlay == "cpu-smoke" else "ReadWriteMany"
    assert storage["spec"]["accessModes"] == [mode]


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(
    KUBECTL is None,
    reason="no kubectl binary: `apt-get install kubernetes-client` (Debian) to build the "
    "overlays with `kubectl kustomize`; the Python patch check above still ran",
)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubectl_kustomize_builds_each_overlay(overlay: str) -> None:
    assert KUBECTL is not None
    built = subprocess.run(
        [KUBECTL, "kustomize", str(K8S_DIR / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    for doc in docs:
        assert validate(doc) == [], f"{overlay}: {_key(doc)}"
        assert_secure(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "ift"
    # kustomize and the Python reading of the same files agree object for object.
    expected = {_key(d): d for d in _build_in_python(overlay)}
    assert {_key(d): d for d in docs} == expected
