"""`ift score`: metrics of a JSONL file of predictions, printed as one JSON object.

    ift score --predictions runs/demo/eval/finetuned/predictions.jsonl --metrics bleu,chrf
    python -m eval.score --predictions preds.jsonl --metrics rouge --num-workers 4

`ift score --help` lists every metric option (`--lowercase`, `--rouge-split-sentences`, ...);
this module defines the command's arguments once (`add_score_arguments`) for both entry points.

Each line is a JSON object ``{"prediction": str, "reference": str | [str, ...]}``; other keys
(``id``, ``prompt``) are ignored, blank lines skipped. With ``--num-workers N`` the lines are
cut into N contiguous shards scored in a process pool and the shards' sufficient statistics
merged, so the numbers are the same as with one worker (see ``eval.metrics``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from eval.metrics import METRIC_NAMES, MetricOptions, compute_metrics

DEFAULT_METRICS: tuple[str, ...] = ("bleu", "chrf", "rouge")


def read_predictions(path: str) -> tuple[list[str], list[list[str]]]:
    """Reads a predictions JSONL file.

    Args:
        path: The JSONL file.

    Returns:
        The predictions and, per line, the list of references.

    Raises:
        ValueError: On a malformed line (naming the file and the 1-based line number) or a
            file without any record.
        OSError: If the file cannot be read.
    """
    predictions: list[str] = []
    references: list[list[str]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({exc})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object")
            prediction = record.get("prediction")
            reference = record.get("reference")
            if not isinstance(prediction, str):
                raise ValueError(
                    f"{path}, line {lineno}: 'prediction' must be a string, got {prediction!r}"
                )
            refs = [reference] if isinstance(reference, str) else reference
            if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
                raise ValueError(
                    f"{path}, line {lineno}: 'reference' must be a string or a non-empty list "
                    f"of strings, got {reference!r}"
                )
            predictions.append(prediction)
            references.append(refs)
    if not predictions:
        raise ValueError(f"{path}: no records to score")
    return predictions, references


def score_file(
    path: str,
    metrics: Sequence[str] | None = None,
    num_workers: int = 1,
    options: Mapping[str, Any] | MetricOptions | None = None,
    executor: concurrent.futures.Executor | None = None,
) -> dict[str, float]:
    """Scores a predictions JSONL file.

    Args:
        path: JSONL with ``prediction`` and ``reference`` (string or list of strings).
        metrics: Metric names; ``None`` or empty for bleu, chrf and rouge.
        num_workers: Contiguous shards scored in a spawn-context process pool when above 1.
        options: ``eval.metrics.MetricOptions`` fields, e.g. ``{"bleu_tokenize": "intl"}``.
        executor: An existing pool to run the shards in (not shut down here).

    Returns:
        The scores by key, e.g. ``{"bleu": ..., "chrf": ..., "rouge1": ..., ...}``.

    Raises:
        ValueError: On a malformed line, an unknown metric or option.
    """
    predictions, references = read_predictions(path)
    names = list(metrics) if metrics else list(DEFAULT_METRICS)
    return compute_metrics(
        names,
        predictions,
        references,
        options=options,
        num_workers=num_workers,
        executor=executor,
    )


# `--help` of each `MetricOptions` field; a test checks that every field has one.
OPTION_HELP: dict[str, str] = {
    "bleu_tokenize": "sacreBLEU tokenizer for BLEU: 13a, intl, zh, char, none, ...",
    "lowercase": "lowercase predictions and references before BLEU and chrF",
    "chrf_char_order": "chrF character n-gram order",
    "chrf_word_order": "chrF word n-gram order (2 gives chrF++)",
    "chrf_beta": "chrF recall weight",
    "rouge_use_stemmer": "Porter-stem tokens before ROUGE, as rouge-score's use_stemmer",
    "rouge_split_sentences": (
        "split texts into one sentence per line at . ! ? before rougeLsum (off: rougeLsum "
        "exactly as rouge-score on the texts as given)"
    ),
}


def add_score_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds every ``ift score`` argument to ``parser``: the one definition of that command,
    used by ``python -m eval.score`` and by ``ift score`` (launcher/cli.py).

    Each ``MetricOptions`` field is a flag of the same name (``--bleu-tokenize``,
    ``--rouge-split-sentences`` / ``--no-rouge-split-sentences``, ...) with its default.
    """
    parser.add_argument(
        "--predictions",
        required=True,
        metavar="FILE",
        help='JSONL lines {"prediction": str, "reference": str | [str, ...]}',
    )
    parser.add_argument(
        "--metrics",
        default=",".join(DEFAULT_METRICS),
        help=f"comma-separated, from {', '.join(METRIC_NAMES)} (default: %(default)s)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=1,
        metavar="N",
        help="score N contiguous shards in parallel processes (same result)",
    )
    defaults = MetricOptions()
    for field in dataclasses.fields(MetricOptions):
        default = getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        text = OPTION_HELP[field.name] + " (default: %(default)s)"
        if isinstance(default, bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=text
            )
        else:
            parser.add_argument(
                flag, type=type(default), default=default, metavar=field.name.upper(), help=text
            )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``ift score`` argument parser."""
    return add_score_arguments(
        argparse.ArgumentParser(
            prog="ift score",
            description="Score a predictions JSONL file; prints one JSON object of metrics.",
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``ift score``.

    Args:
        argv: Arguments after the command name; ``None`` for ``sys.argv[1:]``.

    Returns:
        0 on success, 1 with a one-line error on stderr for bad input.
    """
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Runs ``ift score`` on arguments parsed by a parser from ``add_score_arguments``.

    Returns:
        0 on success, 1 with a one-line error on stderr for bad input.
    """
    names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(MetricOptions)}
    try:
        result = score_file(args.predictions, names, num_workers=args.num_workers, options=options)
    except (ValueError, OSError) as exc:
        print(f"ift score: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
