"""Property-based tests (hypothesis) of the config loader and the template loaders.

Whatever a user types, `ift` answers with a `ConfigError` naming the key (config) or a reject
reason (record), never a traceback. Nothing is mocked: the real loaders on the real assets.
Example counts are small so that the whole module stays a few seconds in `make test`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipeline import templates
from launcher.config import (
    Config,
    ConfigError,
    apply_overrides,
    flatten,
    from_dict,
    load_config,
    to_yaml,
)

ROOT = Path(__file__).resolve().parents[2]
MODEL = str(ROOT / "tests" / "assets" / "models" / "stories260K")
SST2 = str(ROOT / "tests" / "assets" / "quickstart" / "sst2_train.tsv")


def examples(n: int) -> Any:
    """Settings for `n` examples: no deadline (the machine is shared), health checks relaxed,
    the same examples on every run (CI stays deterministic) and no example database on disk."""
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


def base_raw() -> dict[str, Any]:
    """A valid raw config with absolute paths (hypothesis may not change the working dir)."""
    return {
        "experiment": {"name": "prop", "output_dir": "/tmp/ift-prop"},
        "model": {"name_or_path": MODEL},
        "data": {"sources": [{"path": SST2, "template": "sst2"}]},
        "train": {"micro_batch_size": 2, "grad_accum": 2, "num_workers": 2},
        "tracking": {"enabled": False},
    }


# --- arbitrary dotted overrides -------------------------------------------------------------

# Real key names (so that examples reach deep into the schema) mixed with arbitrary text.
KNOWN_SEGMENTS = [
    "experiment", "model", "data", "train", "eval", "tracking", "cluster", "name", "output_dir",
    "seed", "name_or_path", "tokenizer", "dtype", "trust_remote_code", "sources", "0", "1",
    "path", "template", "params", "split", "format", "metrics", "max_records", "max_seq_len",
    "packing", "num_workers", "exemplars", "lr", "epochs", "max_steps", "micro_batch_size",
    "grad_accum", "global_batch_size", "zero_stage", "offload_params", "offload_optimizer",
    "precision", "use_gpu", "gpus_per_worker", "cpus_per_worker", "ds_config", "lora", "r",
    "betas", "models", "few_shot", "max_new_tokens", "stop", "tracking_uri", "address",
    "worker_cpu", "head_cpu_limit", "namespace", "tolerations", "train", "prompt", "completion",
]  # fmt: skip
segment = st.one_of(
    st.sampled_from(KNOWN_SEGMENTS),
    st.text(st.characters(blacklist_characters=".=", codec="utf-8"), min_size=1),
)
dotted_key = st.lists(segment, min_size=1, max_size=5).map(".".join)
YAML_VALUES = [
    "1", "0", "-1", "3", "4", "1e-4", "-0.5", ".inf", "-.inf", ".nan", "true", "false", "null",
    "~", "[]", "{}", "[1, 2]", "{a: 1}", "[", "{", "'", '"', "!!python/object:os.system x",
    "!!binary AAAA", "2020-01-01", "sst2", "wmt", "{prompt: '{{ x }}', completion: y}",
    "fp16", "bf16", "[base_fewshot]", "1" * 400, "1.0e+400", "/no/such/path", "8Gi", "500m",
    "abc", "&a [*a]",
]  # fmt: skip
value_text = st.one_of(
    st.sampled_from(YAML_VALUES),
    st.text(st.characters(codec="utf-8"), max_size=20),
)
override = st.tuples(dotted_key, value_text).map(lambda kv: f"{kv[0]}={kv[1]}")


def names_key(message: str, key: str) -> bool:
    """The message names the override's key, or the prefix of it that is wrong."""
    parts = key.split(".")
    prefixes = [".".join(parts[:n]) for n in range(1, len(parts) + 1)]
    return any(p in message for p in prefixes)


@examples(60)
@given(text=override)
def test_one_override_loads_or_names_its_key(text: str) -> None:
    key = text.split("=", 1)[0]
    try:
        cfg = from_dict(apply_overrides(base_raw(), [text]))
    except ConfigError as e:
        assert names_key(str(e), key), (text, str(e))
    else:
        assert isinstance(cfg, Config)


@examples(40)
@given(texts=st.lists(override, min_size=1, max_size=4))
def test_many_overrides_load_or_raise_config_error_only(texts: list[str]) -> None:
    try:
        from_dict(apply_overrides(base_raw(), texts))
    except ConfigError as e:
        assert str(e)  # every other exception type fails the test


