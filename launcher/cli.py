"""`ift`: the command line. Heavy imports (ray, torch) happen only after the config is valid.

ift prepare CONFIG [key=value ...]
ift train   CONFIG [key=value ...]
ift eval    CONFIG [key=value ...]
ift run     CONFIG [key=value ...]
ift plan    CONFIG [key=value ...] [--json] [--mfu 0.4]
ift score   --predictions FILE.jsonl [--metrics bleu,chrf,rouge] [--num-workers N] ...
ift submit  CONFIG --address http://HEAD:8265 [key=value ...]
ift jobs    list|logs|stop [JOB_ID] --address http://HEAD:8265
ift k8s     CONFIG [--out DIR] [key=value ...]
ift cache   [list|prune] [--dir DIR ...] [--max-gb N]
"""

from __future__ import annotations

import argparse
import os
import sys

from launcher.config import Config, ConfigError, load_config

STAGES = {
    "prepare": ("prepare",),
    "train": ("prepare", "train"),
    "eval": ("eval",),
    "run": ("prepare", "train", "eval"),
}
# Stages that refuse a plan that cannot fit (`train.check_fit`): `ift run`, `ift train`, and
# `ift submit` / `ift k8s` of those stages.
FIT_CHECKED = ("run", "train")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ift",
        description="Distributed instruction fine-tuning. Every command takes its flags and its "
        "key=value overrides in any order.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    overrides_help = "dotted key=value overrides of the config, e.g. train.zero_stage=3"
    helps = {
        "prepare": "template, split, tokenize and pack the data (Ray tasks)",
        "train": "fine-tune with DeepSpeed ZeRO on Ray Train (prepares data first if needed)",
        "eval": "generate on the test split with the base and fine-tuned models; score",
        "run": "prepare -> train -> eval under one MLflow pipeline run",
    }
    for name, text in helps.items():
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("config", help="experiment YAML")
        sp.add_argument("overrides", nargs="*", help=overrides_help)
    text = "print what a run will do (data, steps, parameters, memory per GPU, fit) without Ray"
    pl = sub.add_parser("plan", help=text, description=text)
    pl.add_argument("config", help="experiment YAML")
    pl.add_argument("overrides", nargs="*", help=overrides_help)
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    pl.add_argument(
        "--mfu", type=float, default=0.4, help="model FLOPs utilisation for the time estimate"
    )
    from eval.score import add_score_arguments  # the one `ift score` parser: eval/score.py

    text = "score an existing predictions JSONL"
    add_score_arguments(sub.add_parser("score", help=text, description=text))
    text = "submit the pipeline as a Ray job to a running Ray cluster"
    sm = sub.add_parser("submit", help=text, description=text)
    sm.add_argument("config", help="experiment YAML (its folder is shipped as the job's workdir)")
    sm.add_argument("overrides", nargs="*", help=overrides_help)
    address_help = "the Ray dashboard / job server, e.g. http://HEAD:8265"
    token_help = "file with the Ray auth token (default ~/.ray/auth_token)"
    sm.add_argument("--address", required=True, help=address_help)
    sm.add_argument(
        "--stage", default="run", choices=list(STAGES), help="what the job runs (default: run)"
    )
    sm.add_argument(
        "--no-wait", action="store_true", help="return once submitted instead of following logs"
    )
    sm.add_argument("--token-file", default=None, help=token_help)
    text = "list, show logs of, or stop submitted Ray jobs"
    jb = sub.add_parser("jobs", help=text, description=text)
    jb.add_argument("action", choices=["list", "logs", "stop"], help="what to do")
    jb.add_argument("job_id", nargs="?", help="the job (submission id) for logs and stop")
    jb.add_argument("--address", required=True, help=address_help)
    jb.add_argument("--token-file", default=None, help=token_help)
    text = "render KubeRay manifests (RayCluster + RayJob) for this experiment"
    k8 = sub.add_parser("k8s", help=text, description=text)
    k8.add_argument("config", help="experiment YAML (its `cluster` section sizes the pods)")
    k8.add_argument("overrides", nargs="*", help=overrides_help)
    k8.add_argument(
        "--out",
        default=None,
        help="write rayjob.yaml and raycluster.yaml there (default: print the RayJob's YAML)",
    )
    text = "list or prune this node's copies of downloaded models and token stores"
    ca = sub.add_parser("cache", help=text, description=text)
    ca.add_argument(
        "action",
        nargs="?",
        default="list",
        choices=["list", "prune"],
        help="list the entries (default), or remove the least recently used ones no process is "
        "using until each folder fits its budget",
    )
    ca.add_argument(
        "--dir",
        action="append",
        default=None,
        help="a cache folder, repeatable (default: the model cache <tmp>/ift-cache and the token "
        "store cache, $IFT_TOKEN_CACHE or <tmp>/ift-token-cache)",
    )
    ca.add_argument(
        "--max-gb",
        type=float,
        default=None,
        help="prune each folder to this many GiB (default: $IFT_CACHE_MAX_GB, else half its "
        "filesystem); 0 removes every entry no process is using",
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
        if args.command == "plan":
            return _plan(args)
        if args.command == "cache":
            return _cache(args)
        if args.command == "jobs":
            from launcher.submit import jobs

            return jobs(args.action, args.job_id, args.address, token_file=args.token_file)
        # `submit` and `k8s` run on a cluster (see `load_config`); `submit` loads the config
        # again itself, the same way.
        cluster_side = args.command in ("submit", "k8s")
        cfg = load_config(args.config, args.overrides, cluster_side=cluster_side)
        # Refuse a run that cannot fit before any cluster resource starts.
        stage = {"submit": getattr(args, "stage", None), "k8s": cfg.cluster.stage}
        if stage.get(args.command, args.command) in FIT_CHECKED:
            _check_fit(cfg, pods=args.command == "k8s")
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


def _cache(args: argparse.Namespace) -> int:
    """`ift cache`: the entries of each cache folder (size, last use, in use), or prune them.
    A cache is also pruned after every fill; this is for a node whose disk is needed now."""
    import time

    from data_pipeline import local_cache, storage, token_store

    if args.max_gb is not None and not args.max_gb >= 0:
        raise ConfigError(f"--max-gb: {args.max_gb} is not a number of GiB >= 0")
    gib = 2**30
    for base in args.dir or [storage.model_cache_dir(), token_store.cache_root()]:
        if args.action == "prune" and os.path.isdir(base):
            try:
                budget = (
                    int(args.max_gb * gib)
                    if args.max_gb is not None
                    else local_cache.max_bytes(base)
                )
            except ValueError as bad:  # a bad $IFT_CACHE_MAX_GB, named in the message
                raise ConfigError(str(bad)) from None
            removed = local_cache.prune(base, budget)
            print(f"{base}: removed {len(removed)} entries ({', '.join(removed) or 'none'})")
        listed = local_cache.entries(base)
        total = sum(e.bytes for e in listed)
        print(f"{base}: {len(listed)} entries, {total / gib:.2f} GiB")
        for e in reversed(listed):  # the most recently used first
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
            held = "  in use" if e.held else ""
            print(f"  {e.key}  {e.bytes / gib:8.2f} GiB  used {used}{held}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import json

    from launcher.plan import build_plan, format_plan, gpu_type_problems

    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu: {args.mfu} is not in (0, 1]")
    cfg = load_config(args.config, args.overrides)
    problems = gpu_type_problems(cfg)
    if problems:
        raise ConfigError("\n".join(problems))
    plan = build_plan(cfg, mfu=args.mfu)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


def _check_fit(cfg: Config, pods: bool) -> None:
    from launcher.plan import check_fit

    note = check_fit(cfg, pods=pods)
    if note:
        print(f"ift: {note}", file=sys.stderr)


def _score(args: argparse.Namespace) -> int:
    from eval.score import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
