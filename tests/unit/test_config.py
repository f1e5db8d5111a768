"""Tests for launcher.config: every shipped config loads, problems are named by dotted key."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from launcher.config import (
    Config,
    ConfigError,
    TrainConfig,
    apply_overrides,
    flatten,
    from_dict,
    load_config,
    parse_override,
    resolve_paths,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
MODEL = "tests/assets/models/stories260K"
SST2 = "tests/assets/quickstart/sst2_train.tsv"


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Paths in configs are relative to the repository root, where `ift` runs."""
    monkeypatch.chdir(REPO)
    return REPO


def valid_raw(**sections: dict[str, Any]) -> dict[str, Any]:
    """A minimal valid raw config (relative paths), with sections merged over it."""
    raw: dict[str, Any] = {
        "model": {"name_or_path": MODEL},
        "data": {"sources": [{"path": SST2, "template": "sst2"}]},
        "train": {"micro_batch_size": 2, "grad_accum": 2, "num_workers": 2},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def problems_of(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(raw)
    return str(info.value)


# --- shipped configs --------------------------------------------------------------------------


def test_configs_folder_is_not_empty() -> None:
    assert CONFIGS, "configs/ holds no YAML"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads(path: Path) -> None:
    cfg = load_config(path.relative_to(REPO))
    assert Path(cfg.experiment.output_dir).is_absolute()
    assert all(Path(src.path).is_absolute() for src in cfg.data.sources)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_starts_with_its_command(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ift ") and path.name in first


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_top_level_list_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


# --- unknown keys and problem collection ------------------------------------------------------


def test_unknown_key_override_names_dotted_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("configs/quickstart.yaml", ["data.no_such_key=1"])
    assert "data.no_such_key: unknown key" in str(info.value)


def test_unknown_key_inside_a_list_item_names_its_index() -> None:
    raw = valid_raw()
    raw["data"]["sources"][0]["tempalte"] = "sst2"
    assert "data.sources.0.tempalte: unknown key" in problems_of(raw)


def test_schema_problems_are_reported_together() -> None:
    raw = apply_overrides(valid_raw(), ["data.no_such_key=1", "train.zero_stage=4", "train.lr=-1"])
    text = problems_of(raw)
    assert "(3 problems)" in text
    for key in ("data.no_such_key", "train.zero_stage", "train.lr"):
        assert f"  - {key}: " in text


def test_filesystem_and_template_problems_are_reported_together() -> None:
    raw = apply_overrides(
        valid_raw(),
        [
            "model.name_or_path=tests/assets/models/no_such_model",
            "data.sources.0.path=tests/assets/quickstart/*.nothing",
            "data.sources.0.template=no_such_template",
        ],
    )
    text = problems_of(raw)
    assert "(3 problems)" in text
    assert "model.name_or_path: model folder not found" in text
    assert "data.sources.0.path: no file matches" in text
    assert "data.sources.0.template: unknown template 'no_such_template'" in text


def test_schema_and_cross_check_problems_are_reported_in_one_error() -> None:
    raw = apply_overrides(
        valid_raw(),
        [
            "data.no_such_key=1",
            "train.zero_stage=4",
            "train.lr=-1",
            "model.name_or_path=tests/assets/models/no_such_model",
            "data.sources.0.path=tests/assets/quickstart/*.nothing",
            "data.sources.0.template=no_such_template",
        ],
    )
    text = problems_of(raw)
    for key in (
        "data.no_such_key",
        "train.zero_stage",
        "train.lr",
        "model.name_or_path",
        "data.sources.0.path",
        "data.sources.0.template",
    ):
        assert f"  - {key}: " in text, key


def test_paths_on_the_cluster_volume_are_checked_only_where_the_run_happens() -> None:
    raw = valid_raw(
        model={"name_or_path": "/mnt/ift/models/Llama-3.1-8B"},
        cluster={"storage_mount_path": "/mnt/ift"},
    )
    raw["data"]["sources"][0]["path"] = "/mnt/ift/data/train.jsonl"
    text = problems_of(raw)  # `ift run` here: this machine must have them
    assert "model.name_or_path: model folder not found" in text
    assert "data.sources.0.path: no file matches" in text
    cfg = from_dict(raw, cluster_side=True)  # `ift submit` / `ift k8s`: the volume's business
    assert cfg.model.name_or_path == "/mnt/ift/models/Llama-3.1-8B"
    raw["model"]["name_or_path"] = "/elsewhere/model"  # not on the volume: still an error
    assert "model.name_or_path: model folder not found" in str(
        pytest.raises(ConfigError, from_dict, raw, cluster_side=True).value
    )


def test_hub_style_model_id_is_not_checked_on_disk() -> None:
    # `org/name` whose first part is not a local folder looks like a hub id, not a typo'd path.
    from_dict(valid_raw(model={"name_or_path": "some-org/some-model"}))


def test_duplicate_task_names_are_a_problem() -> None:
    raw = valid_raw()
    raw["data"]["sources"].append({"path": SST2, "template": "sst2"})
    assert "data.sources.1.name: task name 'sst2' also used by data.sources.0" in problems_of(raw)


def test_unknown_metric_is_a_problem() -> None:
    raw = valid_raw()
    raw["data"]["sources"][0]["metrics"] = ["accuracy", "no_such_metric"]
    assert "data.sources.0.metrics: unknown metric(s) ['no_such_metric']" in problems_of(raw)


# --- overrides --------------------------------------------------------------------------------


def test_nested_override_sets_value() -> None:
    cfg = from_dict(apply_overrides(valid_raw(), ["train.zero_stage=3", "eval.batch_size=4"]))
    assert cfg.train.zero_stage == 3
    assert cfg.eval.batch_size == 4


def test_override_creates_missing_section() -> None:
    raw = valid_raw()
    assert "cluster" not in raw
    out = apply_overrides(raw, ["cluster.num_cpus=3"])
    assert out["cluster"] == {"num_cpus": 3}
    assert "cluster" not in raw  # the input is not mutated


def test_list_index_override() -> None:
    cfg = from_dict(apply_overrides(valid_raw(), ["data.sources.0.max_records=5"]))
    assert cfg.data.sources[0].max_records == 5


def test_list_item_replaced_by_index() -> None:
    out = apply_overrides({"eval": {"models": ["base", "finetuned"]}}, ["eval.models.1=base"])
    assert out["eval"]["models"] == ["base", "base"]


def test_override_values_are_yaml_typed() -> None:
    cfg = load_config(
        "configs/quickstart.yaml",
        ["train.lr=1e-4", "eval.models=[base]", "data.packing=false", "train.warmup_steps=7"],
    )
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.eval.models == ["base"]
    assert cfg.data.packing is False
    assert cfg.train.warmup_steps == 7


def test_parse_override_yaml_values() -> None:
    assert parse_override("eval.models=[base]") == (["eval", "models"], ["base"])
    assert parse_override("train.lr=0.5") == (["train", "lr"], 0.5)
    assert parse_override("data.packing=true") == (["data", "packing"], True)
    assert parse_override('eval.stop=["a=b"]') == (["eval", "stop"], ["a=b"])
    assert parse_override("experiment.name=") == (["experiment", "name"], "")


@pytest.mark.parametrize("text", ["train.lr", "=3", "train..lr=3", ".lr=3", "train.=3"])
def test_malformed_override_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="override"):
        parse_override(text)


def test_override_into_a_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="train.lr: is a value, not a section"):
        apply_overrides(valid_raw(train={"lr": 0.1}), ["train.lr.x=1"])


@pytest.mark.parametrize("text", ["data.sources.1.path=x", "data.sources.x.path=x"])
def test_override_of_missing_list_item_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="no such list item"):
        apply_overrides(valid_raw(), [text])


