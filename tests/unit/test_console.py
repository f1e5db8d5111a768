"""The console alone (no Ray): what `ift run` prints for a stage's progress, piped and on a
terminal. The whole CLI's console is checked on a real run in
tests/integration/test_cli_pipeline.py."""

from __future__ import annotations

import io


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
