"""What a person sees: `ift run` on the quickstart config with its output piped (as CI and
`make run | tee` see it), capped to a few records and steps so that it runs in seconds.

The console is a few lines per stage, none from Ray's, MLflow's or the libraries' internals,
and ends with the results table and where the outputs are; the chatter is in the log file.
Nothing is mocked: real Ray, DeepSpeed, MLflow (SQLite) and stories260K.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
MAX_LINES = 60
# Lines that belong in the log file, never on the console.
INTERNALS = re.compile(
    r"core_worker|raylet|INFO mlflow|Failed to query|FutureWarning|UserWarning|\x1b\[|"
    r"\(RayTrainWorker|\(TrainController|\(pid=|Checkpoint successfully|deepspeed",
    re.IGNORECASE,
)

pytestmark = pytest.mark.integration


def capped_overrides(tmp_path: Path) -> list[str]:
    """The quickstart, every source cut to a handful of records, 2 training steps on one
    worker and short generations; outputs and MLflow in `tmp_path`."""
    sources = yaml.safe_load(QUICKSTART.read_text())["data"]["sources"]
    return [
        f"experiment.output_dir={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *(f"data.sources.{i}.max_records=40" for i in range(len(sources))),
        "data.max_test_records=8",
        "data.split.train=0.7",
        "data.split.validation=0.1",
        "data.split.test=0.2",
        "train.max_steps=2",
        "train.num_workers=1",
        "train.micro_batch_size=2",
        "train.grad_accum=1",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "tracking.log_model=false",
        "eval.max_new_tokens=4",
        "eval.models=[finetuned]",  # the base's eval adds time and no other kind of line
    ]


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    tmp_path = tmp_path_factory.mktemp("console")
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "run", str(QUICKSTART), *capped_overrides(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # both, as a terminal shows them
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout[-5000:]
    return tmp_path, lines


def test_console_is_short_and_has_no_internals(piped_run: tuple[Path, list[str]]) -> None:
    _, lines = piped_run
    assert len(lines) <= MAX_LINES, "\n".join(lines)
    leaked = [line for line in lines if INTERNALS.search(line)]
    assert not leaked, "\n".join(leaked)
    # Each stage says what it did, with its progress as plain lines.
    text = "\n".join(lines)
    for stage in ("== prepare", "== train", "== eval finetuned"):
        assert stage in text
    assert re.search(r"^\[prepare\] \d+/\d+ units", text, re.MULTILINE)
    assert re.search(r"^\[train\] 2/2 steps  loss [\d.]+", text, re.MULTILINE)
    assert re.search(r"^\[eval finetuned\] (\d+)/\1 batches", text, re.MULTILINE)


def test_console_ends_with_the_table_and_where_the_outputs_are(
    piped_run: tuple[Path, list[str]],
) -> None:
    tmp_path, lines = piped_run
    header = next(i for i, line in enumerate(lines) if line.startswith("metric "))
    assert [c.strip() for c in lines[header].split("|")] == [
        "metric",
        "base",
        "fine-tuned",
        "delta",
    ]
    rows = lines[header + 2 :]
    table = rows[: rows.index("")]
    tasks = {line.split("/")[0] for line in table}
    assert {"sst2", "sst2_dev", "wmt"} <= tasks
    tail = lines[header + 2 + len(table) :]
    assert tail[0] == "" and tail[1].startswith("== done in ")
    assert tail[2].startswith(f"   outputs: {tmp_path / 'runs'}")
    assert tail[3] == f"   log:     {tmp_path / 'runs' / 'logs' / 'ift.log'}"
    assert tail[4].startswith("   MLflow:  experiment 'ift-quickstart' at sqlite:///")
    assert tail[5].strip().startswith("to browse it: mlflow ui")
    assert len(tail) == 6


def test_log_file_holds_the_chatter(piped_run: tuple[Path, list[str]]) -> None:
    tmp_path, lines = piped_run
    log = (tmp_path / "runs" / "logs" / "ift.log").read_text()
    # The libraries' and Ray's own output...
    assert "mlflow" in log and "RayTrainWorker" in log
    # ...and the console's lines, so the log tells the whole story in order.
    assert "ift | == train" in log and "ift | == done in" in log
    assert "\x1b[" not in log  # Ray's worker prefixes without colour codes


# --- the console alone (no Ray) -----------------------------------------------------------------


def test_piped_console_prints_a_bar_as_plain_lines_in_order() -> None:
    from launcher import console

    out = io.StringIO()
    con = console.Console(out, tty=False)
    bar = con.progress("[prepare]", 4, "units")
    for i in range(1, 5):
        bar.update(i, f"{i * 10} records")  # within PROGRESS_EVERY_S: no line yet
    con.line("[prepare] 40 examples")  # a complete bar is closed before the stage's summary
    workers = console.WorkerLines(con)
    workers.steps = True
    workers("[train] step 1/2 loss 3.1000 lr 1e-03 grad_norm 1.0 tok/s 4000 eta 5s")
    workers("(RayTrainWorker pid=1) Checkpoint successfully created")  # not ift's: log only
    workers("[train] resumed from step 1")
    workers("[train] step 2/2 loss 2.1000 lr 1e-03 grad_norm 1.0 tok/s 4100 eta 0s")
    workers("[train] step 1/2 loss 9.0 lr 1e-03 grad_norm 1.0 tok/s 1 eta 9s")  # late: ignored
    con.line("== eval base")
    assert out.getvalue().splitlines() == [
        "[prepare] 4/4 units  40 records",
        "[prepare] 40 examples",
        "[train] resumed from step 1",
        "[train] 2/2 steps  loss 2.1000  4,100 tok/s  ETA 0s",
        "== eval base",
    ]


def test_terminal_console_redraws_one_bar_in_place() -> None:
    from launcher import console

    out = io.StringIO()
    con = console.Console(out, tty=True)
    bar = con.progress("[eval base]", 2, "batches")
    bar.update(1)
    con.line("a line")  # printed above the bar, which is drawn again below it
    bar.update(2)
    bar.close()
    text = out.getvalue()
    assert text.count("\n") == 2  # the line and the finished bar
    assert text.endswith("[eval base] [########################] 2/2 batches\n")
    assert "\r\x1b[Ka line\n[eval base] [############............] 1/2 batches" in text