# --- cross-field checks -----------------------------------------------------------------------


def test_global_batch_not_divisible() -> None:
    raw = valid_raw(train={"grad_accum": None, "global_batch_size": 6})  # 2 x 2 workers = 4
    assert "train.global_batch_size: 6 is not a multiple" in problems_of(raw)


def test_global_batch_and_grad_accum_disagree() -> None:
    raw = valid_raw(train={"global_batch_size": 16})  # 2 x 2 x 2 = 8
    assert "train.global_batch_size: 16 != micro_batch_size" in problems_of(raw)


def test_global_batch_and_grad_accum_agree() -> None:
    assert from_dict(valid_raw(train={"global_batch_size": 8})).train.global_batch() == 8


def test_offload_params_needs_zero3() -> None:
    raw = valid_raw(train={"offload_params": True, "zero_stage": 2})
    assert "train.offload_params:" in problems_of(raw)
    from_dict(valid_raw(train={"offload_params": True, "zero_stage": 3}))


def test_offload_optimizer_needs_zero() -> None:
    raw = valid_raw(train={"offload_optimizer": True, "zero_stage": 0})
    assert "train.offload_optimizer:" in problems_of(raw)


def test_fp16_needs_gpu() -> None:
    assert "train.precision: fp16 needs a GPU" in problems_of(
        valid_raw(train={"precision": "fp16"})
    )
    from_dict(valid_raw(train={"precision": "fp16", "use_gpu": True}))
    from_dict(valid_raw(train={"precision": "bf16"}))


