"""What a prepared dataset depends on, hashed: the reuse check of the prepare job.

`config_hash` covers the input files' bytes, the data settings, the seed, the templates (their
code), the tokenizer's files and the code of the data pipeline itself: a rerun with an equal
hash reuses the existing dataset; anything else recomputes.

Hashing every input byte on every run would make a cached rerun read the whole input again
(from object storage too), so each input's digest is kept in the manifest with the file's
size and modification time (`input_digests`). A rerun re-hashes only a file whose size or
mtime changed, or one that was modified less than TRUST_NS before it was hashed: a write in
the same tick of a coarse clock (1 s on S3 and some filesystems) as the hash could change the
bytes without changing the mtime, the "racy" case git's index guards against the same way.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from data_pipeline import templates
from data_pipeline.inputs import filesystem
from data_pipeline.tokenizer import tokenizer_files

# A recorded digest is trusted only for a file last modified this long before it was hashed.
TRUST_NS = 2_000_000_000


def input_digests(
    files: list[list[tuple[str, str]]], known: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Each input file's digest, re-using the `known` one (an earlier manifest's `inputs`) when
    the file's size and mtime are as recorded and its mtime is TRUST_NS older than the hash.

    Returns:
        Per file, in order: `path`, `format`, `size`, `mtime_ns`, `hashed_at_ns`, `digest`.
    """
    recorded = {(k["path"], k["format"]): k for k in known or []}
    out = []
    for entries in files:
        for path, fmt in entries:
            size, mtime_ns = _stat(path, fmt)
            old = recorded.get((path, fmt))
            if (
                old is not None
                and (old["size"], old["mtime_ns"]) == (size, mtime_ns)
                and old["hashed_at_ns"] - mtime_ns >= TRUST_NS
            ):
                out.append(old)
                continue
            hashed_at = time.time_ns()  # before reading: a write during the hash is racy too
            out.append(
                {
                    "path": path,
                    "format": fmt,
                    "size": size,
                    "mtime_ns": mtime_ns,
                    "hashed_at_ns": hashed_at,
                    "digest": _file_digest(path, fmt),
                }
            )
    return out


def _stat(path: str, fmt: str) -> tuple[int, int]:
    """(size, mtime in ns) of a file, or of a `datasets` folder (total size, newest mtime)."""
    if fmt == "hf":
        stats = [f.stat() for f in Path(path).rglob("*") if f.is_file()]
        return sum(st.st_size for st in stats), max((st.st_mtime_ns for st in stats), default=0)
    fs, p = filesystem(path)
    info = fs.get_file_info(p)
    mtime = info.mtime_ns if info.mtime_ns is not None else 0
    return int(info.size or 0), int(mtime)


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


def config_hash(
    cfg: Any,
    files: list[list[tuple[str, str]]],
    tok_path: str,
    inputs: list[dict[str, Any]] | None = None,
    tok_files: list[tuple[str, str]] | None = None,
) -> str:
    """Everything the output depends on: file contents, templates (their code), tokenizer and
    settings.

    Args:
        cfg: The validated config.
        files: Each source's (file, format) list, as `inputs.expand` gives it.
        tok_path: The tokenizer folder.
        inputs: `input_digests(files)`, when the caller has it already (computed if None).
        tok_files: `tokenizer.tokenizer_files(tok_path)`, likewise.
    """
    if inputs is None:
        inputs = input_digests(files)
    digest = {(i["path"], i["format"]): i["digest"] for i in inputs}
    data = cfg.data.model_dump(mode="json")
    data.pop("num_workers")  # the result must not depend on it
    data.pop("output_dir")
    payload = {
        "version": 2,
        "data": data,
        "seed": cfg.experiment.seed,
        "files": [[(p, fmt, digest[p, fmt]) for p, fmt in entries] for entries in files],
        "templates": [
            templates.template_fingerprint(s.template, s.params) for s in cfg.data.sources
        ],
        # Every file of its folder but model weights.
        "tokenizer": tokenizer_files(tok_path) if tok_files is None else tok_files,
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
