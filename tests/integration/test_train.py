"""Training equivalences and fault recovery on real Ray Train + DeepSpeed (CPU, gloo) with the
real pretrained stories260K. Per-step losses are read back from a real MLflow (SQLite) run that
rank 0 logs into, exactly as in production.

Tolerance: the runs below compute the same sums in a different order (ZeRO partitions and
bucketed reductions, gloo all-reduce, micro-batch split), so they agree to float32
reassociation, ~1e-6 relative per step, compounded over a few Adam steps: RTOL = 1e-3.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import ray

from data_pipeline.prepare import prepare
from launcher.config import from_dict, resolve_paths
from tests.ray_local import start_local_ray
from training.train import train

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "tests" / "assets"
RTOL = 1e-3

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def _ray_for_module():
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def local_ray(_ray_for_module):
    """A local Ray for this module, (re)started if a test shut it down (the 2-node test does)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ["TQDM_DISABLE"] = "1"
    if not ray.is_initialized():
        start_local_ray(logging.WARNING)
    yield


def config(out: Path, *, packing: bool = True, records: int = 64, **train: object):
    raw = {
        "experiment": {"name": "t", "output_dir": str(out), "seed": 3},
        "model": {"name_or_path": str(ASSETS / "models" / "stories260K")},
        "data": {
            "sources": [
                {
                    "path": str(ASSETS / "data" / "sst2" / "train.tsv"),
                    "template": "sst2",
                    "max_records": records,
                    "split": "train",
                }
            ],
            "max_seq_len": 128,
            "packing": packing,
            "num_workers": 1,
        },
        "train": {
            "max_steps": 4,
            "micro_batch_size": 2,
            "grad_accum": 1,
            "num_workers": 2,
            "lr": 3e-3,
            "warmup_steps": 0,
            "schedule": "constant",
            "zero_stage": 2,
            **train,
        },
        "tracking": {"enabled": False},
    }
    return resolve_paths(from_dict(raw))


def run_train(cfg, db: Path) -> list[float]:
    """Train and return train/loss per step from the MLflow run rank 0 logged into."""
    manifest = prepare(cfg, log=lambda _: None)
    uri = f"sqlite:///{db}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("t") or client.get_experiment(client.create_experiment("t"))
    run_id = client.create_run(exp.experiment_id).info.run_id
    train(cfg, manifest, tracking={"tracking_uri": uri, "run_id": run_id}, log=lambda _: None)
    con = sqlite3.connect(db)
    rows = con.execute(
        "select step, value from metrics where run_uuid=? and key='train/loss' order by step",
        (run_id,),
    ).fetchall()
    assert [s for s, _ in rows] == list(range(1, len(rows) + 1))
    return [v for _, v in rows]


