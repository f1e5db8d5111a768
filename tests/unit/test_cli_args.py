"""`ift` takes a command's flags and its key=value overrides in any order."""

from __future__ import annotations

import pytest

from launcher.cli import parse


def test_overrides_after_flags_are_overrides_in_order() -> None:
    args = parse(["submit", "c.yaml", "a=1", "--address", "http://h:8265", "b=2", "--no-wait"])
    assert (args.config, args.overrides, args.address, args.no_wait) == (
        "c.yaml",
        ["a=1", "b=2"],
        "http://h:8265",
        True,
    )
    args = parse(["k8s", "c.yaml", "--out", "d", "train.zero_stage=3"])
    assert (args.overrides, args.out) == (["train.zero_stage=3"], "d")
    assert parse(["train", "c.yaml", "x.y=1", "z=2"]).overrides == ["x.y=1", "z=2"]


@pytest.mark.parametrize(
    "argv",
    [
        ["submit", "c.yaml", "--address", "u", "--bogus"],  # an unknown flag
        ["submit", "c.yaml", "--address", "u", "stray"],  # not key=value
        ["jobs", "list", "--address", "u", "a=1"],  # jobs takes no overrides
    ],
)
def test_other_leftovers_are_still_errors(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_help_describes_every_command_and_every_flag() -> None:
    import argparse

    from launcher.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    undocumented = [
        f"{name} {action.dest}"
        for name, command in sub.choices.items()
        for action in command._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert not undocumented, undocumented
    assert all(command.description for command in sub.choices.values())
    assert set(sub.choices) >= {"prepare", "train", "eval", "run", "plan", "score", "submit"}
    assert {"jobs", "k8s"} <= set(sub.choices)
