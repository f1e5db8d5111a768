"""Convert a llama2.c checkpoint and its SentencePiece tokenizer to a Hugging Face folder.

llama2.c (karpathy/llama2.c) stores its tiny TinyStories models in a "legacy" binary format:
a header of seven int32 values followed by raw fp32 tensors. This module reads that format
without pickle, builds the equivalent `LlamaForCausalLM` and a tokenizer that encodes exactly
like `sentencepiece.SentencePieceProcessor`, and writes them with `save_pretrained`, so the rest
of the project can load the model with `AutoModelForCausalLM.from_pretrained(folder)`.

Run it as::

    python -m training.llama2c --checkpoint stories260K.bin --tokenizer tok512.model \
        --out tests/assets/models/stories260K
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, TokenizersBackend

# llama2.c's run.c hard-codes these; the checkpoint does not store them.
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0

# Number of int32 values in the legacy header.
_HEADER_INTS = 7
# The versioned llama2.c export (export.py --version 1/2) starts with this magic instead.
_VERSIONED_MAGIC = 0x616B3432  # "ak42"

# Strings the converted tokenizer must encode exactly like SentencePiece: they cover the dummy
# prefix, runs of spaces (which SentencePiece collapses), newlines and byte fallback.
_TOKENIZER_PROBES = (
    "Once upon a time, there was a little girl named Lily.",
    "  two  spaces\nand a newline\n\n",
    'She said, "Héllo wörld 🙂"',
)


@dataclass(frozen=True)
class Llama2cHeader:
    """Model hyper-parameters from the header of a legacy llama2.c checkpoint.

    Attributes:
        dim: Width of the residual stream.
        hidden_dim: Width of the SwiGLU feed-forward layer.
        n_layers: Number of transformer blocks.
        n_heads: Number of query heads.
        n_kv_heads: Number of key/value heads (fewer than `n_heads` means grouped-query attention).
        vocab_size: Number of token ids.
        seq_len: Maximum sequence length the model was trained with.
        shared_classifier: Whether the output head reuses the token embedding.
    """

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Output width of the key and value projections."""
        return self.n_kv_heads * self.head_dim


