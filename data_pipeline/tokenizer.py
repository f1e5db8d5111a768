"""The tokenizer of the prepare job: loaded once on the driver, shipped to the workers.

The driver loads it with transformers (the reference every stage uses) and ships its Rust
backend as JSON (`tokenizer_spec`); the workers rebuild it with the `tokenizers` package
alone (`make_encoder`), which imports in a fraction of the time transformers takes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from data_pipeline.errors import PrepareError


def tokenizer_spec(path: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """What a worker needs to tokenize exactly as `AutoTokenizer.from_pretrained(path)` does.

    The driver loads the tokenizer once with transformers (the reference every stage uses) and
    ships its Rust backend as JSON: workers then need only the `tokenizers` package, which
    imports in a fraction of the time transformers takes. A tokenizer without a Rust backend
    is loaded by path in each worker instead.
    """
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