@pytest.mark.parametrize(
    "split",
    [
        {"train": 0.9, "validation": 0.05, "test": 0.1},
        {"train": 1.2, "validation": -0.1, "test": -0.1},
    ],
)
def test_split_ratios_must_sum_to_one(split: dict[str, float]) -> None:
    assert "data.split: ratios must be >= 0 and sum to 1" in problems_of(
        valid_raw(data={"split": split})
    )


def test_unknown_split_name() -> None:
    text = problems_of(valid_raw(data={"split": {"train": 0.9, "dev": 0.1}}))
    assert "data.split: unknown split(s) ['dev']" in text


def test_stop_after_steps_beyond_max_steps() -> None:
    text = problems_of(valid_raw(train={"max_steps": 5, "stop_after_steps": 6}))
    assert "train.stop_after_steps:" in text


def test_missing_ds_config_file(tmp_path: Path) -> None:
    text = problems_of(valid_raw(train={"ds_config": str(tmp_path / "ds.json")}))
    assert "train.ds_config: file not found" in text


# --- batch arithmetic -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "accum", "global_batch"),
    [
        ({"micro_batch_size": 4, "grad_accum": 3, "num_workers": 2}, 3, 24),
        ({"micro_batch_size": 4, "global_batch_size": 32, "num_workers": 2}, 4, 32),
        ({"micro_batch_size": 1, "global_batch_size": 8, "num_workers": 8}, 1, 8),
        ({"micro_batch_size": 5, "num_workers": 3}, 1, 15),
    ],
)
def test_accumulation_and_global_batch(
    kwargs: dict[str, int], accum: int, global_batch: int
) -> None:
    train = TrainConfig(**kwargs)
    assert train.accumulation() == accum
    assert train.global_batch() == global_batch


# --- flatten and resolve_paths ----------------------------------------------------------------


def secret_config() -> Config:
    # Config.model_validate skips cross_check, which would reject unknown template params.
    raw = valid_raw(model={"name_or_path": MODEL, "tokenizer": MODEL})
    raw["data"]["sources"][0]["params"] = {
        "password": "hunter2",
        "hf_token": "hf_abc",
        "API_KEY": "k",
        "empty_token": "",
        "tokens_per_line": 3,
    }
    return Config.model_validate(raw)


def test_flatten_masks_secret_leaves() -> None:
    flat = flatten(secret_config())
    params = "data.sources.0.params"
    assert flat[f"{params}.password"] == "***"
    assert flat[f"{params}.hf_token"] == "***"
    assert flat[f"{params}.API_KEY"] == "***"
    assert "hunter2" not in flat.values() and "hf_abc" not in flat.values()


def test_flatten_keeps_token_counts_and_tokenizer_visible() -> None:
    flat = flatten(secret_config())
    assert flat["eval.max_new_tokens"] == "32"
    assert flat["model.tokenizer"] == MODEL
    assert flat["data.sources.0.params.tokens_per_line"] == "3"
    assert flat["data.sources.0.params.empty_token"] == ""  # nothing to hide


