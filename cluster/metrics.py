"""Per-run metrics: JSONL (one line per step), the trackers of ``metrics.loggers`` (TensorBoard
by default, W&B, MLflow: cluster/trackers.py), and a PNG of the curves."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsWriter:
    def __init__(self, run_dir: Path, *, resume: bool = False, spec=None):
        from protege.cluster.trackers import open_trackers

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if not resume and self.path.exists():
            self.path.unlink()
        # spec None: TensorBoard only (what every run had before metrics.loggers)
        self._trackers = open_trackers(self.run_dir, spec, resume=resume)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        for t in self._trackers:
            t.log(step, clean)

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines of steps after the checkpoint (they will be redone)."""
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def close(self) -> None:
        for t in self._trackers:
            t.close()
        self._trackers = []


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def ema(values: list[float], span: int | None = None) -> list[float]:
    """Exponential moving average, debiased like TensorBoard's smoothing (the first points are not
    pulled towards 0). ``span`` defaults to a tenth of the run, so 20 steps and 2000 steps both get
    a line that follows the trend without the per-batch noise."""
    span = span or max(1, len(values) // 10)
    alpha = 2.0 / (span + 1)
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def _raw_and_smoothed(a, pts: list[tuple[int, float]], color: str, label: str) -> None:
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    a.plot(xs, ys, color=color, alpha=0.3, linewidth=1, label=f"{label} (raw)")
    a.plot(xs, ema(ys), color=color, alpha=1.0, linewidth=2.2, label=f"{label} (smoothed)")


def curves_figure(rows: list[dict], title: str = ""):
    """Left: train reward, raw (faint) and smoothed (bold), with held-out accuracy (eval/accuracy,
    the points where the run evaluated) on a right-hand 0-1 axis. Right: the loss, raw and smoothed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    reward = [(r["step"], r["reward/mean"]) for r in rows if "reward/mean" in r]
    if reward:
        _raw_and_smoothed(left, reward, "tab:blue", "reward/mean")
    left.set_title("train reward and held-out accuracy")
    left.set_xlabel("step")
    left.set_ylabel("reward (mean)")
    acc = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    handles, labels = left.get_legend_handles_labels()
    if acc:
        ax2 = left.twinx()
        ax2.plot(
            [p[0] for p in acc],
            [p[1] for p in acc],
            color="tab:orange",
            marker="o",
            linewidth=1.5,
            label="eval/accuracy (greedy)",
        )
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("held-out accuracy")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        left.legend(handles, labels, fontsize=7, loc="lower right")
    loss = [(r["step"], r["loss/total"]) for r in rows if "loss/total" in r]
    if loss:
        _raw_and_smoothed(right, loss, "tab:green", "loss/total")
        right.legend(fontsize=7)
    right.set_title("loss")
    right.set_xlabel("step")
    for a in (left, right):
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(run_dir: Path, out: Path | None = None) -> Path | None:
    """curves.png: see :func:`curves_figure`."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    fig = curves_figure(read_metrics(path), run_dir.name)  # selects the Agg backend first
    import matplotlib.pyplot as plt

    out = out or run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
