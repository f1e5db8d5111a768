"""What a prepared dataset depends on, hashed: the reuse check of the prepare job.

`config_hash` covers the input files' bytes, the data settings, the seed, the templates (their
code), the tokenizer's files and the code of the data pipeline itself: a rerun with an equal
hash reuses the existing dataset; anything else recomputes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from data_pipeline import templates
from data_pipeline.inputs import filesystem

# The tokenizer's identity is every file in its folder except model weights (too big to hash).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def _file_digest(path: str, fmt: str) -> str:
    if fmt == "hf":
        h = hashlib.sha256()
        for f in sorted(Path(path).rglob("*")):
            if f.is_file():
                h.update(f.name.encode())
                h.update(f.read_bytes())
        return h.hexdigest()
    fs, p = filesystem(path)
    h = hashlib.sha256()
    with fs.open_input_stream(p, compression=None) as f:  # hash the bytes as stored
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def config_hash(cfg: Any, files: list[list[tuple[str, str]]], tok_path: str) -> str:
    """Everything the output depends on: file contents, templates (their code), tokenizer and
    settings."""
    data = cfg.data.model_dump(mode="json")
    data.pop("num_workers")  # the result must not depend on it
    data.pop("output_dir")
    tok_files = sorted(Path(tok_path).glob("*")) if Path(tok_path).is_dir() else []
    payload = {
        "version": 2,
        "data": data,
        "seed": cfg.experiment.seed,
        "files": [[(p, fmt, _file_digest(p, fmt)) for p, fmt in entries] for entries in files],
        "templates": [
            templates.template_fingerprint(s.template, s.params) for s in cfg.data.sources
        ],
        "tokenizer": [
            (f.name, hashlib.sha256(f.read_bytes()).hexdigest())
            for f in tok_files
            if f.is_file() and f.suffix not in WEIGHT_SUFFIXES
        ],
        "code": _code_fingerprint(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _code_fingerprint() -> str:
    """Hash of the code that builds the data, so that a change of how data is read, tokenized,
    split, packed or written recomputes: every module of this package but `templates`, whose
    templates are hashed one by one (a change of one template recomputes its sources only)."""
    h = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(package.glob("*.py")):
        if path.name not in ("templates.py", "__init__.py"):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    # The `chat` template's tokenizer path (the `chat` function itself is hashed per template).
    h.update(templates._definition_text(templates.tokenizer_chat_template).encode())
    return h.hexdigest()
