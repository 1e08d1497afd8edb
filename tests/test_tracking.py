"""--report_to wandb,mlflow,trackio,tensorboard: the recipe's losses, read back from each tracker's
own local store, equal metrics.jsonl's; a resumed run continues the same tracker runs; nothing
goes over the network; a missing package is one clear error."""

from __future__ import annotations

import functools
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from train_utils import losses, train

from recipes.core.config import ConfigError
from recipes.core.logging import RunLog, tracker_names

TINY = ["--config", "tiny_cpu.yaml", "--learning_rate", "1e-3"]
ALL = "wandb,mlflow,trackio,tensorboard"

# Loaded into every Python process of the run: a connection to anything but this machine is
# recorded (for the test to fail on) and refused.
GUARD = """
import os, socket
_connect = socket.socket.connect
def connect(self, address):
    host = address[0] if isinstance(address, tuple) else None
    if host is not None and host not in ("127.0.0.1", "::1", "localhost"):
        with open(os.environ["CAMELID_NETWORK_LOG"], "a") as f:
            f.write(f"{address}\\n")
        raise OSError(f"test: no network ({address})")
    return _connect(self, address)
socket.socket.connect = connect
"""


@pytest.fixture
def offline(tmp_path, monkeypatch):
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "network.log"
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(guard), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("CAMELID_NETWORK_LOG", str(log))
    for key in (
        "WANDB_API_KEY",
        "MLFLOW_TRACKING_URI",
        "TRACKIO_DIR",
        "TRACKIO_SPACE_ID",
        "TRACKIO_SERVER_URL",
    ):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    yield tmp_path / "out"
    assert not log.exists(), f"network connections attempted: {log.read_text()}"


def wandb_records(path: Path):
    """The records of a .wandb file: the LevelDB log format (32 KiB blocks of CRC, length, type
    and payload) after a 7-byte header, each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, payload = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer: zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


def wandb_losses(out: Path, run_id: str) -> tuple[dict[int, float], dict]:
    """Loss by step over the offline runs of `run_id` (one per launch), and the run's config."""
    runs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert runs, list((out / "wandb").iterdir())
    by_step, config = {}, {}
    for path in runs:
        for r in wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in r.history.item
                }
                if "train/loss" in items:
                    by_step[r.history.step.num] = items["train/loss"]
            elif kind == "run":
                assert r.run.run_id == run_id
                config.update({u.key: json.loads(u.value_json) for u in r.run.config.update})
    return by_step, config


def mlflow_losses(out: Path, run_id: str, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's opt-in to its file store
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    history = client.get_metric_history(run_id, "train/loss")
    return {m.step: m.value for m in history}, client.get_run(run_id)


def trackio_losses(out: Path, name: str) -> dict[int, float]:
    """Through trackio's own reader, in a process of its own: trackio fixes its folder
    (TRACKIO_DIR) when first imported."""
    code = (
        "import json, sys; from trackio.sqlite_storage import SQLiteStorage; "
        "print(json.dumps(SQLiteStorage.get_logs('camelid', sys.argv[1])))"
    )
    env = {**os.environ, "TRACKIO_DIR": str(out / "trackio")}
    res = subprocess.run(
        [sys.executable, "-c", code, name], capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def tensorboard_losses(out: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def test_every_tracker_records_the_losses_of_metrics_jsonl(offline, monkeypatch):
    out = offline
    train("single", 1, out, *TINY, "--max_steps", 3, "--save_steps", 100, "--report_to", ALL)
    want = dict(enumerate(losses(out), start=1))
    assert len(want) == 3
    ids = json.loads((out / "trackers.json").read_text())
    assert set(ids) == {"wandb", "mlflow", "trackio"}

    got, config = wandb_losses(out, ids["wandb"])
    assert got == pytest.approx(want, rel=1e-12)
    assert config["learning_rate"] == 1e-3 and config["report_to"] == ALL

    got, run = mlflow_losses(out, ids["mlflow"], monkeypatch)
    assert got == pytest.approx(want, rel=1e-12)
    assert run.info.status == "FINISHED" and run.data.params["learning_rate"] == "0.001"
    assert set(run.data.metrics) >= {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
    }

    assert trackio_losses(out, ids["trackio"]) == pytest.approx(want, rel=1e-12)
    assert tensorboard_losses(out) == pytest.approx(want, rel=1e-6)  # stored as float32


def test_a_resumed_run_continues_the_same_tracker_runs(offline, monkeypatch):
    out = offline
    args = [*TINY, "--save_steps", 2, "--report_to", "wandb,mlflow,trackio"]
    train("single", 1, out, *args, "--max_steps", 2)
    first = json.loads((out / "trackers.json").read_text())
    res = train("single", 1, out, *args, "--max_steps", 3)
    assert "resumed from" in res.stdout
    ids = json.loads((out / "trackers.json").read_text())
    assert ids == first
    want = dict(enumerate(losses(out), start=1))
    assert len(want) == 3

    assert len(list((out / "wandb").glob(f"offline-run-*-{ids['wandb']}"))) == 2  # one per launch
    assert wandb_losses(out, ids["wandb"])[0] == pytest.approx(want, rel=1e-12)
    got, run = mlflow_losses(out, ids["mlflow"], monkeypatch)
    assert got == pytest.approx(want, rel=1e-12) and run.info.status == "FINISHED"
    # params stay as first logged (MLflow cannot change them); what the relaunch changed is a tag
    assert (
        run.data.params["max_steps"] == "2" and run.data.tags["resumed_at_step_2/max_steps"] == "3"
    )
    assert trackio_losses(out, ids["trackio"]) == pytest.approx(want, rel=1e-12)


def test_tracker_choice_and_a_missing_package(tmp_path, monkeypatch):
    assert tracker_names("none") == [] and tracker_names("wandb, mlflow,wandb") == [
        "wandb",
        "mlflow",
    ]
    with pytest.raises(ConfigError, match="comet"):
        tracker_names("wandb,comet")
    # a 3-step run's log as one of its ranks opens it
    opened = functools.partial(
        RunLog, total_steps=3, start_step=0, n_params=10, peak=None, config={"a": 1}
    )
    # a rank other than the main one opens no tracker and writes nothing
    log = opened(tmp_path / "other", False, world_size=2, report_to="wandb,mlflow,trackio")
    assert log.trackers == [] and not (tmp_path / "other").exists()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"--report_to mlflow: not installed; pip install mlflow"):
        opened(tmp_path / "main", True, world_size=1, report_to="tensorboard,mlflow")
    assert not (tmp_path / "main").exists()  # stopped before opening anything


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    return struct.unpack(">II", path.read_bytes()[16:24])


@pytest.mark.parametrize("rewarded", [False, True])
def test_the_curves_png_adds_a_reward_panel_for_online_rl(tmp_path, rewarded):
    log = RunLog(tmp_path, True, 3, start_step=0, n_params=10, world_size=1, peak=None)
    for step in (1, 2, 3):
        extra = {"reward": 0.1 * step, "reward_std": 0.01} if rewarded else None
        log.step(
            step, 2.0 / step, 1e-3, grad_norm=1.0, tokens=64, real_share=1.0, log=False, extra=extra
        )
    png = log.close()
    assert png == tmp_path / "loss.png"
    width, height = png_size(png)
    # 7 x 4 inches at 100 dpi for the loss alone; 12 x 4 with the reward panel beside it
    assert (width > 1000) == rewarded and 300 < height < 450
