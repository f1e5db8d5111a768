"""`ift score`: metrics of a JSONL file of predictions, printed as one JSON object.

    ift score --predictions runs/demo/eval/finetuned/predictions.jsonl --metrics bleu,chrf
    python -m eval.score --predictions preds.jsonl --metrics rouge --num-workers 4

Each line is a JSON object ``{"prediction": str, "reference": str | [str, ...]}``; other keys
(``id``, ``prompt``) are ignored, blank lines skipped. With ``--num-workers N`` the lines are
cut into N contiguous shards scored in a process pool and the shards' sufficient statistics
merged, so the numbers are the same as with one worker (see ``eval.metrics``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
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


def build_parser() -> argparse.ArgumentParser:
    """The ``ift score`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="ift score",
        description="Score a predictions JSONL file; prints one JSON object of metrics.",
    )
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
    parser.add_argument(
        "--bleu-tokenize",
        default=MetricOptions.bleu_tokenize,
        help="sacreBLEU tokenizer for BLEU (default: %(default)s)",
    )
    parser.add_argument("--lowercase", action="store_true", help="lowercase before BLEU and chrF")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``ift score``.

    Args:
        argv: Arguments after the command name; ``None`` for ``sys.argv[1:]``.

    Returns:
        0 on success, 1 with a one-line error on stderr for bad input.
    """
    args = build_parser().parse_args(argv)
    names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    options = {"bleu_tokenize": args.bleu_tokenize, "lowercase": args.lowercase}
    try:
        result = score_file(args.predictions, names, num_workers=args.num_workers, options=options)
    except (ValueError, OSError) as exc:
        print(f"ift score: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
