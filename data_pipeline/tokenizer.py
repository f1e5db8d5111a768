"""The tokenizer of the prepare job: loaded once on the driver, shipped to the workers.

The driver loads it with transformers (the reference every stage uses) and ships its Rust
backend as JSON (`tokenizer_spec`); the workers rebuild it with the `tokenizers` package
alone (`make_encoder`), which imports in a fraction of the time transformers takes.

The spec is cached on local disk, named by the content of the tokenizer's files and the
versions of the code that builds it, so a rerun (or another dataset with the same tokenizer)
neither imports transformers on the driver nor loads the tokenizer again: 0.1 to 0.2 s of a
1x prepare's serial start, and a few seconds of import in a fresh `ift prepare` process.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from data_pipeline.errors import PrepareError

# Where `tokenizer_spec` caches specs by default.
SPEC_CACHE = os.path.join(tempfile.gettempdir(), "ift-cache", "tokenizer-spec")
# Model weights: too big to hash, and no part of a tokenizer.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def tokenizer_files(path: str) -> list[tuple[str, str]]:
    """(name, sha256) of every file of a local tokenizer folder but model weights: its
    identity, for the prepare fingerprint and the spec cache. Empty for anything else."""
    folder = Path(path)
    if not folder.is_dir():
        return []
    return [
        (f.name, hashlib.sha256(f.read_bytes()).hexdigest())
        for f in sorted(folder.glob("*"))
        if f.is_file() and f.suffix not in WEIGHT_SUFFIXES
    ]


def tokenizer_spec(
    path: str,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
    files: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """What a worker needs to tokenize exactly as `AutoTokenizer.from_pretrained(path)` does.

    The driver loads the tokenizer once with transformers (the reference every stage uses) and
    ships its Rust backend as JSON: workers then need only the `tokenizers` package, which
    imports in a fraction of the time transformers takes. A tokenizer without a Rust backend
    is loaded by path in each worker instead.

    A local folder's spec is cached in `cache_dir` (default SPEC_CACHE, in `$TMPDIR`)
    under a key of its files' contents, the path, and the versions of transformers, tokenizers
    and this module; `trust_remote_code` tokenizers (whose code may live elsewhere) are not.
    `files` is `tokenizer_files(path)` when the caller has it already (hashed if None).
    """
    key = _spec_key(path, trust_remote_code, files)
    base = cache_dir or SPEC_CACHE
    cached = os.path.join(base, f"{key}.json") if key else None
    if cached and os.path.exists(cached):
        try:
            with open(cached) as f:
                spec: dict[str, Any] = json.load(f)
            return spec
        except (OSError, ValueError):
            pass  # unreadable: build it again below, and replace it
    spec = _build_spec(path, trust_remote_code)
    if cached:
        try:
            os.makedirs(base, exist_ok=True)
            tmp = f"{cached}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            with open(tmp, "w") as f:
                json.dump(spec, f)
            os.replace(tmp, cached)  # readers never see a partial file
        except OSError:
            pass  # a read-only or full temp folder costs the next run a load, nothing else
    return spec


def _spec_key(
    path: str, trust_remote_code: bool, files: list[tuple[str, str]] | None
) -> str | None:
    if trust_remote_code:
        return None
    if files is None:
        files = tokenizer_files(path)
    if not files:
        return None
    versions = [metadata.version(p) for p in ("transformers", "tokenizers")]
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    payload = json.dumps([os.path.abspath(path), files, versions, code])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _build_spec(path: str, trust_remote_code: bool) -> dict[str, Any]:
    tok = load_tokenizer(path, trust_remote_code)
    bos, eos = special_ids(tok)
    backend = getattr(tok, "backend_tokenizer", None)
    # The tokenizer's own chat template (tokenizer_config.json or chat_template.jinja, as
    # transformers resolved it), rendered by the `chat` template in the workers.
    chat_template = getattr(tok, "chat_template", None)
    if isinstance(chat_template, dict):  # named templates: the default one
        chat_template = chat_template.get("default")
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    return {
        "json": backend.to_str() if backend is not None else None,
        "path": path,
        "trust_remote_code": trust_remote_code,
        "bos": bos,
        "eos": eos,
        "chat_template": chat_template if isinstance(chat_template, str) else None,
        "vocab_size": len(tok),  # the token store's id dtype
        "special_tokens": {n: v for n in names if isinstance(v := getattr(tok, n, None), str)},
    }


def make_encoder(spec: dict[str, Any]) -> Callable[[list[str]], list[list[int]]]:
    """texts -> token ids without special tokens, truncation or padding (see tokenizer_spec)."""
    if spec["json"] is None:
        tok = load_tokenizer(spec["path"], spec["trust_remote_code"])

        def encode_slow(texts: list[str]) -> list[list[int]]:
            return tok(texts, add_special_tokens=False)["input_ids"]  # type: ignore[no-any-return]

        return encode_slow
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(spec["json"])
    # transformers clears these for a call without truncation or padding; so must we.
    backend.no_truncation()
    backend.no_padding()
    # encode_batch_fast skips the character offsets, which nothing here uses.
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    # From a folder without tokenizer files (a config-only model folder) transformers 5 builds
    # an empty tokenizer instead of failing: every text would encode to no ids at all.
    if len(tok) <= len(set(tok.all_special_ids)):
        raise PrepareError(
            f"{path}: no tokenizer in this folder (tokenizer.json, tokenizer.model, ...); "
            "set model.tokenizer to a folder that has one"
        )
    return tok


def special_ids(tok: Any) -> tuple[int | None, int]:
    """(bos, eos) as ift uses them: no BOS for tokenizers whose BOS is their EOS (GPT-2)."""
    eos = tok.eos_token_id
    if eos is None:
        raise PrepareError(f"tokenizer {tok.name_or_path} has no EOS token")
    bos = tok.bos_token_id
    return (None if bos is None or bos == eos else bos), eos
