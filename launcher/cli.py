"""`ift`: the command line. Heavy imports (ray, torch) happen only after the config is valid.

ift prepare CONFIG [key=value ...]
ift train   CONFIG [key=value ...]
ift eval    CONFIG [key=value ...]
ift run     CONFIG [key=value ...]
ift score   --predictions FILE.jsonl [--metrics bleu,chrf,rouge] [--num-workers N] ...
ift submit  CONFIG --address http://HEAD:8265
ift k8s     CONFIG [--out DIR]
"""

from __future__ import annotations

import argparse
import sys

from launcher.config import ConfigError, load_config

STAGES = {
    "prepare": ("prepare",),
    "train": ("prepare", "train"),
    "eval": ("eval",),
    "run": ("prepare", "train", "eval"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ift", description="Distributed instruction fine-tuning.")
    sub = p.add_subparsers(dest="command", required=True)
    helps = {
        "prepare": "template, split, tokenize and pack the data (Ray Data)",
        "train": "fine-tune with DeepSpeed ZeRO on Ray Train (prepares data first if needed)",
        "eval": "generate on the test split with the base and fine-tuned models; score",
        "run": "prepare -> train -> eval under one MLflow pipeline run",
    }
    for name, text in helps.items():
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("config", help="experiment YAML")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.zero_stage=3")
    from eval.score import add_score_arguments  # the one `ift score` parser: eval/score.py

    text = "score an existing predictions JSONL"
    add_score_arguments(sub.add_parser("score", help=text, description=text))
    sm = sub.add_parser("submit", help="submit the pipeline as a Ray job")
    sm.add_argument("config")
    sm.add_argument("overrides", nargs="*")
    sm.add_argument("--address", required=True)
    sm.add_argument("--stage", default="run", choices=list(STAGES))
    sm.add_argument("--no-wait", action="store_true")
    sm.add_argument("--token-file", default=None, help="Ray auth token (default ~/.ray/auth_token)")
    jb = sub.add_parser("jobs", help="list, show logs of, or stop submitted Ray jobs")
    jb.add_argument("action", choices=["list", "logs", "stop"])
    jb.add_argument("job_id", nargs="?")
    jb.add_argument("--address", required=True)
    jb.add_argument("--token-file", default=None)
    k8 = sub.add_parser("k8s", help="render KubeRay manifests for this experiment")
    k8.add_argument("config")
    k8.add_argument("overrides", nargs="*")
    k8.add_argument(
        "--out",
        default=None,
        help="write rayjob.yaml and raycluster.yaml there (default: print the RayJob's YAML)",
    )
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, flags and `key=value` overrides in any order.

    argparse takes a command's positionals (config, overrides) as one run, so overrides after a
    flag (`ift submit CONFIG --address URL key=value`) come back unrecognized: they are appended
    to the overrides, in order. Any other leftover is an error, as argparse would report it.
    """
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if "overrides" not in vars(args) or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        if args.command == "score":
            return _score(args)
        if args.command == "submit":
            from launcher.submit import submit

            return submit(
                args.config,
                args.overrides,
                args.address,
                stage=args.stage,
                wait=not args.no_wait,
                token_file=args.token_file,
            )
        if args.command == "jobs":
            from launcher.submit import jobs

            return jobs(args.action, args.job_id, args.address, token_file=args.token_file)
        cfg = load_config(args.config, args.overrides)
        if args.command == "k8s":
            from launcher import k8s

            return k8s.main(args.config, args.overrides, args.out)
        from launcher.pipeline import run_pipeline

        run_pipeline(cfg, args.command, STAGES[args.command], config_path=args.config)
        return 0
    except ConfigError as e:
        print(f"ift: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ift: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # Job errors that explain themselves (bad records, batch too big, server down, ...)
        # are printed as one paragraph; anything else is a bug and keeps its traceback.
        if not getattr(e, "user_facing", False):
            raise
        print(f"ift {args.command}: {e}", file=sys.stderr)
        return 1


def _score(args: argparse.Namespace) -> int:
    from eval.score import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
