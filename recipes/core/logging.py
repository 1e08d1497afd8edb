"""Run output: a progress bar, log lines with loss / lr / tokens/s / MFU, a metrics.jsonl that
resumed runs append to, a loss-curve PNG at the end, and the same scalars in the experiment
trackers chosen with --report_to (tensorboard, wandb, mlflow, trackio; any combination).

Each tracker goes through its own library, imported only when chosen, on the main rank only, and
stays local unless the environment names a server: wandb offline (unless WANDB_MODE or an API key
says otherwise) under OUT/wandb, MLflow's file store OUT/mlruns (unless MLFLOW_TRACKING_URI),
trackio's SQLite database under OUT/trackio (unless TRACKIO_DIR). The run config goes in as the
run's config / params. A resumed run continues the tracker runs it started: their ids are kept in
OUT/trackers.json."""

from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import json
import os
import resource
import sys
import time
import uuid
from pathlib import Path

import torch

from .config import ConfigError

# Dense bf16 peak per GPU (vendor datasheets), for the MFU estimate.
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "A10G": 125.0,
    "L4": 121.0,
    "4090": 165.0,
}

SCALARS = (
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mfu",
)  # what the trackers get, as train/<name>
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "trackio": "trackio",
}
# wandb project, MLflow experiment and trackio project unless the environment names one
PROJECT = "camelid"


def progress(iterable, desc: str, total: int | None = None, *, main: bool = True):
    """A progress bar for a long phase, on a terminal only (logs get the phase's summary
    line from its caller), on the main rank only."""
    from tqdm import tqdm

    return tqdm(
        iterable,
        desc=desc,
        total=total,
        disable=None if main else True,
        leave=False,
        dynamic_ncols=True,
    )