@examples(20)
@given(texts=st.lists(override, max_size=3), body=st.sampled_from(["ok", "list", "bad-yaml"]))
def test_load_config_from_a_file_raises_only_config_error(
    tmp_path_factory: pytest.TempPathFactory, texts: list[str], body: str
) -> None:
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    text = {"ok": yaml.safe_dump(base_raw()), "list": "- 1\n", "bad-yaml": "a: [\n"}[body]
    path.write_text(text)
    try:
        load_config(path, texts)
    except ConfigError as e:
        assert str(e)


# --- valid configs round-trip ---------------------------------------------------------------

finite = st.floats(min_value=1e-8, max_value=10.0, allow_nan=False, allow_infinity=False)
free_text = st.text(st.characters(codec="utf-8"), max_size=30)


@st.composite
def valid_raw(draw: st.DrawFn) -> dict[str, Any]:
    raw = base_raw()
    workers = draw(st.integers(1, 4))
    micro = draw(st.integers(1, 16))
    accum = draw(st.integers(1, 8))
    batch: dict[str, Any] = (
        {"grad_accum": accum}
        if draw(st.booleans())
        else {"global_batch_size": micro * accum * workers}
    )
    raw["experiment"] = {
        "name": draw(free_text),
        "output_dir": "/tmp/" + draw(st.text("abcxyz-_/", min_size=1, max_size=10)),
        "seed": draw(st.integers(-(2**63), 2**63 - 1)),
    }
    raw["train"] = {
        "micro_batch_size": micro,
        "num_workers": workers,
        "lr": draw(finite),
        "zero_stage": draw(st.sampled_from([0, 1, 2, 3])),
        "precision": draw(st.sampled_from(["fp32", "bf16"])),
        "schedule": draw(st.sampled_from(["cosine", "linear", "constant"])),
        "betas": [draw(st.floats(0, 0.999)), draw(st.floats(0, 0.999))],
        **batch,
    }
    raw["eval"] = {
        "max_new_tokens": draw(st.integers(1, 4096)),
        "stop": draw(st.lists(free_text, max_size=3)),
        "temperature": draw(st.floats(0, 2)),
    }
    raw["tracking"] = {
        "enabled": draw(st.booleans()),
        "experiment_name": draw(free_text),
    }
    raw["data"]["sources"][0]["name"] = draw(st.text("abcdef_", min_size=1, max_size=8))
    return raw


def leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """The leaves `flatten` keeps: dicts and lists of dicts are walked, other lists are leaves."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= leaves(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, list) and value and isinstance(value[0], dict):
        out = {}
        for i, v in enumerate(value):
            out |= leaves(v, f"{prefix}.{i}")
        return out
    return {prefix: value}


@examples(20)
@given(raw=valid_raw())
def test_valid_configs_round_trip_through_yaml_and_flatten(raw: dict[str, Any]) -> None:
    cfg = from_dict(raw)
    again = from_dict(yaml.safe_load(to_yaml(cfg, redact=False)))
    assert again == cfg
    # No secret in these configs: the redacted YAML (what MLflow gets) is the same config.
    assert from_dict(yaml.safe_load(to_yaml(cfg))) == cfg
    flat = flatten(cfg)
    expected = leaves(cfg.model_dump(mode="json"))
    assert flat.keys() == expected.keys()
    for key, value in expected.items():
        assert flat[key] == str(value), key
    assert float(flat["train.lr"]) == cfg.train.lr
    assert int(flat["experiment.seed"]) == cfg.experiment.seed


# --- secrets never reach params or the logged config YAML -----------------------------------


def texts(value: Any) -> list[str]:
    """Every string leaf of a parsed YAML document."""
    if isinstance(value, dict):
        return [t for v in value.values() for t in texts(v)]
    if isinstance(value, list):
        return [t for v in value for t in texts(v)]
    return [value] if isinstance(value, str) else []


# Printable ASCII without space: `@`, `/`, `:`, `?`, `#`, `&` included, as users type them.
password = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=16).map(
    lambda s: "Pw9" + s
)
URI_FORMS = [
    "postgresql://mlflow:{pw}@db.internal:5432/mlflow",
    "https://user:{pw}@mlflow.example.com",
    "redis://:{pw}@cache:6379/0",
    "http://mlflow.example.com/?access_token={pw}",
    "s3://bucket/run?X-Amz-Signature={pw}&x=1",
]


@examples(30)
@given(pw=password, form=st.sampled_from(URI_FORMS), where=st.sampled_from(["tracking", "address"]))
def test_uri_passwords_are_masked_in_params_and_logged_yaml(pw: str, form: str, where: str) -> None:
    raw = base_raw()
    uri = form.format(pw=pw)
    if where == "tracking":
        raw["tracking"] = {"enabled": False, "tracking_uri": uri}
    else:
        raw["cluster"] = {"address": uri}
    cfg = from_dict(raw)
    assert all(pw not in v for v in flatten(cfg).values()), flatten(cfg)
    # Compared parsed: YAML may escape characters, which would hide a leak from `in`.
    assert not any(pw in v for v in texts(yaml.safe_load(to_yaml(cfg))))
    assert any(pw in v for v in texts(yaml.safe_load(to_yaml(cfg, redact=False))))  # kept there


# --- template loaders ------------------------------------------------------------------------

json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(st.characters(codec="utf-8"), max_size=30),
)
json_value = st.recursive(
    json_scalar,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = [
    "instruction", "input", "output", "messages", "role", "content", "sentence", "label",
    "review", "rating", "verified_reviews", "article", "highlights", "translation", "de", "en",
    "context", "question", "answers", "text", "answer_start", "tokens", "ner_tags", "id",
]  # fmt: skip
record = st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), json_value)
chat_record = st.fixed_dictionaries(
    {
        "messages": st.lists(
            st.dictionaries(
                st.sampled_from(["role", "content", "loss_weight"]),
                st.one_of(st.sampled_from(["user", "assistant", "system"]), json_value),
            ),
            max_size=4,
        )
    }
)
BUILTINS: list[tuple[str, dict[str, Any]]] = [
    ("alpaca", {}),
    ("chat", {}),
    ("sst2", {"phrasings": True}),
    ("amazon_reviews", {}),
    ("amazon_reviews", {"target": "sentiment"}),
    ("cnn_dailymail", {}),
    ("wmt", {"source_lang": "de", "target_lang": "en"}),
    ("squad", {}),
    ("conll2003", {}),
]


def check_turns(turns: Any) -> None:
    assert isinstance(turns, list) and turns
    for prompt, completion in turns:
        assert isinstance(prompt, str) and isinstance(completion, str) and completion.strip()


@examples(80)
@given(
    builtin=st.sampled_from(BUILTINS),
    rec=st.one_of(record, chat_record, json_value),
)
def test_builtin_templates_render_or_give_a_reject_reason(
    builtin: tuple[str, dict[str, Any]], rec: Any
) -> None:
    name, params = builtin
    render = templates.renderer(name, params)
    try:
        turns = render(rec)
    except templates.TemplateError as e:
        assert str(e)  # the reason that goes to rejects.jsonl
    else:
        check_turns(turns)


jinja_text = st.one_of(
    st.text(max_size=40),
    st.lists(
        st.sampled_from(
            [
                "{{ ", " }}", "{% ", " %}", "{# ", " #}", "x", "record", ".", "__class__", "|",
                "upper", "(", ")", "[", "]", "'", "1", "if", "for", "in", "endif", "endfor",
                "set", "=", "import", "include", "'os'", "as", "range", "9999999", "*", " ",
                "lipsum", "cycler", "__globals__", "attr", "format", "~", "\n",
            ]
        ),
        max_size=14,
    ).map("".join),
)  # fmt: skip


@examples(80)
@given(prompt=jinja_text, completion=jinja_text, rec=record)
def test_custom_jinja_templates_render_in_the_sandbox_or_are_refused(
    prompt: str, completion: str, rec: dict[str, Any]
) -> None:
    spec = {"prompt": prompt, "completion": completion + " {{ 'ok' }}"}
    try:
        templates.validate_template(spec)
    except ValueError as e:
        assert "custom template" in str(e)  # a config error naming the part
        return
    try:
        turns = templates.render(spec, rec)
    except templates.TemplateError as e:
        assert str(e).startswith("custom template")
    else:
        check_turns(turns)
        assert "<class" not in "".join(p + c for p, c in turns)


def test_inf_and_nan_are_config_errors() -> None:
    """Found by the override property: `.inf` passed every `gt=0` check (train.lr=.inf)."""
    for text in ("train.lr=.inf", "train.epochs=.inf", "data.split.train=.nan"):
        with pytest.raises(ConfigError, match=text.split("=")[0].replace(".", r"\.")):
            from_dict(apply_overrides(base_raw(), [text]))
    assert math.isfinite(from_dict(base_raw()).train.lr)
