"""Turn a parsed record into instruction-tuning turns: a list of (prompt, completion) pairs.

Single-turn templates return one pair, multi-turn chats one pair per assistant message. The
loss applies to every completion and never to a prompt; tokenization (``tokenize.py``) relies on
that split, so the text of a pair is exactly what the model sees, with nothing added between.

A template is either the name of a built-in (``BUILTIN_TEMPLATES``, a plain dict of functions
``(record, params) -> Turns``) or a custom ``{"prompt": "<jinja>", "completion": "<jinja>"}``
rendered in Jinja's immutable sandbox with strict undefined variables: a missing field is a
``TemplateError`` naming it, and attribute escapes such as ``{{ ''.__class__ }}`` are refused.

``TemplateError`` means "this record cannot be rendered" (the prepare job turns it into a
reject); a plain ``ValueError`` means the template or its params are wrong (a config error).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import types
from collections.abc import Callable
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Re-exported next to the squad template; the flattening itself belongs to the readers.
from data_pipeline.sources import squad_records as squad_records

Turns = list[tuple[str, str]]
TemplateFn = Callable[[dict[str, Any], dict[str, Any]], Turns]
ChatTemplate = Callable[[list[dict[str, Any]]], Turns]


class TemplateError(ValueError):
    """A record cannot be rendered: a missing or mistyped field, an empty completion, ..."""


# --- built-in template parameters ----------------------------------------------------------

_PARAM_DEFAULTS: dict[str, dict[str, Any]] = {
    "alpaca": {},
    "chat": {},
    "sst2": {"phrasings": False},
    "amazon_reviews": {"target": "rating", "phrasings": False},
    "cnn_dailymail": {
        "source_field": "article",
        "target_field": "highlights",
        "phrasings": False,
    },
    "wmt": {"source_lang": None, "target_lang": None, "phrasings": False},
    "squad": {"phrasings": False},
    "conll2003": {"phrasings": False},
}
_REQUIRED_PARAMS: dict[str, tuple[str, ...]] = {"wmt": ("source_lang", "target_lang")}
_AMAZON_TARGETS = ("rating", "sentiment")

# Prompt phrasings per task template. Index 0 is the default; with ``phrasings: true`` each
# record gets one of them, picked by a hash of its content (stable across runs and workers).
_PROMPTS: dict[str, tuple[str, ...]] = {
    "sst2": (
        "Review: {sentence}\nSentiment:",
        "Is the following movie review positive or negative?\n{sentence}\nAnswer:",
        "Classify the sentiment of this sentence as positive or negative.\n"
        "Sentence: {sentence}\nSentiment:",
    ),
    "amazon_reviews/rating": (
        "Review: {review}\nRating (1 to 5 stars):",
        "How many stars (1 to 5) did the customer give this product?\nReview: {review}\nStars:",
        "Predict the star rating, from 1 to 5, of this Amazon review.\n{review}\nRating:",
    ),
    "amazon_reviews/sentiment": (
        "Review: {review}\nSentiment (positive, neutral or negative):",
        "Is this product review positive, neutral or negative?\n{review}\nAnswer:",
        "Classify the sentiment of this Amazon review as positive, neutral or negative.\n"
        "Review: {review}\nSentiment:",
    ),
    "cnn_dailymail": (
        "Summarize the following news article.\n\nArticle:\n{article}\n\nSummary:\n",
        "Write the highlights of this news story in a few sentences.\n\n{article}\n\nHighlights:\n",
        "Article:\n{article}\n\nTL;DR:\n",
    ),
    "wmt": (
        "Translate {source_name} to {target_name}:\n{text}\n{target_name}:",
        "Translate this {source_name} text into {target_name}.\n{source_name}: {text}\n"
        "{target_name}:",
        "{source_name}: {text}\n{target_name} translation:",
    ),
    "squad": (
        "Context: {context}\nQuestion: {question}\nAnswer:",
        "Answer the question with a short span copied from the passage.\n\nPassage: {context}\n"
        "Question: {question}\nAnswer:",
        "Read the text and answer the question.\n{context}\nQ: {question}\nA:",
    ),
    "conll2003": (
        "Sentence: {sentence}\nEntities:",
        "List the named entities (PER, ORG, LOC, MISC) in this sentence.\n{sentence}\nEntities:",
        "Find every person, organization, location and miscellaneous entity.\n"
        "Text: {sentence}\nEntities:",
    ),
}

_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

_LANGUAGES = {
    "cs": "Czech",
    "de": "German",
    "en": "English",
    "es": "Spanish",
    "fi": "Finnish",
    "fr": "French",
    "gu": "Gujarati",
    "ha": "Hausa",
    "is": "Icelandic",
    "it": "Italian",
    "ja": "Japanese",
    "kk": "Kazakh",
    "lt": "Lithuanian",
    "pl": "Polish",
    "ps": "Pashto",
    "ro": "Romanian",
    "ru": "Russian",
    "ta": "Tamil",
    "tr": "Turkish",
    "uk": "Ukrainian",
    "zh": "Chinese",
}

# Label names of the Hugging Face conll2003 dataset, whose ner_tags are integers (IOB2).
_CONLL_TAG_NAMES = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
_SENTIMENTS = {1: "negative", 2: "negative", 3: "neutral", 4: "positive", 5: "positive"}


# --- field helpers ---------------------------------------------------------------------------


def _field(record: dict[str, Any], name: str) -> Any:
    if name not in record:
        raise TemplateError(f"missing field {name!r}")
    value = record[name]
    if value is None:
        raise TemplateError(f"field {name!r} is null")
    return value


def _text(record: dict[str, Any], name: str, *, allow_empty: bool = False) -> str:
    value = record.get(name)
    if type(value) is str and (text := value.strip()):  # the common case first: one check
        return text
    value = _field(record, name)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TemplateError(f"field {name!r} must be text, got {type(value).__name__}")
    text = str(value).strip()
    if not text and not allow_empty:
        raise TemplateError(f"field {name!r} is empty")
    return text


def _int_label(record: dict[str, Any], name: str, allowed: range) -> int:
    value = record.get(name)
    if type(value) is int and value in allowed:  # the common cases first: one check
        return value
    if type(value) is str and value.isascii() and value.isdigit() and int(value) in allowed:
        return int(value)
    value = _field(record, name)
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdecimal():
        number = int(value.strip())  # CSV and TSV fields are text
    if number is None:
        raise TemplateError(f"field {name!r} must be an integer, got {value!r}")
    if number not in allowed:
        raise TemplateError(
            f"field {name!r} must be in {allowed.start}..{allowed.stop - 1}, got {number}"
        )
    return number


def _pick_prompt(key: str, record: dict[str, Any], params: dict[str, Any]) -> str:
    prompts = _PROMPTS[key]
    if not params.get("phrasings"):
        return prompts[0]
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    digest = hashlib.blake2b(canonical.encode("utf-8"), digest_size=8).digest()
    return prompts[int.from_bytes(digest, "big") % len(prompts)]


def _single(prompt: str, completion: str, field: str) -> Turns:
    """One (prompt, completion) turn; a blank completion names the field it came from."""
    if not completion.strip():
        raise TemplateError(f"empty completion (field {field!r})")
    return [(prompt, completion)]


def _check_turns(turns: Any) -> Turns:
    """Return turns as a list of (str, str) pairs, or raise TemplateError."""
    if not isinstance(turns, list) or not turns:
        raise TemplateError("the template produced no (prompt, completion) turn")
    checked: Turns = []
    for index, turn in enumerate(turns):
        if not (isinstance(turn, tuple | list) and len(turn) == 2):
            raise TemplateError(f"turn {index + 1} is not a (prompt, completion) pair")
        prompt, completion = turn
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise TemplateError(f"turn {index + 1}: prompt and completion must be strings")
        if not completion.strip():
            where = "" if len(turns) == 1 else f" in turn {index + 1}"
            raise TemplateError(f"empty completion{where}")
        checked.append((prompt, completion))
    return checked


class _Resolved(dict):  # type: ignore[type-arg]
    """Params already checked and merged by ``_resolve_params`` (``renderer`` does it once)."""


def _resolve_params(name: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """Merge params over the built-in's defaults; raise ValueError for unknown or bad ones."""
    if isinstance(params, _Resolved):
        return params
    defaults = _PARAM_DEFAULTS[name]
    given = dict(params or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        allowed = ", ".join(sorted(defaults)) or "none"
        raise ValueError(f"template {name!r}: unknown params {unknown}; allowed: {allowed}")
    resolved = {**defaults, **given}
    missing = [p for p in _REQUIRED_PARAMS.get(name, ()) if resolved[p] in (None, "")]
    if missing:
        raise ValueError(f"template {name!r}: missing required params {missing}")
    if not isinstance(resolved.get("phrasings", False), bool):
        raise ValueError(f"template {name!r}: param 'phrasings' must be true or false")
    if name == "amazon_reviews" and resolved["target"] not in _AMAZON_TARGETS:
        raise ValueError(
            f"template 'amazon_reviews': param 'target' must be one of {list(_AMAZON_TARGETS)}, "
            f"got {resolved['target']!r}"
        )
    for key in ("source_field", "target_field", "source_lang", "target_lang"):
        if key in resolved and not (isinstance(resolved[key], str) and resolved[key]):
            raise ValueError(f"template {name!r}: param {key!r} must be a non-empty string")
    if name == "wmt" and resolved["source_lang"] == resolved["target_lang"]:
        raise ValueError("template 'wmt': source_lang and target_lang must differ")
    return resolved


# --- built-in templates ----------------------------------------------------------------------


def alpaca(record: dict[str, Any], params: dict[str, Any]) -> Turns:
    """Alpaca: ``instruction``, optional ``input`` (may be empty), ``output``.

    The prompt is the original Stanford Alpaca format (with or without the ``### Input:``
    block); the completion is ``output``.
    """
    _resolve_params("alpaca", params)
    instruction = _text(record, "instruction")
    extra = _text(record, "input", allow_empty=True) if record.get("input") is not None else ""
    output = _field(record, "output")
    if not isinstance(output, str):
        raise TemplateError(f"field 'output' must be text, got {type(output).__name__}")
    if extra:
        prompt = _ALPACA_WITH_INPUT.format(instruction=instruction, input=extra)
    else:
        prompt = _ALPACA_NO_INPUT.format(instruction=instruction)
    return _single(prompt, output, "output")


def _message_text(message: dict[str, Any], where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, dict) or part.get("type", "text") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise TemplateError(f"{where}.content[{i}]: unsupported part type {kind!r}")
            text = part.get("value", part.get("text"))
            if not isinstance(text, str):
                raise TemplateError(f"{where}.content[{i}] has no text 'value'")
            texts.append(text)
        return "".join(texts)
    raise TemplateError(f"{where}.content must be a string or a list of parts")


def _chat_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Normalize ``messages`` to dicts of role, content (str) and loss_weight (float)."""
    messages = _field(record, "messages")
    if not isinstance(messages, list) or not messages:
        raise TemplateError("field 'messages' must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise TemplateError(f"{where} must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise TemplateError(f"{where} has no 'role'")
        weight = message.get("loss_weight")
        if weight is None:
            weight = 1.0 if role == "assistant" else 0.0
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise TemplateError(f"{where}.loss_weight must be a number")
        text = _message_text(message, where)
        out.append({"role": role, "content": text, "loss_weight": float(weight)})
    return out


def chat(record: dict[str, Any], params: dict[str, Any]) -> Turns:
    """Chat: ``messages``, a list of ``{role, content}`` (content a string or text parts).

    Default format: each message is rendered as ``"<|role|>\\n{content}\\n"`` and the
    rendered messages are concatenated. Every assistant message is a completion: its text
    ``"{content}\\n"`` (the closing newline included, so the model learns where its turn ends)
    is learned, and everything before it (other roles, the ``"<|assistant|>\\n"`` header, and
    assistant messages with ``loss_weight`` 0) is prompt. Messages after the last learned
    assistant message are dropped: there is nothing to learn from them.

    Args:
        record: The record holding ``messages``; content parts are ``{"type": "text",
            "value" (or "text"): ...}`` as in LLaMA-Factory's format.
        params: None are accepted.

    Returns:
        One (prompt, completion) turn per learned assistant message.
    """
    _resolve_params("chat", params)
    turns: Turns = []
    pending = ""
    for index, message in enumerate(_chat_messages(record)):
        if message["role"] == "assistant" and message["loss_weight"] > 0:
            if not message["content"].strip():
                raise TemplateError(f"empty completion (messages[{index}])")
            turns.append((pending + "<|assistant|>\n", message["content"] + "\n"))
            pending = ""
        else:
            pending += f"<|{message['role']}|>\n{message['content']}\n"
    if not turns:
        raise TemplateError("field 'messages' has no assistant message to learn from")
    return turns


def sst2(record: dict[str, Any], params: dict[str, Any]) -> Turns:
    """SST-2 sentiment: ``sentence`` and ``label`` (0/1, int or string) -> negative/positive."""
    p = _resolve_params("sst2", params)
    sentence = _text(record, "sentence")
    label = _int_label(record, "label", range(0, 2))
    prompt = _pick_prompt("sst2", record, p).format(sentence=sentence)
    return _single(prompt, "positive" if label == 1 else "negative", "label")


def amazon_reviews(record: dict[str, Any], params: dict[str, Any]) -> Turns:
    """Amazon Alexa reviews: ``verified_reviews`` and ``rating`` (1-5).

    Param ``target``: ``"rating"`` (completion ``"1"``..``"5"``) or ``"sentiment"`` (rating
    >= 4 positive, <= 2 negative, 3 neutral). An empty review is a ``TemplateError``.
    """
    p = _resolve_params("amazon_reviews", params)
    review = _text(record, "verified_reviews")
    rating = _int_label(record, "rating", range(1, 6))
    target = p["target"]
    prompt = _pick_prompt(f"amazon_reviews/{target}", record, p).format(review=review)
    completion = str(rating) if target == "rating" else _SENTIMENTS[rating]
    return _single(prompt, completion, "rating")


def cnn_dailymail(record: dict[str, Any], params: dict[str, Any]) -> Turns:
    """Summarization: ``article`` -> ``highlights`` (params ``source_field``/``target_field``)."""
    p = _resolve_params("cnn_dailymail", params)
    article = _text(record, p["source_field"])
    summary = _text(record, p["target_field"], allow_empty=True)
    prompt = _pick_prompt("cnn_dailymail", record, p).format(article=article)
    return _single(prompt, summary, p["target_field"])


def _translation_side(record: dict[str, Any], lang: str, *, allow_empty: bool = False) -> str:
    pairs = record.get("translation")
    if lang not in record and isinstance(pairs, dict):
        return _text(pairs, lang, allow_empty=allow_empty)
    return _text(record, lang, allow_empty=allow_empty)


def wmt(record: dict[str, Any], params: dict[str, Any]) -> Turns:
    """Translation: params ``source_lang`` and ``target_lang`` (language codes, required).

    The texts are the fields named by the codes (``{"de": ..., "en": ...}``) or the entries
    of a ``translation`` dict as in the Hugging Face wmt datasets.
    """
    p = _resolve_params("wmt", params)
    src, tgt = p["source_lang"], p["target_lang"]
    text = _translation_side(record, src)
    reference = _translation_side(record, tgt, allow_empty=True)
    prompt = _pick_prompt("wmt", record, p).format(
        source_name=_LANGUAGES.get(src, src), target_name=_LANGUAGES.get(tgt, tgt), text=text
    )
    return _single(prompt, reference, tgt)


def _first_answer(answers: Any) -> str:
    if isinstance(answers, dict):  # Hugging Face: {"text": [...], "answer_start": [...]}
        texts = answers.get("text")
        if isinstance(texts, str):
            texts = [texts]
    elif isinstance(answers, list):  # SQuAD JSON: [{"text": ..., "answer_start": ...}]
        texts = [a.get("text") if isinstance(a, dict) else a for a in answers]
    else:
        raise TemplateError("field 'answers' must be a dict with 'text' or a list of answers")
    if not texts:
        raise TemplateError("field 'answers' has no answer")
    if not isinstance(texts[0], str):
        raise TemplateError("field 'answers': the first answer has no text")
    return texts[0]


def squad(record: dict[str, Any], params: dict[str, Any]) -> Turns:
    """Extractive QA: ``context``, ``question``, ``answers`` -> the first answer's text."""
    p = _resolve_params("squad", params)
    context = _text(record, "context")
    question = _text(record, "question")
    answer = _first_answer(_field(record, "answers")).strip()
    prompt = _pick_prompt("squad", record, p).format(context=context, question=question)
    return _single(prompt, answer, "answers")


def entities_from_iob(tokens: list[str], tags: list[str]) -> list[tuple[str, str]]:
    """Collect entity spans from IOB1 or IOB2 tags, in sentence order.

    An entity starts at ``B-X``, or at ``I-X`` when the previous tag is not of type X (IOB1
    writes a lone ``I-`` for an entity start); a following ``I-X`` continues it.

    Args:
        tokens: The words of the sentence.
        tags: One tag per word: ``O``, ``B-TYPE`` or ``I-TYPE``.

    Returns:
        ``(entity text joined by spaces, TYPE)`` pairs.

    Raises:
        ValueError: If the lists differ in length or a tag is malformed.
    """
    if len(tokens) != len(tags):
        raise ValueError(f"{len(tokens)} tokens but {len(tags)} tags")
    entities: list[tuple[str, str]] = []
    words: list[str] = []
    kind = ""
    for token, tag in zip(tokens, tags, strict=True):
        if tag == "O":
            prefix, tag_type = "O", ""
        elif tag[:2] in ("B-", "I-") and len(tag) > 2:
            prefix, tag_type = tag[0], tag[2:]
        else:
            raise ValueError(f"malformed IOB tag {tag!r}")
        if prefix == "I" and words and tag_type == kind:
            words.append(token)
            continue
        if words:
            entities.append((" ".join(words), kind))
            words = []
        if prefix != "O":
            words, kind = [token], tag_type
    if words:
        entities.append((" ".join(words), kind))
    return entities


def _string_list(record: dict[str, Any], name: str) -> list[str]:
    value = _field(record, name)
    if not isinstance(value, list):
        raise TemplateError(f"field {name!r} must be a list")
    if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        if name == "ner_tags":  # Hugging Face conll2003 stores tag ids
            if not all(0 <= v < len(_CONLL_TAG_NAMES) for v in value):
                raise TemplateError("field 'ner_tags' has an id outside 0..8")
            return [_CONLL_TAG_NAMES[v] for v in value]
    if not all(isinstance(v, str) for v in value):
        raise TemplateError(f"field {name!r} must be a list of strings")
    return value


def conll2003(record: dict[str, Any], params: dict[str, Any]) -> Turns:
    """Named entities: ``tokens`` and ``ner_tags`` -> ``"EU: ORG; German: MISC"`` or ``"none"``.

    Tags may be IOB1 (the CoNLL-2003 files), IOB2, or Hugging Face tag ids.
    """
    p = _resolve_params("conll2003", params)
    tokens = _string_list(record, "tokens")
    tags = _string_list(record, "ner_tags")
    if not tokens:
        raise TemplateError("field 'tokens' is empty")
    try:
        entities = entities_from_iob(tokens, tags)
    except ValueError as exc:
        raise TemplateError(f"field 'ner_tags': {exc}") from None
    completion = "; ".join(f"{text}: {kind}" for text, kind in entities) or "none"
    prompt = _pick_prompt("conll2003", record, p).format(sentence=" ".join(tokens))
    return _single(prompt, completion, "ner_tags")


BUILTIN_TEMPLATES: dict[str, TemplateFn] = {
    "alpaca": alpaca,
    "chat": chat,
    "sst2": sst2,
    "amazon_reviews": amazon_reviews,
    "cnn_dailymail": cnn_dailymail,
    "wmt": wmt,
    "squad": squad,
    "conll2003": conll2003,
}


# --- custom Jinja templates ------------------------------------------------------------------

# Immutable sandbox: no attribute escapes, no mutation of the record; strict undefined so a
# missing field fails loudly; trailing newlines kept because prompts often end with one.
_JINJA = ImmutableSandboxedEnvironment(
    undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
)
_CUSTOM_KEYS = ("prompt", "completion")


@functools.lru_cache(maxsize=256)
def _compile(source: str) -> jinja2.Template:
    return _JINJA.from_string(source)


def _validate_custom(spec: dict[str, Any], params: dict[str, Any] | None) -> None:
    keys = set(spec)
    if keys != set(_CUSTOM_KEYS):
        missing = sorted(set(_CUSTOM_KEYS) - keys)
        extra = sorted(keys - set(_CUSTOM_KEYS))
        raise ValueError(
            "a custom template needs exactly the keys 'prompt' and 'completion'"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {extra}" if extra else "")
        )
    if params:
        raise ValueError(f"custom templates take no params, got {sorted(params)}")
    for part in _CUSTOM_KEYS:
        source = spec[part]
        if not isinstance(source, str):
            raise ValueError(f"custom template {part!r} must be a string")
        try:
            _compile(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(
                f"custom template {part!r}: syntax error on line {exc.lineno}: {exc.message}"
            ) from None


def _render_custom(spec: dict[str, Any], record: dict[str, Any]) -> Turns:
    context = {"record": record, **record}
    rendered = []
    for part in _CUSTOM_KEYS:
        try:
            rendered.append(_compile(spec[part]).render(context))
        except jinja2.exceptions.SecurityError as exc:
            raise TemplateError(f"custom template {part!r} refused by the sandbox: {exc}") from None
        except jinja2.UndefinedError as exc:
            raise TemplateError(f"custom template {part!r}: missing field: {exc}") from None
        except Exception as exc:  # a user template can fail in any way on an odd record
            raise TemplateError(f"custom template {part!r}: {type(exc).__name__}: {exc}") from None
    return _single(rendered[0], rendered[1], "completion")


# --- a tokenizer's own chat template --------------------------------------------------------


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body, as in transformers (which
    uses it to mark assistant tokens; here the spans come from rendering prefixes instead)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=16)
def _compile_chat(source: str) -> jinja2.Template:
    """Compiled as transformers' ``apply_chat_template`` does: immutable sandbox, trimmed
    blocks, loop controls, ``raise_exception`` and a ``tojson`` that does not escape HTML.
    ``strftime_now`` is left out on purpose: the data must not depend on the day it is built
    (templates that use it test ``is defined`` and fall back to a fixed date)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_Generation, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(source)


def tokenizer_chat_template(
    source: str, special_tokens: dict[str, str | None], *, strip_bos: bool = True
) -> ChatTemplate:
    """The ``chat`` template's turns from a tokenizer's own Jinja chat template.

    The conversation is rendered as ``apply_chat_template`` renders it (``messages`` with
    ``role`` and ``content``, ``add_generation_prompt``, the special tokens such as
    ``bos_token``). Each learned assistant message is found by rendering prefixes: the prompt
    is ``render(messages[:i], add_generation_prompt=True)`` past what earlier turns covered,
    the completion is what ``render(messages[:i + 1])`` adds to it (so the end-of-turn marker
    the template writes, e.g. ``</s>`` or ``<|im_end|>``, is learned). Messages after the last
    learned one are dropped. A leading ``bos_token`` (when ``strip_bos``) and a trailing
    ``eos_token`` are cut from the text because tokenization adds them as ids
    (``tokenize.build_example``); everything else is kept, so the turns joined are the
    template's text exactly.

    Args:
        source: The Jinja chat template (``tokenizer.chat_template``).
        special_tokens: ``bos_token``, ``eos_token``, ... as strings (None when absent).
        strip_bos: Whether tokenization prepends the bos id (not for GPT-2-like tokenizers).

    Returns:
        A ``ChatTemplate`` for ``render``/``renderer``; it raises ``TemplateError`` when the
        template refuses a conversation (``raise_exception``), fails, or renders a prefix of
        the conversation differently from the whole (then spans cannot be found).

    Raises:
        ValueError: On a Jinja syntax error in the template.
    """
    try:
        template = _compile_chat(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(
            f"tokenizer chat template: syntax error on line {exc.lineno}: {exc.message}"
        ) from None
    bos, eos = special_tokens.get("bos_token"), special_tokens.get("eos_token")

    def text(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        try:
            return template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens
            )
        except jinja2.exceptions.SecurityError as exc:
            raise TemplateError(f"tokenizer chat template refused by the sandbox: {exc}") from None
        except Exception as exc:  # raise_exception, or any failure on an odd conversation
            raise TemplateError(f"tokenizer chat template: {type(exc).__name__}: {exc}") from None

    def turns(normalized: list[dict[str, Any]]) -> Turns:
        messages = [{"role": m["role"], "content": m["content"]} for m in normalized]
        learned = [
            i for i, m in enumerate(normalized) if m["role"] == "assistant" and m["loss_weight"] > 0
        ]
        if not learned:
            raise TemplateError("field 'messages' has no assistant message to learn from")
        out: Turns = []
        done = ""  # the text the turns so far cover
        for i in learned:
            prompt_text = text(messages[:i], add_generation_prompt=True)
            whole = text(messages[: i + 1], add_generation_prompt=False)
            if not (prompt_text.startswith(done) and whole.startswith(prompt_text)):
                raise TemplateError(
                    f"tokenizer chat template renders messages[:{i}] differently inside the "
                    "longer conversation, so the assistant span cannot be found"
                )
            if not whole[len(prompt_text) :].strip():
                raise TemplateError(f"empty completion (messages[{i}])")
            out.append((prompt_text[len(done) :], whole[len(prompt_text) :]))
            done = whole
        if strip_bos and bos and out[0][0].startswith(bos):
            out[0] = (out[0][0][len(bos) :], out[0][1])
        if eos and out[-1][1].endswith(eos) and out[-1][1][: -len(eos)].strip():
            out[-1] = (out[-1][0], out[-1][1][: -len(eos)])
        return out

    return turns


# --- public API ------------------------------------------------------------------------------


def validate_template(spec: str | dict[str, Any], params: dict[str, Any] | None = None) -> None:
    """Check a template definition at config time, before any record is read.

    Args:
        spec: A built-in name or ``{"prompt": "<jinja>", "completion": "<jinja>"}``.
        params: Params of a built-in (custom templates take none).

    Raises:
        ValueError: For an unknown built-in (listing the known ones), unknown or invalid
            params, a custom dict with other keys, or a Jinja syntax error.
    """
    if isinstance(spec, str):
        if spec not in BUILTIN_TEMPLATES:
            names = ", ".join(BUILTIN_TEMPLATES)
            raise ValueError(f"unknown template {spec!r}; built-in templates: {names}")
        _resolve_params(spec, params)
    elif isinstance(spec, dict):
        _validate_custom(spec, params)
    else:
        raise ValueError(
            "a template is a built-in name or a {prompt: ..., completion: ...} mapping, "
            f"got {type(spec).__name__}"
        )


def render(
    spec: str | dict[str, Any],
    record: dict[str, Any],
    params: dict[str, Any] | None = None,
    chat_template: ChatTemplate | None = None,
) -> Turns:
    """Render one record into (prompt, completion) turns.

    Args:
        spec: A built-in template name or a custom Jinja ``{prompt, completion}`` mapping.
        record: The parsed record.
        params: Params of a built-in template.
        chat_template: Used by the ``chat`` template instead of its default format, e.g. one
            built from the tokenizer's chat template. It receives the normalized messages
            (``role``, ``content`` as text, ``loss_weight``) and returns the turns.

    Returns:
        A non-empty list of (prompt, completion) pairs, every completion non-blank.

    Raises:
        TemplateError: If this record cannot be rendered (the message names the field).
        ValueError: If the template or params are invalid.
    """
    validate_template(spec, params)
    if not isinstance(record, dict):
        raise TemplateError(f"a record must be an object, got {type(record).__name__}")
    if isinstance(spec, dict):
        return _render_custom(spec, record)
    if spec == "chat" and chat_template is not None:
        return _check_turns(chat_template(_chat_messages(record)))
    return BUILTIN_TEMPLATES[spec](record, params or {})


def renderer(
    spec: str | dict[str, Any],
    params: dict[str, Any] | None = None,
    chat_template: ChatTemplate | None = None,
) -> Callable[[dict[str, Any]], Turns]:
    """``render`` with the template validated once, for calling on every record of a source.

    Args:
        spec: A built-in template name or a custom Jinja ``{prompt, completion}`` mapping.
        params: Params of a built-in template.
        chat_template: As for ``render``.

    Returns:
        A function ``record -> turns`` equal to ``render(spec, record, params, chat_template)``.

    Raises:
        ValueError: If the template or params are invalid.
    """
    validate_template(spec, params)
    if isinstance(spec, dict) or (spec == "chat" and chat_template is not None):
        return functools.partial(render, spec, params=params, chat_template=chat_template)
    function = BUILTIN_TEMPLATES[spec]
    given = _Resolved(_resolve_params(spec, params))

    def render_builtin(record: dict[str, Any]) -> Turns:
        if not isinstance(record, dict):
            raise TemplateError(f"a record must be an object, got {type(record).__name__}")
        return function(record, given)

    return render_builtin


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):  # comprehensions and nested functions
            names |= _global_names(const)
    return names


@functools.cache
def _source(function: types.FunctionType) -> str:
    """A function's source, read once per function object: finding a definition in its file
    (`inspect.getsource`) took 40 ms of every prepare's serial start, for code that cannot
    change in a running process."""
    try:
        return inspect.getsource(function)
    except OSError:  # no source shipped: the bytecode still changes with the code
        return function.__code__.co_code.hex()


def _definition_text(function: Callable[..., Any]) -> str:
    """Source of a built-in template and of every module helper and constant it uses."""
    module_globals = globals()
    seen: set[str] = set()
    parts: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if name in seen:
            return
        seen.add(name)
        if isinstance(obj, types.FunctionType) and obj.__module__ == __name__:
            parts.append(_source(obj))
            for used in sorted(_global_names(obj.__code__)):
                if used in module_globals:
                    visit(used, module_globals[used])
        elif isinstance(obj, str | int | float | tuple | dict | frozenset):
            parts.append(f"{name} = {_stable_repr(obj)}")

    visit(function.__name__, function)
    return "\n".join(parts)


def _stable_repr(obj: Any) -> str:
    """repr that is the same in every process: no memory addresses (functions go by name, their
    source is hashed on its own), no hash-seed-dependent set order."""
    if isinstance(obj, dict):
        return (
            "{" + ", ".join(f"{_stable_repr(k)}: {_stable_repr(v)}" for k, v in obj.items()) + "}"
        )
    if isinstance(obj, tuple | list):
        return "(" + ", ".join(_stable_repr(v) for v in obj) + ")"
    if isinstance(obj, frozenset | set):
        return "{" + ", ".join(sorted(_stable_repr(v) for v in obj)) + "}"
    if callable(obj):
        return f"<{getattr(obj, '__qualname__', type(obj).__name__)}>"
    return repr(obj)


def template_fingerprint(spec: str | dict[str, Any], params: dict[str, Any] | None = None) -> str:
    """A stable hash of a template's definition, so that editing a template invalidates caches.

    For a built-in it covers the function's source code, the helpers and constants it uses,
    and the resolved params; for a custom template, its two Jinja strings.

    Args:
        spec: A built-in name or a custom ``{prompt, completion}`` mapping.
        params: Params of a built-in template.

    Returns:
        A hex digest.

    Raises:
        ValueError: If the template or params are invalid.
    """
    validate_template(spec, params)
    if isinstance(spec, str):
        resolved = _resolve_params(spec, params)
        text = "builtin:" + spec + "\n" + _definition_text(BUILTIN_TEMPLATES[spec])
        text += "\nparams:" + json.dumps(resolved, sort_keys=True, default=str)
    else:
        text = "jinja:" + json.dumps({k: spec[k] for k in _CUSTOM_KEYS}, sort_keys=True)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()
