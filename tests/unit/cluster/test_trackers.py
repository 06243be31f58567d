"""metrics.loggers (cluster/trackers.py) in the trackers' offline modes, the validate-time check for
a missing package, and curves.png's smoothed line and eval points (cluster/metrics.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from protege.cluster import trackers
from protege.cluster.metrics import MetricsWriter, curves_figure, ema, plot_curves
from protege.cluster.preflight import UserError
from protege.core.spec import parse_spec

ROOT = Path(__file__).resolve().parents[3]
SECRET = "wandb-secret-0123456789abcdef0123456789abcdef"


def spec(**metrics):
    return parse_spec(
        {
            "name": "trk",
            "models": {"student": {"path": "/m"}},
            "data": {"task": "basic_arithmetic", "size": 64},
            "metrics": metrics,
        }
    )


ROWS = [{"step": s, "reward/mean": 0.1 * (s % 3) + 0.02 * s, "loss/total": 1.0 / (s + 1)} for s in range(1, 21)]
for r in ROWS[4::5]:
    r["eval/accuracy"] = r["step"] / 40


def _write(run_dir: Path, sp, rows=ROWS, resume=False) -> None:
    w = MetricsWriter(run_dir, spec=sp, resume=resume)
    for r in rows:
        w.write(r["step"], {k: v for k, v in r.items() if k != "step"})
    w.close()


def _no_secret_under(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def test_default_is_tensorboard_and_jsonl(tmp_path):
    sp = spec()
    assert sp.metrics.loggers == ["tensorboard"]
    trackers.check_loggers(sp)
    _write(tmp_path, sp)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 20
    assert any((tmp_path / "tb").iterdir())
    _write(tmp_path / "none", spec(loggers=[]))
    assert not (tmp_path / "none" / "tb").exists()


def test_wandb_offline_writes_a_local_run_and_no_secret(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_SILENT", "true")
    sp = spec(loggers=["tensorboard", "wandb"], project="protege-test", run_name="trk-run")
    trackers.check_loggers(sp)
    _write(tmp_path, sp)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    run_id = json.loads((tmp_path / trackers.IDS_FILE).read_text())["wandb"]
    assert runs[0].name.endswith(run_id)
    _no_secret_under(tmp_path)


def test_mlflow_file_store_gets_metrics_params_and_resumes(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)  # never sent anywhere by the MLflow tracker either
    uri = (tmp_path / "mlruns").as_uri()
    sp = spec(loggers=["mlflow"], project="protege-test", tracking_uri=uri)
    trackers.check_loggers(sp)
    _write(tmp_path / "run", sp, ROWS[:10])
    _write(tmp_path / "run", sp, ROWS[10:], resume=True)  # the same MLflow run continues
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("protege-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "trk" and run.info.status == "FINISHED"
    assert run.data.params["algorithm.type"] == "grpo" and run.data.params["name"] == "trk"
    history = client.get_metric_history(run.info.run_id, "reward/mean")
    assert [m.step for m in history] == list(range(1, 21))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/accuracy")] == [5, 10, 15, 20]
    _no_secret_under(tmp_path)


def test_missing_logger_package_is_one_line_at_validate(tmp_path, monkeypatch):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(
        UserError,
        match=r"^metrics.loggers: 'wandb' needs a package that is not installed here: "
        r"pip install 'protege\[trackers\]'",
    ):
        trackers.check_loggers(spec(loggers=["tensorboard", "wandb"]))
    trackers.check_loggers(spec(loggers=["tensorboard", "mlflow"]))

    # `protege validate` in a Python where wandb cannot be imported: exit 2, one line, no traceback
    path = tmp_path / "s.json"
    path.write_text(
        json.dumps(
            {
                "name": "v",
                "models": {"student": {"path": "/m"}},
                "data": {"task": "basic_arithmetic", "size": 64},
                "metrics": {"loggers": ["wandb"]},
            }
        )
    )
    code = (
        "import sys; sys.modules['wandb'] = None; import importlib.util as u; f = u.find_spec; "
        "u.find_spec = lambda n, *a: None if n == 'wandb' else f(n, *a); "
        "from protege.cli import main; sys.exit(main(['validate', sys.argv[1]]))"
    )
    p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 2, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [ln for ln in p.stderr.splitlines() if "metrics.loggers" in ln] and len(errors) == 1
    assert "Traceback" not in p.stderr


def test_unknown_or_repeated_logger_is_a_field_error():
    from protege.core.spec import SpecError

    with pytest.raises(SpecError) as err:
        spec(loggers=["wandb", "neptune"])
    assert err.value.errors[0][0].startswith("metrics.loggers")
    with pytest.raises(SpecError, match="repeated: mlflow"):
        spec(loggers=["mlflow", "mlflow"])


def test_ema_is_debiased_and_smooth():
    assert ema([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])  # no pull towards 0 at the start
    noisy = [(-1) ** i for i in range(100)]
    smooth = ema(noisy)
    assert max(abs(v) for v in smooth[20:]) < 0.2 and ema([5.0], span=3) == [5.0]


def test_curves_have_raw_smoothed_and_eval(tmp_path):
    import matplotlib.pyplot as plt

    fig = curves_figure(ROWS, "trk")
    left, right, acc = fig.axes
    raw, smooth = left.lines
    assert raw.get_alpha() < smooth.get_alpha() and raw.get_linewidth() < smooth.get_linewidth()
    assert list(raw.get_ydata()) == [r["reward/mean"] for r in ROWS]
    assert list(smooth.get_ydata()) == pytest.approx(ema([r["reward/mean"] for r in ROWS]))
    (eval_line,) = acc.lines
    assert list(eval_line.get_xdata()) == [5, 10, 15, 20] and eval_line.get_marker() == "o"
    assert len(right.lines) == 2
    plt.close(fig)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = plot_curves(tmp_path)
    assert out == tmp_path / "curves.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
