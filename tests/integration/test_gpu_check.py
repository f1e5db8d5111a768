"""`python -m benchmarks.gpu --smoke`: the GPU check's code, run on CPU with a tiny model.

The device run (`make gpu-check`) cannot happen in CI; this runs the same sections (the train
worker without Ray, stopped and resumed; padded vs padding-free losses; generation) so that a
change to any of them breaks here first, not on a borrowed GPU.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
# Not on the GPU machine's image (the check carries DeepSpeed, pydantic and hjson as wheels).
ABSENT_ON_DEVICE = {"ray", "mlflow", "datasets", "flash_attn"}


def test_smoke_run_reports_every_section_with_finite_figures(tmp_path: Path) -> None:
    result_file = ROOT / "benchmarks" / "results" / "gpu.json"
    before = result_file.read_bytes() if result_file.exists() else None
    out = tmp_path / "gpu.json"
    # As `python -m benchmarks.gpu`, with the packages the GPU machine lacks made unfindable
    # (`find_spec` gives None, imports fail), as they are there.
    run_without = (
        "import runpy, sys, importlib.machinery as m\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {sorted(ABSENT_ON_DEVICE)!r}:\n"
        "            return None\n"
        "        return m.PathFinder.find_spec(name, path, target)\n"
        "    def invalidate_caches(self):\n"
        "        m.PathFinder.invalidate_caches()\n"
        "    def find_distributions(self, *args, **kwargs):\n"  # importlib.metadata's lookups
        "        return m.PathFinder.find_distributions(*args, **kwargs)\n"
        "sys.meta_path = [Hide() if f is m.PathFinder else f for f in sys.meta_path]\n"
        "runpy.run_module('benchmarks.gpu', run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", run_without, "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert json.loads(proc.stdout[proc.stdout.index("{") :]) == r  # printed as written
    # smoke never touches the recorded GPU figures
    assert (result_file.read_bytes() if result_file.exists() else None) == before

    assert r["mode"] == "smoke" and r["device"] == "cpu"
    train = r["train"]
    # stopped with a checkpoint after 2 of 4 steps, then resumed from it to the end
    assert (train["resumed_at"], train["steps"]) == (2, 4)
    for key in ("loss_at_stop", "loss", "tokens_per_s", "flops_per_token", "wall_s_resumed"):
        assert math.isfinite(train[key]) and train[key] > 0, key
    assert train["peak_flops"] is None and train["mfu"] is None  # no GPU, no MFU
    # the CPU DeepSpeed config: no fused step, no overlap, no CUDA RNG in the checkpoint
    assert train["optimizer_fused"] is False
    assert train["zero_optimization"]["stage"] == 3
    assert train["zero_optimization"]["overlap_comm"] is False
    assert train["cuda_rng_states_saved"] == 0

    sdpa = r["layouts"]["sdpa"]
    assert len(sdpa["padded"]) == len(sdpa["padding_free"]) == 3
    assert all(math.isfinite(x) for x in sdpa["padded"] + sdpa["padding_free"])
    assert sdpa["agree"] is True and sdpa["max_rel_diff"] <= 1e-4
    assert sdpa["padded"][0] != sdpa["padded"][-1]  # the steps trained something
    assert "skipped" in r["layouts"]["flash_attention_2"]

    gen = r["generate"]
    assert 0 < gen["new_tokens"] <= gen["batch"] * gen["max_new_tokens"]
    assert math.isfinite(gen["tokens_per_s"]) and gen["tokens_per_s"] > 0
