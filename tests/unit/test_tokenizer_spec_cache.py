"""The prepare driver's tokenizer spec cache (data_pipeline/tokenizer.py): a hit is exactly the
spec a fresh load gives and loads nothing; any change of the tokenizer's files, a
`trust_remote_code` tokenizer or an unreadable cache file loads it again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from data_pipeline import tokenizer
from data_pipeline.errors import PrepareError

STORIES = Path(__file__).resolve().parents[1] / "assets/models/stories260K"


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """The real stories260K tokenizer files, without the weights."""
    dest = tmp_path / "tok"
    dest.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(STORIES / name, dest / name)
    return dest


@pytest.fixture()
def builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every real load of a tokenizer (the cache's misses)."""
    calls: list[str] = []
    real = tokenizer._build_spec

    def counted(path: str, trust_remote_code: bool) -> dict[str, Any]:
        calls.append(path)
        return real(path, trust_remote_code)

    monkeypatch.setattr(tokenizer, "_build_spec", counted)
    return calls


def test_a_hit_is_the_fresh_spec_and_loads_nothing(
    folder: Path, tmp_path: Path, builds: list[str]
) -> None:
    cache = str(tmp_path / "cache")
    first = tokenizer.tokenizer_spec(str(folder), cache_dir=cache)
    second = tokenizer.tokenizer_spec(str(folder), cache_dir=cache)
    assert builds == [str(folder)]
    assert second == first == tokenizer._build_spec(str(folder), False)
    # What the workers build from it encodes as the fresh tokenizer does.
    text = ["Once upon a time, Lily saw a big red ball."]
    assert tokenizer.make_encoder(second)(text) == tokenizer.make_encoder(first)(text)
    assert [p.suffix for p in Path(cache).iterdir()] == [".json"]  # no temporary left behind


def test_a_changed_tokenizer_file_is_loaded_again(
    folder: Path, tmp_path: Path, builds: list[str]
) -> None:
    cache = str(tmp_path / "cache")
    before = tokenizer.tokenizer_spec(str(folder), cache_dir=cache)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    after = tokenizer.tokenizer_spec(str(folder), cache_dir=cache)
    assert len(builds) == 2
    assert before["chat_template"] is None
    assert after["chat_template"] == config["chat_template"]
    # The same content again (a file rewritten unchanged) is a hit: the key is the content.
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert tokenizer.tokenizer_spec(str(folder), cache_dir=cache) == after
    assert len(builds) == 2


def test_remote_code_tokenizers_and_unreadable_entries_are_loaded_again(
    folder: Path, tmp_path: Path, builds: list[str]
) -> None:
    cache = tmp_path / "cache"
    for _ in range(2):
        tokenizer.tokenizer_spec(str(folder), trust_remote_code=True, cache_dir=str(cache))
    assert len(builds) == 2 and not cache.exists()  # its code may live outside the folder

    spec = tokenizer.tokenizer_spec(str(folder), cache_dir=str(cache))
    (entry,) = cache.iterdir()
    entry.write_text(entry.read_text()[:1000])  # a torn file, as a full disk might leave
    assert tokenizer.tokenizer_spec(str(folder), cache_dir=str(cache)) == spec
    assert len(builds) == 4
    assert json.loads(entry.read_text()) == spec  # replaced by the good one


def test_a_folder_without_a_tokenizer_is_refused_every_time(tmp_path: Path) -> None:
    # A config-only model folder: no spec is cached for it, so the error comes every time.
    folder = STORIES.parent / "configs/Qwen2.5-7B"
    cache = tmp_path / "cache"
    for _ in range(2):
        with pytest.raises(PrepareError, match="no tokenizer in this folder"):
            tokenizer.tokenizer_spec(str(folder), cache_dir=str(cache))
    assert not cache.exists() or not any(cache.iterdir())
