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
