"""training.context's one-process stand-in for Ray Train (used by benchmarks/gpu.py)."""

from __future__ import annotations

from pathlib import Path

from training import context


def _shard(tmp: Path, name: str, text: str) -> str:
    folder = tmp / name
    (folder / "ds").mkdir(parents=True)
    (folder / "ds" / "state.pt").write_text(text)
    return str(folder)


def test_local_run_keeps_the_newest_checkpoints_and_resumes_from_the_last(tmp_path: Path) -> None:
    storage = tmp_path / "ckpt"
    with context.local_run(str(storage), keep=2) as run:
        assert context.get_checkpoint() is None
        ctx = context.get_context()
        assert (ctx.get_world_rank(), ctx.get_world_size()) == (0, 1)
        for step in (1, 2, 3):
            src = _shard(tmp_path, f"tmp{step}", f"step {step}")
            context.report({"step": step}, checkpoint_dir=src, dir_name=f"step_{step:07d}")
        context.report({"step": 4, "val/loss": 1.0})  # metrics alone
        ckpt = context.get_checkpoint()
        assert ckpt is not None
        with ckpt.as_directory() as d:
            assert (Path(d) / "ds" / "state.pt").read_text() == "step 3"
    assert [r["step"] for r in run.reports] == [1, 2, 3, 4]
    assert sorted(p.name for p in storage.iterdir()) == ["step_0000002", "step_0000003"]
    # the stand-in is gone after the block: a later lookup goes to Ray Train again
    assert context._local is None


def test_a_new_local_run_resumes_what_an_earlier_one_left(tmp_path: Path) -> None:
    storage = tmp_path / "ckpt"
    with context.local_run(str(storage)):
        context.report({}, checkpoint_dir=_shard(tmp_path, "a", "x"), dir_name="step_0000005")
    (storage / ".partial-step_0000009").mkdir()  # a move cut short is never resumed from
    with context.local_run(str(storage)):
        ckpt = context.get_checkpoint()
        assert ckpt is not None and Path(ckpt.path).name == "step_0000005"