def test_flatten_keys_are_dotted_with_list_indices() -> None:
    flat = flatten(from_dict(valid_raw()))
    assert flat["data.sources.0.template"] == "sst2"
    assert flat["train.micro_batch_size"] == "2"
    assert flat["eval.models"] == "['base', 'finetuned']"


def test_resolve_paths_makes_local_paths_absolute() -> None:
    raw = valid_raw(
        experiment={"output_dir": "runs/x"},
        tracking={"tracking_uri": "sqlite:///mlflow.db"},
    )
    cfg = resolve_paths(from_dict(raw))
    assert cfg.experiment.output_dir == str(REPO / "runs/x")
    assert cfg.data_dir == str(REPO / "runs/x/data")
    assert cfg.model.name_or_path == str(REPO / MODEL)
    assert cfg.data.sources[0].path == str(REPO / SST2)
    assert cfg.tracking.tracking_uri == f"sqlite:///{REPO / 'mlflow.db'}"


def test_resolve_paths_does_not_mutate_its_input() -> None:
    cfg = from_dict(valid_raw())
    resolve_paths(cfg)
    assert cfg.data.sources[0].path == SST2


def test_resolve_paths_keeps_uris_and_hub_ids() -> None:
    raw = valid_raw(
        model={"name_or_path": "some-org/some-model"},
        data={
            "sources": [{"path": "s3://bucket/train.jsonl", "template": "sst2"}],
            "output_dir": "s3://bucket/data",
        },
        tracking={"tracking_uri": "http://mlflow:5000"},
    )
    cfg = resolve_paths(Config.model_validate(raw))
    assert cfg.data.sources[0].path == "s3://bucket/train.jsonl"
    assert cfg.data_dir == "s3://bucket/data"
    assert cfg.model.name_or_path == "some-org/some-model"
    assert cfg.tracking.tracking_uri == "http://mlflow:5000"


def test_uri_output_dir_derives_uri_data_and_model_dirs() -> None:
    raw = valid_raw(experiment={"output_dir": "s3://bucket/run"})
    cfg = resolve_paths(Config.model_validate(raw))
    assert cfg.experiment.output_dir == "s3://bucket/run"
    assert cfg.data_dir == "s3://bucket/run/data"
    assert cfg.model_dir == "s3://bucket/run/model"


# --- command line -----------------------------------------------------------------------------


def test_cli_rejects_unknown_key_fast() -> None:
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher",
            "prepare",
            "configs/quickstart.yaml",
            "data.no_such_key=1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert time.perf_counter() - start < 10
    assert proc.returncode != 0
    assert "data.no_such_key" in proc.stderr


def test_cli_config_error_starts_no_ray() -> None:
    code = (
        "import sys; from launcher.cli import main; "
        "rc = main(['prepare', 'configs/quickstart.yaml', 'data.no_such_key=1']); "
        "assert 'ray' not in sys.modules, 'ray was imported'; sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2, proc.stderr
    assert "data.no_such_key" in proc.stderr


# --- k-shot roles -------------------------------------------------------------------------------


def test_fewshot_role_needs_exemplar_count() -> None:
    assert "eval.models" in problems_of(valid_raw(eval={"models": ["base", "base_fewshot"]}))


def test_exemplar_count_needs_fewshot_role() -> None:
    assert "eval.few_shot" in problems_of(valid_raw(eval={"few_shot": 2}))


def test_fewshot_cannot_exceed_kept_exemplars() -> None:
    text = problems_of(
        valid_raw(eval={"models": ["base_fewshot"], "few_shot": 4}, data={"exemplars": 2})
    )
    assert "eval.few_shot" in text and "data.exemplars=2" in text


def test_fewshot_role_loads() -> None:
    cfg = from_dict(valid_raw(eval={"models": ["base", "base_fewshot"], "few_shot": 3}))
    assert cfg.eval.few_shot == 3 and cfg.data.exemplars >= 3
