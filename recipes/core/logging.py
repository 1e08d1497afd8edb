"""Run output: a progress bar, log lines with loss / lr / tokens/s / MFU, a metrics.jsonl that
resumed runs append to, TensorBoard events, and a loss-curve PNG at the end."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

# Dense bf16 peak per GPU (vendor datasheets), for the MFU estimate.
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "A10G": 125.0,
    "L4": 121.0,
    "4090": 165.0,
}


def peak_flops(override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None  # CPU: no meaningful peak, MFU is not printed


class RunLog:
    def __init__(self, output_dir: Path, main: bool, total_steps: int, start_step: int, n_params: int,
                 world_size: int, peak: float | None, tensorboard: bool):  # fmt: skip
        self.main, self.n_params, self.world, self.peak = main, n_params, world_size, peak
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer, self.bar = None, None
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
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            if (
                self.path.exists()
            ):  # a resumed run keeps the steps it already logged, drops later ones
                rows = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
                self.path.write_text(
                    "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= start_step)
                )
        self._t = time.perf_counter()

    def step(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float,
        tokens: int,
        real_share: float,
        log: bool,
    ) -> dict:
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
               "tokens_per_s": tokens / dt, "real_token_share": real_share, "step_s": dt}  # fmt: skip
        if self.peak:
            row["mfu"] = 6 * self.n_params * tokens / dt / (self.peak * self.world)
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.writer:
                for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
                    if k in row:
                        self.writer.add_scalar(f"train/{k}", row[k], step)
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if log:
                mfu = f"  mfu {row['mfu']:.1%}" if "mfu" in row else ""
                self.bar.write(f"step {step:>6}  loss {loss:.4f}  lr {lr:.3e}  grad_norm {grad_norm:.3f}  "
                               f"tok/s {row['tokens_per_s']:,.0f}{mfu}")  # fmt: skip
        return row

    def close(self) -> Path | None:
        if not self.main:
            return None
        self.bar.close()
        if self.writer:
            self.writer.close()
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

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
        ax.set(xlabel="step", ylabel="loss", title="training loss")
        ax.grid(alpha=0.3)
        png = self.path.with_name("loss.png")
        fig.savefig(png, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return png


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
