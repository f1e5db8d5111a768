"""Built-in and custom templates on the real samples, their errors, and their fingerprints."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from data_pipeline import templates
from data_pipeline.sources import Reject, detect_format, parse_bytes
from data_pipeline.templates import (
    BUILTIN_TEMPLATES,
    TemplateError,
    entities_from_iob,
    render,
    squad_records,
    template_fingerprint,
    validate_template,
)

DATA = Path(__file__).resolve().parents[1] / "assets" / "data"
WMT_DE_EN = {"source_lang": "de", "target_lang": "en"}


def records(relative: str) -> list[tuple[int, dict[str, Any]]]:
    path = DATA / relative
    parsed = parse_bytes(path.read_bytes(), relative, detect_format(str(path)))
    return [(line, rec) for line, rec in parsed if not isinstance(rec, Reject)]


def first(relative: str) -> dict[str, Any]:
    return records(relative)[0][1]


# --- built-ins on the real samples: exact strings --------------------------------------------


def test_alpaca_without_and_with_input() -> None:
    recs = [rec for _, rec in records("instruction/alpaca_en_demo.json")]
    [(prompt, completion)] = render("alpaca", recs[0])
    assert prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nDescribe a process of making crepes.\n\n"
        "### Response:\n"
    )
    assert completion == recs[0]["output"]
    assert completion.startswith("Making crepes is an easy and delicious process!")
    [(prompt, completion)] = render("alpaca", recs[5])
    assert prompt == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nGiven the parameters of a triangle, find out its perimeter.\n\n"
        "### Input:\nSide 1 = 4\nSide 2 = 6\nSide 3 = 8\n\n### Response:\n"
    )
    assert completion.endswith("Therefore, the perimeter of the triangle is 18 units.")


def test_chat_default_format() -> None:
    assert render("chat", first("instruction/v1_sft_demo.jsonl")) == [
        (
            "<|user|>\nhi\n<|assistant|>\n",
            "Hello! I am {{name}}, an AI assistant developed by {{author}}. "
            "How can I assist you today?\n",
        )
    ]


def test_chat_multi_turn_loss_weight_and_trailing_prompt() -> None:
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "value": "2+2?"}]},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "Let me think.", "loss_weight": 0.0},
            {"role": "user", "content": "Well?"},
            {"role": "assistant", "content": [{"type": "text", "text": "6"}]},
            {"role": "user", "content": "Thanks"},
        ]
    }
    turns = render("chat", record)
    assert turns == [
        ("<|system|>\nBe brief.\n<|user|>\n2+2?\n<|assistant|>\n", "4\n"),
        (
            "<|user|>\nAnd 3+3?\n<|assistant|>\nLet me think.\n<|user|>\nWell?\n<|assistant|>\n",
            "6\n",
        ),
    ]
    # The text of the turns is exactly the documented rendering, minus the dropped tail.
    full = "".join(p + c for p, c in turns)
    assert full + "<|user|>\nThanks\n" == "".join(
        f"<|{m['role']}|>\n{templates._message_text(m, 'm')}\n" for m in record["messages"]
    )


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "user", "content": "hi"}], "no assistant message"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \n"}],
            r"empty completion \(messages\[1\]\)",
        ),
        ([{"role": "user", "content": [{"type": "image", "value": "x.png"}]}], "'image'"),
        ([{"content": "hi"}], r"messages\[0\] has no 'role'"),
        ([], "non-empty list"),
    ],
)
def test_chat_errors(messages: list[dict[str, Any]], match: str) -> None:
    with pytest.raises(TemplateError, match=match):
        render("chat", {"messages": messages})


def test_chat_template_callable_replaces_the_default_format() -> None:
    seen: list[list[dict[str, Any]]] = []

    def chat_template(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
        seen.append(messages)
        return [("[INST] " + messages[0]["content"] + " [/INST]", messages[1]["content"])]

    record = first("instruction/v1_sft_demo.jsonl")
    turns = render("chat", record, chat_template=chat_template)
    assert turns[0][0] == "[INST] hi [/INST]"
    assert seen[0][0] == {"role": "user", "content": "hi", "loss_weight": 0.0}
    # Only the chat template uses it.
    assert render("sst2", first("sst2/test.tsv"), chat_template=chat_template)[0][1] == "positive"
    with pytest.raises(TemplateError, match="empty completion"):
        render("chat", record, chat_template=lambda m: [("p", " ")])


def test_sst2() -> None:
    assert render("sst2", first("sst2/test.tsv")) == [
        ("Review: it 's a charming and often affecting journey .\nSentiment:", "positive")
    ]
    labels = Counter(render("sst2", rec)[0][1] for _, rec in records("sst2/test.tsv"))
    assert sum(labels.values()) == 299 and set(labels) == {"positive", "negative"}
    assert render("sst2", {"sentence": "bad", "label": 0})[0][1] == "negative"
    with pytest.raises(TemplateError, match="'label' must be in 0..1, got -1"):
        render("sst2", {"sentence": "unlabelled GLUE test row", "label": -1})


def test_amazon_reviews_rating_and_sentiment() -> None:
    rec = first("amazon_reviews/amazon_alexa.tsv")
    assert render("amazon_reviews", rec) == [("Review: Love my Echo!\nRating (1 to 5 stars):", "5")]
    assert render("amazon_reviews", rec, {"target": "sentiment"}) == [
        ("Review: Love my Echo!\nSentiment (positive, neutral or negative):", "positive")
    ]
    sentiments = [
        render("amazon_reviews", {"verified_reviews": "ok", "rating": r}, {"target": "sentiment"})
        for r in (1, "2", 3, 4.0, 5)
    ]
    assert [t[0][1] for t in sentiments] == [
        "negative",
        "negative",
        "neutral",
        "positive",
        "positive",
    ]


def test_amazon_empty_reviews_are_template_errors() -> None:
    failed = []
    for line, rec in records("amazon_reviews/amazon_alexa.tsv"):
        try:
            render("amazon_reviews", rec)
        except TemplateError as exc:
            failed.append((line, str(exc)))
    assert failed == [(n, "field 'verified_reviews' is empty") for n in (87, 185, 221)]


def test_cnn_dailymail_and_field_overrides() -> None:
    rec = first("cnn_dailymail/summeval.jsonl")
    [(prompt, completion)] = render("cnn_dailymail", rec)
    assert prompt == (
        "Summarize the following news article.\n\nArticle:\n"
        + rec["article"].strip()
        + "\n\nSummary:\n"
    )
    assert prompt.startswith(
        "Summarize the following news article.\n\nArticle:\nPaul Merson has restarted his row"
    )
    assert completion == (
        "Andros Townsend an 83rd minute sub in Tottenham 's draw with Burnley . He was unable "
        "to find a winner as the game ended without a goal . Townsend had clashed with Paul "
        "Merson last week over England call-up ."
    )
    renamed = {"src": rec["article"], "ref": rec["highlights"]}
    params = {"source_field": "src", "target_field": "ref"}
    assert render("cnn_dailymail", renamed, params) == [(prompt, completion)]
    with pytest.raises(TemplateError, match=r"empty completion \(field 'highlights'\)"):
        render("cnn_dailymail", {"article": "text", "highlights": "  "})


def test_wmt_both_directions_and_translation_dict() -> None:
    rec = first("wmt21/newstest2021.de-en.jsonl")
    assert render("wmt", rec, WMT_DE_EN) == [
        (
            "Translate German to English:\nBiker reagiert blitzschnell und verhindert "
            "Schlimmeres\nEnglish:",
            "Biker reacts lightning fast and prevents worse.",
        )
    ]
    assert render("wmt", rec, {"source_lang": "en", "target_lang": "de"}) == [
        (
            "Translate English to German:\nBiker reacts lightning fast and prevents worse.\n"
            "German:",
            "Biker reagiert blitzschnell und verhindert Schlimmeres",
        )
    ]
    hf_style = {"translation": {"de": rec["de"], "en": rec["en"]}}
    assert render("wmt", hf_style, WMT_DE_EN) == render("wmt", rec, WMT_DE_EN)
    with pytest.raises(TemplateError, match="missing field 'en'"):
        render("wmt", {"de": "Hallo"}, WMT_DE_EN)


def test_squad_hf_and_squad_json_answer_layouts() -> None:
    rec = first("squad/xquad.en.json")
    [(prompt, completion)] = render("squad", rec)
    assert prompt == (
        f"Context: {rec['context']}\n"
        "Question: How many points did the Panthers defense surrender?\nAnswer:"
    )
    assert completion == "308"
    as_list = dict(rec, answers=[{"text": "308", "answer_start": 34}])
    assert render("squad", as_list) == [(prompt, completion)]
    doc = json.loads((DATA / "squad/xquad.en.json").read_text())
    assert next(iter(squad_records(doc))) == rec
    with pytest.raises(TemplateError, match="'answers' has no answer"):
        render("squad", dict(rec, answers={"text": [], "answer_start": []}))


def test_conll2003() -> None:
    recs = [rec for _, rec in records("conll2003/eng.testa")]
    assert [render("conll2003", r)[0] for r in recs[:3]] == [
        (
            "Sentence: CRICKET - LEICESTERSHIRE TAKE OVER AT TOP AFTER INNINGS VICTORY .\n"
            "Entities:",
            "LEICESTERSHIRE: ORG",
        ),
        ("Sentence: LONDON 1996-08-30\nEntities:", "LONDON: LOC"),
        (
            "Sentence: West Indian all-rounder Phil Simmons took four for 38 on Friday as "
            "Leicestershire beat Somerset by an innings and 39 runs in two days to take over "
            "at the head of the county championship .\nEntities:",
            "West Indian: MISC; Phil Simmons: PER; Leicestershire: ORG; Somerset: ORG",
        ),
    ]
    no_entities = {"tokens": ["It", "rained", "."], "ner_tags": ["O", "O", "O"]}
    assert render("conll2003", no_entities)[0][1] == "none"
    # Hugging Face conll2003 stores IOB2 tag ids.
    hf = {"tokens": ["EU", "rejects", "German", "call"], "ner_tags": [3, 0, 7, 0]}
    assert render("conll2003", hf)[0][1] == "EU: ORG; German: MISC"
    # IOB1 in the file and its IOB2 conversion give the same entities.
    for rec in recs:
        assert entities_from_iob(rec["tokens"], rec["ner_tags"]) == entities_from_iob(
            rec["tokens"], rec["ner_iob2"]
        )


def test_entities_from_iob_edge_cases() -> None:
    tokens = ["A", "B", "C", "D", "E"]
    # IOB1: B- only separates two adjacent entities of the same type.
    assert entities_from_iob(tokens, ["I-PER", "I-PER", "B-PER", "I-LOC", "O"]) == [
        ("A B", "PER"),
        ("C", "PER"),
        ("D", "LOC"),
    ]
    # IOB2 with a type change inside an I- run, and an entity at the end.
    assert entities_from_iob(tokens, ["B-ORG", "I-ORG", "I-LOC", "O", "B-MISC"]) == [
        ("A B", "ORG"),
        ("C", "LOC"),
        ("E", "MISC"),
    ]
    with pytest.raises(ValueError, match="malformed IOB tag"):
        entities_from_iob(["A"], ["PER"])
    with pytest.raises(ValueError, match="1 tokens but 2 tags"):
        entities_from_iob(["A"], ["O", "O"])


def test_every_sample_record_renders() -> None:
    cases = [
        ("instruction/alpaca_en_demo.json", "alpaca", None, 200),
        ("instruction/v1_sft_demo.jsonl", "chat", None, 100),
        ("sst2/train.tsv", "sst2", None, 1999),
        ("cnn_dailymail/summeval.jsonl", "cnn_dailymail", None, 20),
        ("wmt21/newstest2021.de-en.jsonl", "wmt", WMT_DE_EN, 200),
        ("squad/xquad.en.json", "squad", None, 74),
        ("conll2003/eng.testa", "conll2003", None, 16),
    ]
    for path, name, params, count in cases:
        rendered = [render(name, rec, params) for _, rec in records(path)]
        assert len(rendered) == count, path
        assert all(turns and all(c.strip() for _, c in turns) for turns in rendered)


def test_bad_sample_template_errors_name_the_field() -> None:
    outcome = {}
    for line, rec in records("bad/alpaca_bad.jsonl"):
        try:
            render("alpaca", rec)
            outcome[line] = "ok"
        except TemplateError as exc:
            outcome[line] = str(exc)
    assert outcome == {
        1: "ok",
        3: "ok",
        7: "missing field 'output'",
        8: "empty completion (field 'output')",
        9: "ok",
    }
    csv_outcome = {}
    for line, rec in records("bad/embedded_newlines.csv"):
        try:
            csv_outcome[line] = render("alpaca", rec)[0][1]
        except TemplateError as exc:
            csv_outcome[line] = str(exc)
    assert csv_outcome[8] == "empty completion (field 'output')"
    assert csv_outcome[9] == "apple\nbanana"


@pytest.mark.parametrize(
    ("name", "record", "match"),
    [
        ("alpaca", {"output": "x"}, "missing field 'instruction'"),
        ("alpaca", {"instruction": "x", "output": None}, "field 'output' is null"),
        ("alpaca", {"instruction": ["x"], "output": "y"}, "'instruction' must be text"),
        ("sst2", {"sentence": "fine", "label": "pos"}, "'label' must be an integer"),
        ("amazon_reviews", {"verified_reviews": "ok", "rating": 6}, r"1\.\.5, got 6"),
        ("conll2003", {"tokens": ["A"], "ner_tags": ["O", "O"]}, "1 tokens but 2 tags"),
        ("squad", {"context": "c", "question": "q", "answers": 3}, "'answers' must be"),
    ],
)
def test_builtin_record_errors(name: str, record: dict[str, Any], match: str) -> None:
    with pytest.raises(TemplateError, match=match):
        render(name, record)


# --- phrasings -------------------------------------------------------------------------------


def test_phrasings_are_deterministic_per_record_and_varied() -> None:
    recs = [rec for _, rec in records("sst2/train.tsv")]
    once = [render("sst2", r, {"phrasings": True})[0][0] for r in recs]
    again = [render("sst2", r, {"phrasings": True})[0][0] for r in reversed(recs)]
    assert once == list(reversed(again))
    firsts = Counter(prompt.split("\n")[0].split(":")[0][:12] for prompt in once)
    assert len(recs) / 3 * 0.8 < firsts["Is the follo"] < len(recs) / 3 * 1.2
    assert len(recs) / 3 * 0.8 < firsts["Classify the"] < len(recs) / 3 * 1.2
    # The completion never changes with the phrasing.
    assert [render("sst2", r, {"phrasings": True})[0][1] for r in recs[:50]] == [
        render("sst2", r)[0][1] for r in recs[:50]
    ]


# --- custom Jinja templates ------------------------------------------------------------------


def test_custom_template_renders_fields_and_keeps_trailing_newline() -> None:
    spec = {
        "prompt": "Q: {{ question }}\n{% if context %}C: {{ context[:10] }}\n{% endif %}A:\n",
        "completion": "{{ answers.text[0] }}",
    }
    rec = first("squad/xquad.en.json")
    assert render(spec, rec) == [
        (
            "Q: How many points did the Panthers defense surrender?\nC: The Panthe\nA:\n",
            "308",
        )
    ]
    via_record = {"prompt": "{{ record['question'] }}", "completion": "{{ record.id }}"}
    assert render(via_record, rec)[0][1] == "56beb4343aeaaa14008c925b"


def test_custom_template_missing_field_names_it() -> None:
    spec = {"prompt": "{{ instruction }}", "completion": "{{ answer }}"}
    with pytest.raises(TemplateError, match="'completion': missing field: 'answer' is undefined"):
        render(spec, {"instruction": "hi"})


@pytest.mark.parametrize(
    "escape",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ instruction.__class__ }}",
        "{% set x = [] %}{{ x.append(1) }}",
    ],
)
def test_sandbox_blocks_attribute_escapes(escape: str) -> None:
    spec = {"prompt": escape, "completion": "ok"}
    validate_template(spec)  # syntactically fine: refused when rendered
    with pytest.raises(TemplateError, match="refused by the sandbox: access to attribute"):
        render(spec, {"instruction": "hi"})


def test_custom_template_empty_completion() -> None:
    spec = {"prompt": "{{ a }}", "completion": "{{ b }}"}
    with pytest.raises(TemplateError, match="empty completion"):
        render(spec, {"a": "x", "b": "   "})


# --- validation and fingerprints -------------------------------------------------------------


def test_validate_template_errors() -> None:
    with pytest.raises(ValueError, match="unknown template 'alpacca'; built-in templates: alpaca"):
        validate_template("alpacca")
    assert set(BUILTIN_TEMPLATES) == {
        "alpaca",
        "chat",
        "sst2",
        "amazon_reviews",
        "cnn_dailymail",
        "wmt",
        "squad",
        "conll2003",
    }
    with pytest.raises(ValueError, match=r"unknown params \['taget'\]; allowed: phrasings, target"):
        validate_template("amazon_reviews", {"taget": "rating"})
    with pytest.raises(ValueError, match="'target' must be one of"):
        validate_template("amazon_reviews", {"target": "stars"})
    with pytest.raises(
        ValueError, match=r"missing required params \['source_lang', 'target_lang'\]"
    ):
        validate_template("wmt")
    with pytest.raises(ValueError, match="must differ"):
        validate_template("wmt", {"source_lang": "de", "target_lang": "de"})
    with pytest.raises(ValueError, match="unknown params"):
        validate_template("alpaca", {"phrasings": True})
    with pytest.raises(ValueError, match=r"exactly the keys .*missing \['completion'\]"):
        validate_template({"prompt": "x"})
    with pytest.raises(ValueError, match=r"unexpected \['system'\]"):
        validate_template({"prompt": "x", "completion": "y", "system": "z"})
    with pytest.raises(ValueError, match="'completion': syntax error on line 1"):
        validate_template({"prompt": "x", "completion": "{{ y "})
    with pytest.raises(ValueError, match="take no params"):
        validate_template({"prompt": "x", "completion": "y"}, {"target": "rating"})
    with pytest.raises(ValueError, match="built-in name or a"):
        validate_template(3)  # type: ignore[arg-type]
    validate_template("wmt", WMT_DE_EN)
    validate_template({"prompt": "{{ a }}", "completion": "{{ b }}"})


def test_template_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    base = template_fingerprint("sst2")
    assert base == template_fingerprint("sst2", {})
    assert base == template_fingerprint("sst2", {"phrasings": False})  # defaults resolved
    assert base != template_fingerprint("sst2", {"phrasings": True})
    assert base != template_fingerprint("amazon_reviews")
    assert template_fingerprint("wmt", WMT_DE_EN) != template_fingerprint(
        "wmt", {"source_lang": "en", "target_lang": "de"}
    )
    custom = {"prompt": "{{ a }}", "completion": "{{ b }}"}
    assert template_fingerprint(custom) == template_fingerprint(dict(custom))
    assert template_fingerprint(custom) != template_fingerprint({**custom, "prompt": "{{a}}"})
    # Editing a prompt string, a helper or the function itself changes the fingerprint.
    prompts = dict(templates._PROMPTS, sst2=("Sentence: {sentence}\nLabel:",))
    monkeypatch.setattr(templates, "_PROMPTS", prompts)
    assert template_fingerprint("sst2") != base
    monkeypatch.undo()
    assert template_fingerprint("sst2") == base

    def _int_label(record: dict[str, Any], name: str, allowed: range) -> int:
        return 1  # an edited helper

    monkeypatch.setattr(templates, "_int_label", _int_label)
    _int_label.__module__ = templates.__name__
    assert template_fingerprint("sst2") != base
    assert template_fingerprint("alpaca") == template_fingerprint("alpaca")


# --- the tokenizer's own chat template --------------------------------------------------------

CHAT_TEMPLATES = Path(__file__).resolve().parents[1] / "assets" / "chat_templates"
STORIES = Path(__file__).resolve().parents[1] / "assets" / "models" / "stories260K"


def chat_tokenizer(folder: Path, template: str, as_file: bool) -> Path:
    """The stories260K tokenizer with a real chat template, in tokenizer_config.json or as
    chat_template.jinja (the two places transformers reads it from)."""
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((STORIES / "tokenizer.json").read_bytes())
    config = json.loads((STORIES / "tokenizer_config.json").read_text())
    source = (CHAT_TEMPLATES / template).read_text()
    if as_file:
        (folder / "chat_template.jinja").write_text(source)
    else:
        config["chat_template"] = source
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def conversations() -> list[dict[str, Any]]:
    """The single-turn demo chats, plus multi-turn ones built from them: a system message,
    three exchanges, the middle answer not learned (loss_weight 0)."""
    recs = [rec for _, rec in records("instruction/v1_sft_demo.jsonl")]
    out = list(recs)
    for i in range(0, 30, 3):
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": "You are a helpful assistant."}
        ]
        for j, rec in enumerate(recs[i : i + 3]):
            messages += [dict(m) for m in rec["messages"]]
            if j == 1:
                messages[-1]["loss_weight"] = 0.0
        out.append({"messages": messages})
    return out


@pytest.mark.parametrize(
    ("template", "as_file"), [("llama2_chat.jinja", False), ("chatml.jinja", True)]
)
def test_chat_uses_the_tokenizers_chat_template(
    tmp_path: Path, template: str, as_file: bool
) -> None:
    from transformers import AutoTokenizer

    from data_pipeline import tokenize
    from data_pipeline.tokenizer import make_encoder, tokenizer_spec
    from data_pipeline.worker import ShardWorker

    folder = chat_tokenizer(tmp_path / "tok", template, as_file)
    spec = tokenizer_spec(str(folder))
    assert spec["chat_template"] == (CHAT_TEMPLATES / template).read_text()
    tok = AutoTokenizer.from_pretrained(str(folder))
    encode = make_encoder(spec)
    chat = templates.tokenizer_chat_template(spec["chat_template"], spec["special_tokens"])
    render_chat = templates.renderer("chat", chat_template=chat)
    bos, eos = tok.bos_token, tok.eos_token
    expected = []
    for record in conversations():
        turns = render_chat(record)
        messages = [
            {"role": m["role"], "content": templates._message_text(m, "m")}
            for m in record["messages"]
        ]
        # The text is exactly transformers' (the leading bos and the trailing eos that the
        # llama2 template writes are added back as ids by build_example).
        reference = tok.apply_chat_template(messages, tokenize=False)
        text = "".join(p + c for p, c in turns)
        if template == "llama2_chat.jinja":
            assert reference == bos + text + eos
        else:
            assert reference == text and bos not in text
        # Loss only on the learned assistant turns: each completion is the template's text of
        # one learned assistant message, and the labels count exactly its tokens + eos.
        learned = [m for m in record["messages"] if m["role"] == "assistant"]
        learned = [m for m in learned if m.get("loss_weight", 1.0) > 0]
        assert len(turns) == len(learned)
        for (_, completion), m in zip(turns, learned, strict=True):
            assert templates._message_text(m, "m").strip() in completion
        ids = encode([t for turn in turns for t in turn])
        input_ids, labels = tokenize.build_example(
            ids[0::2], ids[1::2], bos_id=spec["bos"], eos_id=spec["eos"], max_seq_len=10_000
        )
        assert sum(label != -100 for label in labels) == sum(len(c) for c in ids[1::2]) + 1
        assert [t for t, label in zip(input_ids, labels, strict=True) if label != -100] == [
            t for c in ids[1::2] for t in c
        ] + [spec["eos"]]
        if template == "llama2_chat.jinja" and len(turns) == 1:
            # Single turn: the token ids equal transformers' tokenization of its own text.
            reference_ids: Any = tok.apply_chat_template(messages, tokenize=True)
            assert input_ids == reference_ids["input_ids"]
        expected.append((input_ids, labels))
    # The prepare job's worker (no Ray needed to call it) renders with the same template.
    path = DATA / "instruction" / "v1_sft_demo.jsonl"
    worker = ShardWorker(
        sources=[{"template": "chat", "params": {}, "split": "train"}],
        tokenizer=spec,
        max_seq_len=10_000,
        truncation="drop",
        seed=0,
        ratios={"train": 1.0},
    )
    unit = {"source": 0, "part": 0, "path": str(path), "fmt": "jsonl", "gz": False, "whole": True}
    table = worker._process({**unit, "start": 0, "end": path.stat().st_size, "first_line": 1})
    assert table["ok"].to_pylist() == [True] * 100
    assert table["input_ids"].to_pylist() == [ids for ids, _ in expected[:100]]
    assert table["labels"].to_pylist() == [labels for _, labels in expected[:100]]


def test_tokenizer_chat_template_errors_are_rejects() -> None:
    source = (CHAT_TEMPLATES / "llama2_chat.jinja").read_text()
    chat = templates.tokenizer_chat_template(source, {"bos_token": "<s>", "eos_token": "</s>"})
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                 {"role": "assistant", "content": "c"}]  # fmt: skip
    with pytest.raises(TemplateError, match="roles must alternate"):
        render("chat", {"messages": two_users}, chat_template=chat)
    # The immutable sandbox: no attribute escapes, no mutation of the messages.
    escape = templates.tokenizer_chat_template("{{ messages.append(1) }}", {})
    with pytest.raises(TemplateError, match="sandbox"):
        render("chat", {"messages": two_users}, chat_template=escape)
    # A template that renders an earlier turn differently once the conversation goes on.
    drifting = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    conversation = [
        {"role": role, "content": text} for role, text in zip("uaua", "abcd", strict=True)
    ]
    conversation = [
        {**m, "role": "user" if m["role"] == "u" else "assistant"} for m in conversation
    ]
    with pytest.raises(TemplateError, match="differently"):
        render(
            "chat",
            {"messages": conversation},
            chat_template=templates.tokenizer_chat_template(drifting, {}),
        )
    with pytest.raises(ValueError, match="syntax error"):
        templates.tokenizer_chat_template("{% for %}", {})


def test_template_fingerprints_are_the_same_in_every_process() -> None:
    """The prepare cache key hashes template code: it must not depend on the hash seed or on
    where functions sit in memory, or no rerun would ever be reused."""
    import subprocess
    import sys

    code = (
        "from data_pipeline import templates as t\n"
        "print(t._definition_text(t.tokenizer_chat_template))\n"
        "print([t._definition_text(f) for _, f in sorted(t.BUILTIN_TEMPLATES.items())])\n"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1 and " at 0x" not in outs.pop()


def test_a_non_decimal_digit_label_is_a_template_error() -> None:
    # "²".isdigit() is True but int("²") raises ValueError: it must be a reject, not a crash.
    with pytest.raises(TemplateError, match="must be an integer"):
        render("sst2", {"sentence": "fine", "label": "²"})
    assert render("sst2", {"sentence": "fine", "label": " 1 "})[0][1] == "positive"
