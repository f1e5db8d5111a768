"""Security: sandboxed templates, no code execution from model folders, no leaked secrets,
loopback-only local Ray.

Every attack here is live: each test first shows (or states why) the payload would run or leak
without the defence, so that a test that passes means the defence worked. Nothing is mocked.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from data_pipeline import templates
from launcher.config import Config, from_dict, resolve_paths

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "tests" / "assets" / "models" / "stories260K"
SST2 = ROOT / "tests" / "assets" / "quickstart" / "sst2_train.tsv"
PACKAGES = ("launcher", "training", "data_pipeline", "eval")


def raw_config(tmp: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "experiment": {"name": "sec", "output_dir": str(tmp / "out")},
        "model": {"name_or_path": str(MODEL)},
        "data": {"sources": [{"path": str(SST2), "template": "sst2"}]},
        "train": {"micro_batch_size": 2, "grad_accum": 1, "num_workers": 1},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


# --- Jinja templates are sandboxed ---------------------------------------------------------------


def escapes(marker: Path) -> list[str]:
    """Template payloads that, outside a sandbox, read internals or run `touch marker`."""
    run = f"popen('touch {marker}').read()"
    return [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os." + run + " }}",
        "{{ joiner.__init__.__globals__.os." + run + " }}",
        "{{ namespace.__init__.__globals__.os." + run + " }}",
        "{{ lipsum.__globals__['os']." + run + " }}",
        "{{ self.__init__.__globals__ }}",
        "{{ record.__class__.__init__.__globals__ }}",
        "{{ record|attr('__class__') }}",
        "{{ '{0.__class__.__mro__}'.format(record) }}",
        "{{ instruction.__class__.__base__.__subclasses__() }}",
        "{{ record.update({'output': 'mutated'}) }}",
        "{{ record.pop('output') }}",
        "{% import 'os' as os %}{{ os }}",
        "{% include '/etc/passwd' %}",
        "{% extends '/etc/passwd' %}",
        "{% from 'os' import system %}{{ system('touch " + str(marker) + "') }}",
        "{{ range(10**12)|list }}",
    ]


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a template payload ran a shell command"


def test_escape_payloads_are_live_outside_the_sandbox(tmp_path: Path) -> None:
    """The control: the same payload in a plain (unsandboxed) Jinja environment runs `touch`."""
    import jinja2

    target = tmp_path / "proof"
    payload = escapes(target)[2]
    jinja2.Environment().from_string(payload).render()
    assert target.exists()


@pytest.mark.parametrize("index", range(18))
def test_custom_template_escapes_are_refused(marker: Path, tmp_path: Path, index: int) -> None:
    payload = escapes(marker)[index]
    spec = {"prompt": payload, "completion": "{{ output }}"}
    record = {"instruction": "hi", "output": "fine"}
    try:
        # The config path: a syntax-level refusal is a config error naming the source.
        cfg = from_dict(
            raw_config(tmp_path, data={"sources": [{"path": str(SST2), "template": spec}]})
        )
    except ValueError as e:
        assert "data.sources.0.template" in str(e)
        return
    render = templates.renderer(cfg.data.sources[0].template, cfg.data.sources[0].params)
    with pytest.raises(templates.TemplateError, match="custom template 'prompt'") as err:
        render(record)  # what each prepare worker calls on each record
    assert "<class" not in str(err.value) and "os.py" not in str(err.value)
    assert record == {"instruction": "hi", "output": "fine"}  # never mutated


# --- no code runs when a model folder is loaded -------------------------------------------------


class _Payload:
    """Unpickling this object calls `exec` (what a malicious pytorch_model.bin does)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.target)!r}, 'w').write('pwned')",))