def test_zero_stages_agree_step_by_step(local_ray, tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    losses = {z: run_train(config(tmp_path / f"z{z}", zero_stage=z), db) for z in (0, 2, 3)}
    assert len(losses[0]) == 4
    assert losses[2] == pytest.approx(losses[0], rel=RTOL)
    assert losses[3] == pytest.approx(losses[0], rel=RTOL)
    assert losses[0][-1] < losses[0][0]  # and it learns
    # Ray Train's own actors on the local Ray, from the GCS's actor table (dead ones included):
    # no PreemptionWatcher there (`launcher.local_ray.LOCAL_TRAIN_ENV`), its controller is.
    started = {a["ActorClassName"] for a in ray._private.state.actors().values()}
    assert "TrainController" in started
    assert "PreemptionWatcher" not in started


def test_one_worker_accumulating_equals_two_workers(local_ray, tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    one = run_train(config(tmp_path / "w1", num_workers=1, grad_accum=2), db)
    two = run_train(config(tmp_path / "w2", num_workers=2, grad_accum=1), db)
    assert two == pytest.approx(one, rel=RTOL)


def test_packed_and_unpacked_batches_give_the_same_loss(local_ray, tmp_path: Path) -> None:
    """Full-batch steps over the same 24 examples: packed into a few rows or one row each."""
    db = tmp_path / "mlflow.db"
    unpacked_cfg = config(
        tmp_path / "u", packing=False, records=24, num_workers=1, micro_batch_size=24
    )
    unpacked = run_train(unpacked_cfg, db)
    packed_cfg = config(tmp_path / "p", packing=True, records=24, num_workers=1)
    rows = prepare(packed_cfg, log=lambda _: None)["splits"]["train"]["rows"]
    assert rows < 24  # really packed
    packed_cfg = config(
        tmp_path / "p", packing=True, records=24, num_workers=1, micro_batch_size=rows
    )
    packed = run_train(packed_cfg, db)
    assert packed == pytest.approx(unpacked, rel=RTOL)


def _kill_a_worker_after(checkpoint_dir: Path, killed: list[int], deadline: float) -> None:
    """SIGKILL one Ray Train worker process once the first checkpoint exists."""
    while time.time() < deadline and not killed:
        if any(checkpoint_dir.glob("run-*/step_*")):
            for p in psutil.process_iter(["pid", "cmdline"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if "RayTrainWorker" in cmd:
                    os.kill(p.info["pid"], signal.SIGKILL)
                    killed.append(p.info["pid"])
                    return
        time.sleep(0.2)


@pytest.mark.slow  # fault injection: `make test-reliability`
def test_killed_worker_is_recovered_from_the_last_checkpoint(local_ray, tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    reference = run_train(config(tmp_path / "ref", max_steps=8), db)
    cfg = config(tmp_path / "faulty", max_steps=8, checkpoint_every=2, max_failures=2)
    killed: list[int] = []
    watcher = threading.Thread(
        target=_kill_a_worker_after,
        args=(tmp_path / "faulty" / "checkpoints", killed, time.time() + 600),
        daemon=True,
    )
    watcher.start()
    manifest = prepare(cfg, log=lambda _: None)
    result = train(cfg, manifest, tracking=None, log=lambda _: None)
    watcher.join(timeout=1)
    assert killed, "no worker was killed: the test did not exercise recovery"
    assert result["step"] == 8
    # Resumed from a checkpoint, the run ends where the uninterrupted one does.
    assert result["train/loss"] == pytest.approx(reference[-1], rel=RTOL)
    assert (tmp_path / "faulty" / "model" / "config.json").exists()


def test_lora_trains_adapters_and_saves_merged_model_under_zero2_and_zero3(
    local_ray, tmp_path: Path
) -> None:
    """LoRA under ZeRO-3 (adapter and base weights partitioned) follows ZeRO-2 step by step and
    consolidates the same merged model and adapter."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    db = tmp_path / "mlflow.db"
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    losses = {
        z: run_train(config(tmp_path / f"z{z}", max_steps=3, lr=1e-2, zero_stage=z, lora=lora), db)
        for z in (2, 3)
    }
    assert losses[2][-1] < losses[2][0]
    assert losses[3] == pytest.approx(losses[2], rel=RTOL)
    base = AutoModelForCausalLM.from_pretrained(ASSETS / "models" / "stories260K")
    b = dict(base.named_parameters())
    tuned = {}
    for z in (2, 3):
        out = tmp_path / f"z{z}" / "model"
        assert (out / "adapter" / "adapter_config.json").exists()
        adapter = load_file(out / "adapter" / "adapter_model.safetensors")
        assert adapter and all("lora_" in k for k in adapter)
        tuned[z] = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())
        # Only the targeted projections changed (merged adapters); everything else is the base.
        changed = {k for k in b if not torch.equal(b[k], tuned[z][k])}
        assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed), changed
    for k in b:
        torch.testing.assert_close(tuned[3][k], tuned[2][k], rtol=RTOL, atol=1e-5)


def test_two_node_cluster_trains_and_checkpoints_to_shared_storage(tmp_path: Path) -> None:
    """`ray.cluster_utils.Cluster`: two raylets on this machine, one CPU each, so the two
    training workers land on different nodes and write one checkpoint to shared storage."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        cfg = config(tmp_path / "multi", max_steps=2, cpus_per_worker=1)
        manifest = prepare(cfg, log=lambda _: None)
        result = train(cfg, manifest, tracking=None, log=lambda _: None)
        assert result["step"] == 2
        ckpts = list((tmp_path / "multi" / "checkpoints").glob("run-*/step_*"))
        assert ckpts
        # Both ranks' ZeRO-2 optimizer shards are in the one checkpoint.
        shards = list(ckpts[0].rglob("*optim_states.pt"))
        assert len(shards) == 2, shards
        assert len({n["NodeID"] for n in ray.nodes() if n["Alive"]}) == 2
    finally:
        ray.shutdown()
        cluster.shutdown()