def parse_header(data: bytes) -> Llama2cHeader:
    """Parses the seven little-endian int32 values that start a legacy llama2.c checkpoint.

    Args:
        data: The checkpoint bytes (at least the header).

    Returns:
        The parsed header.

    Raises:
        ValueError: If the data is too short, uses the versioned export format, or holds
            impossible sizes.
    """
    if len(data) < 4 * _HEADER_INTS:
        raise ValueError(f"checkpoint too short for a header: {len(data)} bytes")
    values = [int(v) for v in np.frombuffer(data, dtype="<i4", count=_HEADER_INTS)]
    if np.frombuffer(data, dtype="<u4", count=1)[0] == _VERSIONED_MAGIC:
        raise ValueError("versioned llama2.c export ('ak42' magic) is not supported; use legacy")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = values
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    # vocab_size alone may be negative (its sign is the shared-classifier flag).
    problems = [
        f"{name}={value} is invalid"
        for name, value in zip(names, values, strict=True)
        if value == 0 or (value < 0 and name != "vocab_size")
    ]
    if not problems and dim % n_heads:
        problems.append(f"dim={dim} is not divisible by n_heads={n_heads}")
    if not problems and n_heads % n_kv_heads:
        problems.append(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
    if problems:
        raise ValueError("invalid llama2.c header: " + "; ".join(problems))
    # llama2.c signals an unshared output head with a negative vocab size (run.c).
    return Llama2cHeader(
        dim=dim,
        hidden_dim=hidden_dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=abs(vocab_size),
        seq_len=seq_len,
        shared_classifier=vocab_size > 0,
    )


def permute_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorders a query or key projection from interleaved to half-split RoPE layout.

    llama2.c (like Meta's Llama) rotates adjacent pairs (0, 1), (2, 3), ... of each head,
    while Hugging Face's Llama rotates (i, i + head_dim / 2). Permuting the output rows of
    wq/wk makes both compute the same attention scores.

    Args:
        weight: A `(n_heads * head_dim, in_features)` projection weight.
        n_heads: Number of heads the rows belong to (`n_kv_heads` for the key projection).

    Returns:
        The permuted weight, same shape.
    """
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return (
        weight.view(n_heads, head_dim // 2, 2, in_features)
        .transpose(1, 2)
        .reshape(out_features, in_features)
    )


def read_checkpoint(path: str | Path) -> tuple[Llama2cHeader, dict[str, torch.Tensor]]:
    """Reads a legacy llama2.c checkpoint into a Hugging Face Llama state dict.

    Args:
        path: Path to the `.bin` checkpoint.

    Returns:
        The header and a state dict keyed by `LlamaForCausalLM` parameter names, with wq/wk
        already permuted to Hugging Face's RoPE layout. With a shared classifier the dict has
        no `lm_head.weight`: the model ties it to the embedding.

    Raises:
        ValueError: If the header is invalid or the file size does not match it.
    """
    data = Path(path).read_bytes()
    header = parse_header(data)
    h = header
    # Tensor shapes in file order (export.py legacy_export); each one stacks all layers.
    layout: list[tuple[str, tuple[int, ...]]] = [
        ("tok_embeddings", (h.vocab_size, h.dim)),
        ("attention_norm", (h.n_layers, h.dim)),
        ("wq", (h.n_layers, h.dim, h.dim)),
        ("wk", (h.n_layers, h.kv_dim, h.dim)),
        ("wv", (h.n_layers, h.kv_dim, h.dim)),
        ("wo", (h.n_layers, h.dim, h.dim)),
        ("ffn_norm", (h.n_layers, h.dim)),
        ("w1", (h.n_layers, h.hidden_dim, h.dim)),
        ("w2", (h.n_layers, h.dim, h.hidden_dim)),
        ("w3", (h.n_layers, h.hidden_dim, h.dim)),
        ("norm", (h.dim,)),
        # Precomputed RoPE tables: Hugging Face recomputes them from rope_theta.
        ("freq_cis_real", (h.seq_len, h.head_dim // 2)),
        ("freq_cis_imag", (h.seq_len, h.head_dim // 2)),
    ]
    if not h.shared_classifier:
        layout.append(("wcls", (h.vocab_size, h.dim)))
    expected = sum(int(np.prod(shape)) for _, shape in layout)
    floats = np.frombuffer(data, dtype="<f4", offset=4 * _HEADER_INTS)
    if floats.size != expected:
        raise ValueError(f"{path}: header implies {expected} fp32 values, file holds {floats.size}")
    raw: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in layout:
        size = int(np.prod(shape))
        # Copy: frombuffer views are read-only and torch wants writable memory.
        raw[name] = torch.from_numpy(floats[offset : offset + size].reshape(shape).copy())
        offset += size

    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": raw["tok_embeddings"],
        "model.norm.weight": raw["norm"],
    }
    if not h.shared_classifier:
        state["lm_head.weight"] = raw["wcls"]
    for i in range(h.n_layers):
        prefix = f"model.layers.{i}"
        state[f"{prefix}.input_layernorm.weight"] = raw["attention_norm"][i]
        state[f"{prefix}.self_attn.q_proj.weight"] = permute_rope(raw["wq"][i], h.n_heads)
        # The key projection has only n_kv_heads heads (grouped-query attention).
        state[f"{prefix}.self_attn.k_proj.weight"] = permute_rope(raw["wk"][i], h.n_kv_heads)
        state[f"{prefix}.self_attn.v_proj.weight"] = raw["wv"][i]
        state[f"{prefix}.self_attn.o_proj.weight"] = raw["wo"][i]
        state[f"{prefix}.post_attention_layernorm.weight"] = raw["ffn_norm"][i]
        state[f"{prefix}.mlp.gate_proj.weight"] = raw["w1"][i]
        state[f"{prefix}.mlp.down_proj.weight"] = raw["w2"][i]
        state[f"{prefix}.mlp.up_proj.weight"] = raw["w3"][i]
    return header, {name: t.contiguous() for name, t in state.items()}


def build_config(header: Llama2cHeader, bos_id: int, eos_id: int, pad_id: int) -> LlamaConfig:
    """Builds the `LlamaConfig` equivalent to a llama2.c model.

    Args:
        header: The checkpoint header.
        bos_id: Beginning-of-sequence token id.
        eos_id: End-of-sequence token id.
        pad_id: Padding token id.

    Returns:
        The configuration, fp32, no biases, SiLU, RoPE theta and RMSNorm epsilon as in run.c.
    """
    return LlamaConfig(
        vocab_size=header.vocab_size,
        hidden_size=header.dim,
        intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers,
        num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads,
        head_dim=header.head_dim,
        hidden_act="silu",
        max_position_embeddings=header.seq_len,
        rms_norm_eps=RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=header.shared_classifier,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )


def build_model(
    checkpoint: str | Path, bos_id: int = 1, eos_id: int = 2, pad_id: int = 0
) -> LlamaForCausalLM:
    """Loads a legacy llama2.c checkpoint as a `LlamaForCausalLM`.

    Args:
        checkpoint: Path to the `.bin` checkpoint.
        bos_id: Beginning-of-sequence token id (1 in llama2.c tokenizers).
        eos_id: End-of-sequence token id (2 in llama2.c tokenizers).
        pad_id: Padding token id written to the config and generation config.

    Returns:
        The model in eval mode, fp32, with greedy decoding as its generation default.
    """
    header, state = read_checkpoint(checkpoint)
    config = build_config(header, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    # The random initialisation is overwritten at once; the models this targets are tiny.
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # With tied embeddings lm_head.weight *is* embed_tokens.weight, so it may be reported missing.
    allowed_missing = {"lm_head.weight"} if header.shared_classifier else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if header.shared_classifier and (
        model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    ):
        raise RuntimeError("lm_head is not tied to embed_tokens although the header says shared")
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False
    )
    return model.eval()


def build_tokenizer(sp_model: str | Path, model_max_length: int) -> TokenizersBackend:
    """Builds a fast Hugging Face tokenizer that encodes like the SentencePiece model.

    `LlamaTokenizer` is not used on purpose: it ignores SentencePiece's normalizer spec, so it
    would keep runs of spaces that tok512.model collapses (the spaces the model was trained
    on). `TokenizersBackend` built from the `.model` file follows that spec.

    Args:
        sp_model: Path to the SentencePiece `.model` file.
        model_max_length: Longest sequence the model accepts (the checkpoint's seq_len).

    Returns:
        A tokenizer that prepends BOS (when `add_special_tokens` is true, the default) and
        pads with `<unk>` (id 0) when the vocabulary has it, else with EOS.

    Raises:
        ValueError: If the tokenizer disagrees with SentencePiece on a probe string.
    """
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    kwargs = TokenizersBackend.convert_to_native_format(vocab_file=str(sp_model))
    # A pad id the model never predicts keeps padding distinguishable from a real EOS.
    pad_id = sp.unk_id() if sp.unk_id() >= 0 else sp.eos_id()
    tokenizer = TokenizersBackend(
        **kwargs,
        pad_token=sp.id_to_piece(pad_id),
        # llama2.c trained every story starting with BOS, so sequences start with it by default.
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=model_max_length,
    )
    for text in _TOKENIZER_PROBES:
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        theirs = sp.encode(text)
        if ours != theirs:
            raise ValueError(
                f"tokenizer differs from SentencePiece on {text!r}: {ours} != {theirs}"
            )
    expected = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": pad_id}
    actual = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
    }
    if actual != expected:
        raise ValueError(f"special token ids {actual} differ from SentencePiece's {expected}")
    return tokenizer


def convert(checkpoint: str | Path, sp_model: str | Path, out: str | Path) -> Path:
    """Converts a llama2.c checkpoint and tokenizer into a Hugging Face model folder.

    The folder is written to `out + ".tmp"` and renamed at the end, so an interrupted run
    never leaves a half-written `out` behind.

    Args:
        checkpoint: Path to the legacy `.bin` checkpoint.
        sp_model: Path to the SentencePiece `.model` file it was trained with.
        out: Folder to create; must not exist yet.

    Returns:
        The path of the written folder.

    Raises:
        FileExistsError: If `out` already exists.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; remove it first")
    tmp = out.with_name(out.name + ".tmp")
    # A leftover from an interrupted run is ours to discard.
    shutil.rmtree(tmp, ignore_errors=True)

    header = parse_header(Path(checkpoint).read_bytes()[: 4 * _HEADER_INTS])
    tokenizer = build_tokenizer(sp_model, model_max_length=header.seq_len)
    if len(tokenizer) != header.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} ids, checkpoint vocab_size is {header.vocab_size}"
        )
    model = build_model(
        checkpoint,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments without the program name; `sys.argv[1:]` when None.

    Returns:
        The process exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m training.llama2c",
        description="Convert a legacy llama2.c checkpoint to a Hugging Face Llama folder.",
    )
    parser.add_argument("--checkpoint", required=True, help="llama2.c .bin checkpoint")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    args = parser.parse_args(argv)
    out = convert(args.checkpoint, args.tokenizer, args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