def malicious_bin_model(folder: Path, target: Path) -> Path:
    """stories260K with its safetensors swapped for a pickle-bearing pytorch_model.bin."""
    import torch

    shutil.copytree(MODEL, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    state = {"model.embed_tokens.weight": torch.zeros(2, 2), "evil": _Payload(target)}
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_pickle_payload_is_live_with_plain_torch_load(tmp_path: Path) -> None:
    """The control: `torch.load(..., weights_only=False)` on that file runs the payload."""
    import torch

    target = tmp_path / "proof"
    model = malicious_bin_model(tmp_path / "model", target)
    torch.load(model / "pytorch_model.bin", weights_only=False)
    assert target.read_text() == "pwned"


def test_malicious_bin_checkpoint_is_not_executed_by_ift_loaders(tmp_path: Path) -> None:
    """The eval Generator (the loader ift uses for the base and fine-tuned models) refuses it."""
    from eval.evaluate import Generator

    target = tmp_path / "pwned"
    model = malicious_bin_model(tmp_path / "model", target)
    cfg = from_dict(raw_config(tmp_path, model={"name_or_path": str(model)}))
    with pytest.raises(Exception) as err:  # noqa: B017 - any refusal will do; execution will not
        Generator(
            str(model),
            cfg.eval.model_dump(),
            cfg.model.dtype,
            False,
            1.0,
            cfg.model.trust_remote_code,
        )
    assert not target.exists(), f"the pickle payload ran ({type(err.value).__name__})"
    text = f"{type(err.value).__name__}: {err.value}".lower()
    assert "weights_only" in text or "unpickl" in text or "safetensors" in text, text


def python_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def calls(name: str) -> Iterator[tuple[Path, ast.Call]]:
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called == name:
                    yield path, node


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_every_torch_load_is_weights_only() -> None:
    for path, call in calls("load"):
        func = call.func
        if isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "torch":
            value = keyword(call, "weights_only")
            assert isinstance(value, ast.Constant) and value.value is True, (
                f"{path.relative_to(ROOT)}:{call.lineno}: torch.load without weights_only=True"
            )


def test_every_from_pretrained_passes_trust_remote_code_from_the_config() -> None:
    found = list(calls("from_pretrained"))
    assert len(found) >= 4  # prepare's tokenizer, train's tokenizer + model, eval's model
    for path, call in found:
        value = keyword(call, "trust_remote_code")
        where = f"{path.relative_to(ROOT)}:{call.lineno}"
        assert value is not None, f"{where}: from_pretrained without trust_remote_code="
        assert not (isinstance(value, ast.Constant) and value.value is True), where
    for path, call in calls("pipeline"):  # transformers.pipeline(...) defaults to False
        value = keyword(call, "trust_remote_code")
        assert not (isinstance(value, ast.Constant) and value.value is True), path


REMOTE_CODE_PROBE = """
import json, sys
from pathlib import Path
folder, marker = Path(sys.argv[1]), Path(sys.argv[2])
from data_pipeline.tokenizer import load_tokenizer
from launcher.config import ModelConfig
refused = []
try:  # ift's tokenizer loader with the config default (trust_remote_code: false)
    load_tokenizer(str(folder), ModelConfig(name_or_path=str(folder)).trust_remote_code)
except Exception as e:
    refused.append(type(e).__name__ + ": " + str(e)[:200])
ran_before = marker.exists()
import transformers  # the control: what trust_remote_code=True would have done
try:
    transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
except Exception:
    pass
print(json.dumps({"refused": refused, "ran_before": ran_before, "ran_with_true": marker.exists()}))
"""


@pytest.mark.slow  # two interpreters importing transformers; the AST check above is the fast guard
def test_remote_code_in_a_model_folder_runs_only_when_the_config_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "evil_model"
    shutil.copytree(MODEL, folder)
    marker = tmp_path / "pwned"
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('pwned')\n"
        "from transformers import PretrainedConfig, PreTrainedTokenizerFast\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'llama'\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_PROBE, str(folder), str(marker)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert not result["ran_before"], "ift's loader executed the folder's code"
    assert result["ran_with_true"], "control failed: the payload would not have run anyway"
    if result["refused"]:
        assert "trust_remote_code" in result["refused"][0], result["refused"]


# --- secrets never reach MLflow params, tags or artifacts -----------------------------------------

SECRETS = {
    "uri": "UriPw-7f3a",
    "query": "QueryTok-91c2",
    "env_mlflow": "EnvMlflowPw-55d1",
    "env_aws": "EnvAwsKey-0b7e",
    "env_hf": "hf_EnvToken-c4d9",
}


def leaked(store: Path, secrets: dict[str, str]) -> dict[str, list[str]]:
    """Every file under `store` (the sqlite DB, every artifact) whose bytes hold a secret."""
    hits: dict[str, list[str]] = {}
    for path in sorted(p for p in store.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for name, secret in secrets.items():
            if secret.encode() in data:
                hits.setdefault(name, []).append(str(path.relative_to(store)))
    return hits


def test_secrets_in_uris_and_env_never_reach_a_real_mlflow_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mlflow = pytest.importorskip("mlflow")
    from launcher.tracking import Tracker

    store = tmp_path / "mlflow"
    store.mkdir()
    monkeypatch.chdir(store)  # the sqlite DB and ./mlruns-style artifacts land in `store`
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRETS["env_mlflow"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRETS["env_aws"])
    monkeypatch.setenv("HF_TOKEN", SECRETS["env_hf"])
    raw = raw_config(
        tmp_path,
        tracking={
            "tracking_uri": f"sqlite:///{store / 'mlflow.db'}",
            "experiment_name": "secrets",
            "system_metrics": False,
        },
        cluster={"address": f"ray://admin:{SECRETS['uri']}@head.internal:10001"},
        eval={"finetuned_model": f"https://models.internal/m?access_token={SECRETS['query']}"},
    )
    cfg = resolve_paths(from_dict(raw))
    assert cfg.cluster.address and SECRETS["uri"] in cfg.cluster.address  # the run still has it
    tracker = Tracker(cfg)
    with tracker.pipeline("run", "configs/x.yaml"):
        with tracker.stage("prepare"):
            pass
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    assert len(runs) == 2
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.params["cluster.address"] == "ray://admin:***@head.internal:10001"
    assert parent.data.params["eval.finetuned_model"].endswith("access_token=***")
    for run in runs:
        for value in [*run.data.params.values(), *run.data.tags.values()]:
            assert not any(s in value for s in SECRETS.values()), value
    config_yaml = Path(client.download_artifacts(parent.info.run_id, "config.yaml", str(tmp_path)))
    assert "***" in config_yaml.read_text()
    assert leaked(store, SECRETS) == {}


@pytest.mark.slow
def test_secrets_in_ds_config_never_reach_mlflow_artifacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mlflow = pytest.importorskip("mlflow")
    from launcher.tracking import Tracker
    from training.ds_config import build_ds_config, load_user_config

    store = tmp_path / "mlflow"
    store.mkdir()
    monkeypatch.chdir(store)
    user_ds = tmp_path / "ds.json"
    user_ds.write_text(json.dumps({"comet": {"enabled": False, "api_key": "DsApiKey-a1b2"}}))
    raw = raw_config(
        tmp_path,
        train={"ds_config": str(user_ds)},
        tracking={
            "tracking_uri": f"sqlite:///{store / 'mlflow.db'}",
            "experiment_name": "ds",
            "system_metrics": False,
            "log_model": False,
        },
    )
    cfg: Config = resolve_paths(from_dict(raw))
    # Exactly what training/train.py writes before training starts.
    out = Path(cfg.experiment.output_dir)
    out.mkdir(parents=True)
    ds_cfg = build_ds_config(cfg.train, load_user_config(cfg.train.ds_config))
    (out / "deepspeed_config.json").write_text(json.dumps(ds_cfg, indent=2))
    tracker = Tracker(cfg)
    with tracker.pipeline("train", "configs/x.yaml"), tracker.stage("train") as run:
        tracker.log_train(run, {}, cfg)
    assert mlflow.MlflowClient(cfg.tracking.tracking_uri).search_experiments()
    assert leaked(store, {"ds": "DsApiKey-a1b2"}) == {}


# --- local Ray listens on loopback only ---------------------------------------------------------


@pytest.fixture(scope="module")
def ray_sockets() -> Iterator[dict[str, Any]]:
    """Start Ray exactly as `ift` does (launcher.pipeline.ensure_ray) and list its sockets."""
    ray = pytest.importorskip("ray")
    psutil = pytest.importorskip("psutil")
    from launcher.pipeline import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    saved_env = dict(os.environ)
    os.environ.pop("RAY_ADDRESS", None)
    cfg = from_dict(raw_config(Path("/tmp"), cluster={"num_cpus": 1}))
    ensure_ray(cfg)
    try:
        ray.get(ray.remote(lambda: 1).remote())  # a worker process exists and listens too
        listening: dict[str, set[tuple[str, int]]] = {}
        for proc in psutil.Process().children(recursive=True) + [psutil.Process()]:
            try:
                conns = proc.net_connections(kind="inet")
                name = proc.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for c in conns:
                if c.status == psutil.CONN_LISTEN:
                    listening.setdefault(name, set()).add((c.laddr.ip, c.laddr.port))
        yield {"listening": listening, "nodes": ray.nodes()}
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved_env)


@pytest.mark.slow
def test_local_ray_starts_no_dashboard(ray_sockets) -> None:
    assert "gcs_server" in ray_sockets["listening"]  # the probe really saw Ray's servers
    ports = {port for socks in ray_sockets["listening"].values() for _, port in socks}
    assert 8265 not in ports  # include_dashboard=False: no dashboard / job-submission HTTP API


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="launcher/pipeline.py ensure_ray passes _node_ip_address='127.0.0.1', but Ray 2.60 "
    "rewrites a loopback node IP to the host's reachable IP (ray._private.services."
    "resolve_ip_for_localhost), so the node advertises e.g. 192.0.2.2; and its gRPC servers "
    "(gcs_server, raylet, workers) listen on `::`, the dashboard/runtime-env agents on 0.0.0.0 "
    "or the host IP. ray.init offers no loopback-only option: what guards these ports is Ray "
    "2.60's token authentication (on by default) and the host firewall. Not fixable in this "
    "suite's files; ensure_ray's docstring ('bound to loopback') should say so.",
)
def test_local_ray_advertises_and_listens_on_loopback_only(ray_sockets) -> None:
    loopback = {"127.0.0.1", "::1"}
    assert [n["NodeManagerAddress"] for n in ray_sockets["nodes"]] == ["127.0.0.1"]
    exposed = {
        name: sorted(s for s in socks if s[0] not in loopback)
        for name, socks in ray_sockets["listening"].items()
    }
    assert {k: v for k, v in exposed.items() if v} == {}
