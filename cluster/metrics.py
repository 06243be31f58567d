"""Per-run metrics: JSONL (one line per step), TensorBoard events, and a PNG of the curves."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsWriter:
    def __init__(self, run_dir: Path, *, resume: bool = False):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if not resume and self.path.exists():
            self.path.unlink()
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"))
        except Exception:  # TensorBoard missing: JSONL and the plot still work
            self._tb = None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines of steps after the checkpoint (they will be redone)."""
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_curves(run_dir: Path, out: Path | None = None) -> Path | None:
    """reward/mean and eval/accuracy against step, saved as PNG."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(path)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, a, title in (("reward/mean", ax[0], "train reward (mean)"), ("eval/accuracy", ax[1], "held-out accuracy (greedy)")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        a.set_title(title)
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = out or run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