def took(seconds: float) -> str:
    """A duration as people read it: 0.4 s, 12 s, 3m05s, 1h02m."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return (
        f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs} s"
    )


def peak_flops(override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None  # CPU: no meaningful peak, MFU is not printed


def tracker_names(report_to: str | list[str] | None) -> list[str]:
    """`--report_to` ("wandb,mlflow", "none", or a list) as the list of trackers to open."""
    items = report_to.split(",") if isinstance(report_to, str) else list(report_to or [])
    names = [t.strip() for t in items if t.strip() and t.strip() != "none"]
    unknown = [t for t in names if t not in TRACKER_PACKAGES]
    if unknown:
        raise ConfigError(
            f"report_to: unknown tracker(s) {', '.join(unknown)}; "
            f"choose from {', '.join(TRACKER_PACKAGES)} or none"
        )
    return list(dict.fromkeys(names))


def repair_metrics(path: Path, start_step: int) -> None:
    """A resumed run keeps the rows it already logged up to its step and drops the rest, and a
    torn last line (a kill mid-write): by truncating the file where they start, never by
    rewriting it, so no kill at any moment can empty the history."""
    if not path.exists():
        return
    keep = 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                row = json.loads(raw)
                fine = raw.endswith(b"\n") and row["step"] <= start_step
            except (ValueError, KeyError, TypeError):
                fine = False
            if not fine:
                break
            keep += len(raw)
    if keep != path.stat().st_size:
        os.truncate(path, keep)


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to `url`'s host and port opens within `timeout` seconds."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def check_trackers(report_to) -> None:
    """Trackers that would talk to a server that cannot be reached fail now, in one line,
    instead of retrying for minutes mid-run: wandb with an API key (online), MLflow with a
    remote tracking URI."""
    names = tracker_names(report_to)
    if "wandb" in names and wandb_online():
        url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        if not reachable(url):
            raise ConfigError(
                f"--report_to wandb: an API key is set but {url} cannot be reached; "
                "set WANDB_MODE=offline to log locally (wandb sync uploads it "
                "later), or leave wandb out of --report_to"
            )
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if "mlflow" in names and uri.startswith(("http://", "https://")) and not reachable(uri):
        raise ConfigError(
            f"--report_to mlflow: MLFLOW_TRACKING_URI {uri} cannot be reached; "
            "unset it to log to OUT/mlruns, or leave mlflow out of --report_to"
        )


def wandb_online() -> bool:
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "disabled", "dryrun"):
        return False
    return mode == "online" or wandb_has_key()


class RunLog:
    """`report_to`: the trackers (as --report_to gives them); `config`: the run's config (a
    dataclass or dict), logged as the tracker runs' config / params."""

    def __init__(
        self,
        folder,
        main: bool,
        total_steps: int,
        *,
        start_step: int,
        n_params: int,
        world_size: int,
        peak: float | None,
        report_to: str | list[str] = "none",
        config=None,
    ):
        from .run_folder import RunFolder

        folder = folder if isinstance(folder, RunFolder) else RunFolder(Path(folder))
        self.main, self.n_params, self.world, self.peak = main, n_params, world_size, peak
        self.path = folder.metrics
        self.bar, self.trackers = None, []
        names = tracker_names(report_to)
        missing = [n for n in names if importlib.util.find_spec(TRACKER_PACKAGES[n]) is None]
        if missing:  # every rank stops here, before any tracker opens
            raise ConfigError(
                f"--report_to {','.join(missing)}: not installed; pip install "
                f"{' '.join(TRACKER_PACKAGES[n] for n in missing)} (or camelid[tracking])"
            )
        if main:
            from tqdm import tqdm

            self.path.parent.mkdir(parents=True, exist_ok=True)
            # disable=None: no bar when the output is not a terminal (CI logs keep the log lines)
            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="train",
                dynamic_ncols=True,
                disable=None,
            )
            repair_metrics(self.path, start_step)
            if dataclasses.is_dataclass(config):  # the run's TrainConfig
                config = dataclasses.asdict(config)
            self.trackers = open_trackers(
                folder.root, names, dict(config or {}), start_step=start_step
            )
            atexit.register(self._close_trackers, False)  # a run that stops early still closes them
        self._t = time.perf_counter()

    def step(
        self,
        step: int,
        loss: float,
        lr: float,
        *,
        grad_norm: float,
        tokens: int,
        real_share: float,
        log: bool,
        extra: dict | None = None,
    ) -> dict:
        """One step's row; `extra`: the recipe's own statistics (DPO's rewards), logged alike."""
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        row = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "tokens_per_s": tokens / dt,
            "real_token_share": real_share,
            "step_s": dt,
        }
        if self.peak:
            row["mfu"] = 6 * self.n_params * tokens / dt / (self.peak * self.world)
        row.update(extra or {})
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            scalars = {f"train/{k}": float(row[k]) for k in (*SCALARS, *(extra or {})) if k in row}
            for tracker in self.trackers:
                tracker.log(scalars, step)
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if log:
                mfu = f"  mfu {row['mfu']:.1%}" if "mfu" in row else ""
                more = "".join(f"  {k.split('/')[-1]} {v:.4f}" for k, v in (extra or {}).items())
                self.bar.write(
                    f"step {step:>6}  loss {loss:.4f}  lr {lr:.3e}  grad_norm {grad_norm:.3f}  "
                    f"tok/s {row['tokens_per_s']:,.0f}{mfu}{more}"
                )
        return row

    def _close_trackers(self, ok: bool) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(ok)

    def close(self) -> Path | None:
        if not self.main:
            return None
        self.bar.close()
        self._close_trackers(True)
        atexit.unregister(self._close_trackers)
        rows = (
            [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
            if self.path.exists()
            else []
        )
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in rows]
        # online RL (grpo, rloo) logs the mean reward of each step's samples: its curve is the
        # one that says whether the run learns, so it gets a panel beside the loss
        panels = [("loss", "training loss")]
        if all("reward" in r for r in rows):
            panels.append(("reward", "mean reward of the samples"))
        fig, axes = plt.subplots(1, len(panels), figsize=(2 + 5 * len(panels), 4), squeeze=False)
        for ax, (key, title) in zip(axes[0], panels):
            values = [r[key] for r in rows]
            ax.plot(steps, values, alpha=0.5 if key == "reward" else 1.0)
            if key == "reward" and len(values) >= 10:  # a few samples a step: noisy, so a trend
                window = len(values) // 8
                trend = [sum(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
                trend = [t / min(i + 1, window) for i, t in enumerate(trend)]
                ax.plot(steps, trend, label=f"mean of the last {window} steps")
                ax.legend()
            ax.set(xlabel="step", ylabel=key, title=title)
            ax.grid(alpha=0.3)
        png = self.path.with_name("loss.png")
        fig.savefig(png, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return png


def open_trackers(out: Path, names: list[str], config: dict, *, start_step: int) -> list:
    """The chosen trackers, continuing the runs recorded in OUT/trackers.json when this run
    resumes (start_step > 0); a run from step 0 starts new ones."""
    ids_file = out / "trackers.json"
    old = json.loads(ids_file.read_text()) if start_step > 0 and ids_file.exists() else {}
    kinds = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": MLflow, "trackio": Trackio}
    trackers = [kinds[n](out, config, old.get(n), start_step=start_step) for n in names]
    ids = {n: t.run_id for n, t in zip(names, trackers) if t.run_id}
    if ids:
        ids_file.write_text(json.dumps({**old, **ids}, indent=1) + "\n")
    return trackers


class TensorBoard:
    def __init__(self, out: Path, config: dict, run_id: str | None, *, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.run_id, self.writer = None, SummaryWriter(str(out / "tensorboard"))

    def log(self, scalars: dict, step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def close(self, ok: bool) -> None:
        self.writer.close()


def wandb_has_key() -> bool:
    """An API key in the environment or in ~/.netrc (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return bool(netrc.netrc().authenticators(host))
    except (OSError, netrc.NetrcParseError):
        return False


class Wandb:
    """Offline unless WANDB_MODE or an API key says otherwise (`wandb sync OUT/wandb/offline-run-*`
    uploads an offline run later); a resumed run continues the same run id."""

    def __init__(self, out: Path, config: dict, run_id: str | None, *, start_step: int):
        import wandb

        online = wandb_online()
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT),
            name=os.environ.get("WANDB_NAME", out.name),
            id=run_id,
            resume="allow",
            dir=str(out),
            config=config,
            mode=None if online else "offline",
        )
        self.run_id = self.run.id

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class MLflow:
    """A file store under OUT/mlruns unless MLFLOW_TRACKING_URI names one; a resumed run continues
    the same MLflow run. Params are the config; a value a resume changed goes in as a tag."""

    def __init__(self, out: Path, config: dict, run_id: str | None, *, start_step: int):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (out / "mlruns").resolve().as_uri()
            # MLflow 3 keeps the file store but asks for this opt-in (its database store needs
            # SQLAlchemy)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        self.client, run = MlflowClient(tracking_uri=uri), None
        if run_id:
            try:
                run = self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
            except MlflowException:
                run = None
        if run is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = (
                experiment.experiment_id if experiment else self.client.create_experiment(name)
            )
            run = self.client.create_run(experiment_id, run_name=out.name)
        self.run_id = run.info.run_id
        logged = run.data.params
        params = {k: str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in config.items()}
        entries = [Param(k, v) for k, v in params.items() if k not in logged]
        entries += [
            RunTag(f"resumed_at_step_{start_step}/{k}", v)
            for k, v in params.items()
            if k in logged and logged[k] != v
        ]
        for i in range(0, len(entries), MAX_PARAMS_TAGS_PER_BATCH):
            batch = entries[i : i + MAX_PARAMS_TAGS_PER_BATCH]
            self.client.log_batch(
                self.run_id,
                params=[e for e in batch if isinstance(e, Param)],
                tags=[e for e in batch if isinstance(e, RunTag)],
            )

    def log(self, scalars: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()]
        )

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "KILLED")


class Trackio:
    """trackio's local SQLite database, in OUT/trackio unless TRACKIO_DIR names another folder;
    a resumed run continues the run of the same name."""

    def __init__(self, out: Path, config: dict, run_id: str | None, *, start_step: int):
        # trackio reads TRACKIO_DIR once, when it is first imported
        user_dir = os.environ.get("TRACKIO_DIR")
        wanted = user_dir or str((out / "trackio").resolve())
        os.environ["TRACKIO_DIR"] = wanted
        try:
            import trackio
            from trackio.utils import TRACKIO_DIR
        finally:
            if user_dir is None:
                del os.environ["TRACKIO_DIR"]

        if Path(TRACKIO_DIR) != Path(wanted):
            print(
                f"warning: trackio was imported earlier in this process and logs to {TRACKIO_DIR}",
                file=sys.stderr,
            )
        self.run = trackio.init(
            project=PROJECT,
            name=run_id or f"{out.name}-{uuid.uuid4().hex[:6]}",
            resume="allow",
            config=config,
            embed=False,
        )
        self.run_id = self.run.name

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self, ok: bool) -> None:
        self.run.finish()


class PhasePeaks:
    """Peak memory of this process per phase: load (model built, weights in place), setup
    (engine, optimizer states, resume), train, export. Peak RSS, reset between phases through
    /proc/self/clear_refs (Linux), and on GPUs peak allocated memory."""

    def __init__(self):
        self.peaks, self.phase = {}, "load"

    @staticmethod
    def _rss_peak_mb() -> float:
        try:
            with open("/proc/self/status") as f:
                return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def next(self, phase: str) -> None:
        """Close the current phase and start `phase`."""
        peak = {"rss_mb": round(self._rss_peak_mb(), 1)}
        if torch.cuda.is_available():
            peak["gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            torch.cuda.reset_peak_memory_stats()
        self.peaks[self.phase] = peak
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        self.phase = phase


PHASES = PhasePeaks()  # this process's
