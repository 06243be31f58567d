"""Pre-flight checks (cluster/preflight.py): everything a user can get wrong outside the spec's own
rules is one line `error: field.path: ...`, exit 2, no traceback, before Ray or any actor starts."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import yaml

from protege.cli import main
from protege.cluster import preflight
from protege.cluster.preflight import UserError
from protege.core.spec import parse_spec, set_dotted

ROOT = Path(__file__).resolve().parents[3]


# ------------------------------------------------------------------------------ helpers
def _spec(tmp_path: Path, tiny: dict, **dotted) -> Path:
    """A small GRPO job on the tiny student; keyword arguments are dotted fields, e.g.
    ``**{"models.student.path": "/nope"}``."""
    data = {
        "name": "pf",
        "steps": 1,
        "models": {"student": {"path": tiny["student"]}},
        "data": {"task": "basic_arithmetic", "size": 64},
        "rollout": {"samples_per_prompt": 2, "prompts_per_step": 2, "max_new_tokens": 8},
        "checkpoint": {"dir": str(tmp_path / "run")},
    }
    for key, value in dotted.items():
        set_dotted(data, key, value)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _one_error(err: str, field: str) -> str:
    """The whole of stderr is one line naming ``field``; returns its message."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {field}: "), err
    return lines[0][len(f"error: {field}: ") :]


@pytest.fixture
def no_start(monkeypatch):
    """Fail the test if `protege run` gets as far as the driver (which connects to Ray)."""
    stub = types.ModuleType("protege.cluster.driver")
    stub.run = lambda *a, **k: pytest.fail("the job started: a pre-flight check should have refused it")
    monkeypatch.setitem(sys.modules, "protege.cluster.driver", stub)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def _env(extra: dict | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # an in-process Ray unless asked
    return {**env, "HF_HUB_OFFLINE": "1", **(extra or {})}


def _cli(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "protege.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(env),
        timeout=timeout,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_good_spec_passes(tmp_path, tiny_models, capsys, no_start):
    code, err = _run(capsys, "run", str(_spec(tmp_path, tiny_models)), "--dry-run")
    assert code == 0 and "nothing started" in err


# ------------------------------------------------------------------------------ models
@pytest.mark.parametrize("role", ["student", "teacher", "reward_model"])
def test_missing_model_folder(tmp_path, tiny_models, capsys, no_start, role):
    spec = _spec(tmp_path, tiny_models, **{f"models.{role}.path": str(tmp_path / "nope")})
    code, err = _run(capsys, "run", str(spec), "--dry-run")
    assert code == 2
    assert "does not exist" in _one_error(err, f"models.{role}.path")


def test_folder_that_is_not_a_model(tmp_path, tiny_models, capsys, no_start):
    parent = Path(tiny_models["student"]).parent  # holds teacher/, student/, reward/
    spec = _spec(tmp_path, tiny_models, **{"models.student.path": str(parent)})
    code, err = _run(capsys, "run", str(spec), "--dry-run")
    msg = _one_error(err, "models.student.path")
    assert code == 2 and "no config.json" in msg and f"did you mean {parent / 'reward'}" in msg
    empty = tmp_path / "weightless"
    empty.mkdir()
    shutil.copy(Path(tiny_models["student"]) / "config.json", empty)
    spec = _spec(tmp_path, tiny_models, **{"models.student.path": str(empty)})
    code, err = _run(capsys, "run", str(spec), "--dry-run")
    assert code == 2 and "no weights" in _one_error(err, "models.student.path")


def test_unknown_hub_id_offline_is_one_line(tmp_path, tiny_models):
    """Today's failure was three chained HFValidationError / OSError tracebacks."""
    spec = _spec(tmp_path, tiny_models, **{"models.teacher.path": "nobody/no-such-model"})
    r = _cli("run", str(spec), "--dry-run", env={"HF_HUB_CACHE": str(tmp_path / "empty-cache")})
    assert r.returncode == 2
    assert "not in the Hugging Face cache" in _one_error(r.stderr, "models.teacher.path")


def _fake_hub_cache(cache: Path, repo: str, folder: str) -> None:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / "0123abcd")
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0123abcd")


def test_cached_hub_id_still_works(tmp_path, tiny_models):
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "tiny-org/student", tiny_models["student"])
    spec = _spec(tmp_path, tiny_models, **{"models.student.path": "tiny-org/student", "rollout.engine": "vllm"})
    env = {"HF_HUB_CACHE": str(cache)}
    r = _cli("run", str(spec), "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from protege.core.models import load_tokenizer; print(len(load_tokenizer('tiny-org/student')))",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(env),
    )
    assert r.returncode == 0 and int(r.stdout) == 512, r.stderr  # and the loaders find it by id


def test_hub_id_online_is_passed_through(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    preflight.check_model("models.student.path", "someorg/not-cached-here")  # the hub decides at load time
    with pytest.raises(UserError, match="does not exist"):  # a path is never sent to the hub
        preflight.check_model("models.student.path", str(tmp_path / "a" / "b"))


def test_tokenizer_mismatch_names_the_teacher(tmp_path, tiny_models, capsys, no_start):
    from transformers import AutoTokenizer

    other = tmp_path / "other-teacher"
    shutil.copytree(tiny_models["teacher"], other)
    tok = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    tok.add_tokens(["<only_in_teacher>"])
    tok.save_pretrained(other)
    spec = _spec(tmp_path, tiny_models, **{"algorithm.type": "opd", "models.teacher.path": str(other)})
    code, err = _run(capsys, "run", str(spec), "--dry-run")
    msg = _one_error(err, "models.teacher.path")
    assert code == 2 and "vocab sizes 512 vs 513" in msg and "<only_in_teacher>" in msg
    ok = _spec(tmp_path, tiny_models, **{"algorithm.type": "opd", "models.teacher.path": tiny_models["teacher"]})
    assert _run(capsys, "run", str(ok), "--dry-run")[0] == 0


# ------------------------------------------------------------------------------ KV cache
def test_kv_cache_minimum_is_vllms():
    # Measured with vLLM 0.32 on CPU, tiny student (2 layers x 2 x 1 KV head x 32 x fp32 = 512 B per
    # token), max_model_len 352: kv_cache_memory_bytes=262144 starts, 262143 is refused.
    assert preflight.kv_cache_needed(512, 352) == 262144
    from protege.core.models import kv_cache_bytes_per_token

    cfg = {"num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "hidden_size": 64}
    assert kv_cache_bytes_per_token(cfg, "float32") == 512 and kv_cache_bytes_per_token(cfg, "bfloat16") == 256
    assert kv_cache_bytes_per_token({**cfg, "layer_types": ["full_attention", "sliding_attention"]}, "float32") is None


def test_kv_cache_too_small(tmp_path, tiny_models, capsys, no_start):
    spec = _spec(tmp_path, tiny_models, **{"rollout.engine": "vllm", "rollout.kv_cache_gb": 0.0001})
    code, err = _run(capsys, "run", str(spec), "--dry-run")
    msg = _one_error(err, "rollout.kv_cache_gb")
    # 256 + 8 + 64 = 328 tokens: 3 blocks of 128 + vLLM's null block, x 512 B = 0.000244 GB
    assert code == 2 and "328 tokens" in msg and "at least 0.0003" in msg
    gpu = _spec(
        tmp_path, tiny_models, **{"rollout.engine": "vllm", "rollout.kv_cache_gb": 0.0001, "resources.rollout.gpus": 1}
    )
    preflight.check_kv_cache(parse_spec(yaml.safe_load(gpu.read_text())))  # a GPU engine sizes its own cache


def test_kv_cache_counts_the_teacher(tmp_path, tiny_models):
    # the teacher (4 layers x 2 x 2 heads x 32 x 4 B = 2048 B per token) gets the same budget
    spec = parse_spec(
        yaml.safe_load(
            _spec(
                tmp_path,
                tiny_models,
                **{
                    "algorithm.type": "opd",
                    "models.teacher.path": tiny_models["teacher"],
                    "rollout.engine": "vllm",
                    "rollout.kv_cache_gb": 0.0005,
                },
            ).read_text()
        )
    )
    with pytest.raises(UserError, match="at least 0.001"):
        preflight.check_kv_cache(spec)


# ------------------------------------------------------------------------------ data
def test_unknown_task_keeps_the_suggestion(tmp_path, tiny_models):
    r = _cli("run", str(_spec(tmp_path, tiny_models, **{"data.task": "basic_arithmtic"})), "--dry-run")
    assert r.returncode == 2
    assert "did you mean: basic_arithmetic" in _one_error(r.stderr, "data.task")


def test_bad_task_config(tmp_path, tiny_models, capsys, no_start):
    spec = _spec(tmp_path, tiny_models, **{"data.task_config": {"min_terms": 5, "max_terms": 1}})
    code, err = _run(capsys, "run", str(spec), "--dry-run")
    assert code == 2 and "max_terms must be >= min_terms" in _one_error(err, "data.task_config")


def _file_spec(tmp_path, tiny, path, **dotted) -> Path:
    return _spec(tmp_path, tiny, **{"data": {"path": str(path)}, **dotted})


def test_missing_data_file(tmp_path, tiny_models, capsys, no_start):
    code, err = _run(capsys, "run", str(_file_spec(tmp_path, tiny_models, tmp_path / "nope.jsonl")), "--dry-run")
    assert code == 2 and "file not found" in _one_error(err, "data.path")


def test_malformed_row_names_its_line(tmp_path, tiny_models, capsys, no_start):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer": 4}\n')
    code, err = _run(capsys, "run", str(_file_spec(tmp_path, tiny_models, rows)), "--dry-run")
    assert code == 2 and _one_error(err, "data.path").startswith(f"{rows}:2: field 'answer' must be a string")


def test_unreadable_data_file(tmp_path, tiny_models, capsys, no_start, monkeypatch):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "1+1", "answer": "2"}\n')
    real = Path.read_bytes

    def refuse(self):  # chmod 000 does not stop root
        if self == rows:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    code, err = _run(capsys, "run", str(_file_spec(tmp_path, tiny_models, rows)), "--dry-run")
    assert code == 2 and "cannot read (Permission denied)" in _one_error(err, "data.path")


def test_eval_size_follows_a_small_file(tmp_path, tiny_models, capsys, no_start):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i}+1", "answer": str(i + 1)}) + "\n" for i in range(6)))
    code, err = _run(capsys, "run", str(_file_spec(tmp_path, tiny_models, rows)), "--dry-run")
    assert code == 0, err  # data.eval_size unset: 3 of the 6 rows held out, eval.size follows
    spec = parse_spec(yaml.safe_load(_file_spec(tmp_path, tiny_models, rows).read_text()))
    preflight.for_run(spec, dry_run=True)
    assert (spec.data.eval_size, spec.eval.size) == (3, 3)
    written = _file_spec(tmp_path, tiny_models, rows, **{"data.eval_size": 6})
    code, err = _run(capsys, "run", str(written), "--dry-run")
    assert code == 2 and "leaves none to train on" in _one_error(err, "data.eval_size")
    too_many = _file_spec(tmp_path, tiny_models, rows, **{"eval.size": 5})
    code, err = _run(capsys, "run", str(too_many), "--dry-run")
    assert code == 2 and "more than the 3 questions held out of the 6" in _one_error(err, "eval.size")


def test_eval_size_counts_distinct_questions(tmp_path, tiny_models, capsys, no_start):
    """The split holds out whole questions (every copy leaves training): 8 rows, 2 questions."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i % 2}+1", "answer": str(i % 2 + 1)}) + "\n" for i in range(8)))
    spec = parse_spec(yaml.safe_load(_file_spec(tmp_path, tiny_models, rows).read_text()))
    preflight.for_run(spec, dry_run=True)
    assert (spec.data.eval_size, spec.eval.size) == (1, 1)
    written = _file_spec(tmp_path, tiny_models, rows, **{"data.eval_size": 2})
    code, err = _run(capsys, "run", str(written), "--dry-run")
    assert code == 2 and "of the 2 distinct questions" in _one_error(err, "data.eval_size")


# ------------------------------------------------------------------------------ Ray, port
def test_unreachable_ray_address_is_quick(tmp_path, tiny_models):
    port = _free_port()  # nothing listens there
    t0 = time.monotonic()
    r = _cli("run", str(_spec(tmp_path, tiny_models)), env={"RAY_ADDRESS": f"127.0.0.1:{port}"})
    assert r.returncode == 2 and time.monotonic() - t0 < 60  # ray.init retries for minutes
    assert f"cannot reach 127.0.0.1:{port}" in _one_error(r.stderr, "RAY_ADDRESS")


def test_ray_address_forms(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "no-port-here")
    with pytest.raises(UserError, match="is not HOST:PORT"):
        preflight.check_ray_address()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
            monkeypatch.setenv("RAY_ADDRESS", address)
            preflight.check_ray_address()
    # Ray itself swaps a loopback address for the node's IP; a head listening only there is reachable
    import ray._private.services as services

    monkeypatch.setattr(services, "resolve_ip_for_localhost", lambda host: "127.0.0.1")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.2:{listener.getsockname()[1]}")
        preflight.check_ray_address()
    for unset in ("", "local"):
        monkeypatch.setenv("RAY_ADDRESS", unset)
        preflight.check_ray_address()  # an in-process Ray


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_serve_port_in_use(tiny_models, capsys, busy_port, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, err = _run(capsys, "serve", tiny_models["student"], "--port", str(busy_port))
    assert code == 2 and f"127.0.0.1:{busy_port} is in use" in _one_error(err, "--port")
    code, err = _run(capsys, "serve", tiny_models["student"], "--port", str(busy_port), "--host", "192.0.2.254")
    assert code == 2 and "not an address of this machine" in _one_error(err, "--host")


def test_run_with_serving_checks_the_port_first(tmp_path, tiny_models, capsys, busy_port, no_start):
    spec = _spec(tmp_path, tiny_models, **{"serve.enabled": True, "serve.port": busy_port})
    code, err = _run(capsys, "run", str(spec))
    assert code == 2 and "is in use" in _one_error(err, "serve.port")


# ------------------------------------------------------------------------------ bucket
def _deny_fs(error: Exception):
    from fsspec.spec import AbstractFileSystem

    class DenyFS(AbstractFileSystem):
        """A bucket that refuses this machine, as S3 without credentials does."""

        protocol = "denys3"

        def _deny(self, *a, **k):
            raise error

        makedirs = pipe_file = exists = cat_file = info = _deny

    import fsspec

    fsspec.register_implementation("denys3", DenyFS, clobber=True)


def _botocore(monkeypatch):
    """botocore.exceptions, or a stand-in with its class tree where botocore is not installed (s3fs
    lets botocore's NoCredentialsError through untranslated: it is not an OSError)."""
    try:
        import botocore.exceptions as exceptions
    except ImportError:
        exceptions = types.ModuleType("botocore.exceptions")
        exceptions.BotoCoreError = type("BotoCoreError", (Exception,), {})
        exceptions.ClientError = type("ClientError", (Exception,), {})
        exceptions.NoCredentialsError = type(
            "NoCredentialsError", (exceptions.BotoCoreError,), {"__str__": lambda self: "Unable to locate credentials"}
        )
        package = types.ModuleType("botocore")
        package.exceptions = exceptions
        monkeypatch.setitem(sys.modules, "botocore", package)
        monkeypatch.setitem(sys.modules, "botocore.exceptions", exceptions)
    return exceptions


@pytest.mark.parametrize("kind", ["permission", "no-credentials"])
def test_bucket_without_credentials(tmp_path, tiny_models, capsys, no_start, monkeypatch, kind):
    error = (
        PermissionError(13, "Access Denied") if kind == "permission" else _botocore(monkeypatch).NoCredentialsError()
    )
    _deny_fs(error)
    spec = _spec(tmp_path, tiny_models, **{"checkpoint.dir": "denys3://bucket/runs/{name}"})
    for dry in ([], ["--dry-run"]):
        code, err = _run(capsys, "run", str(spec), *dry)
        msg = _one_error(err, "checkpoint.dir")
        assert code == 2 and "denys3://bucket/runs/pf" in msg and "credentials" in msg


# ------------------------------------------------------------------------------ validate, submit
def test_validate_warns_about_local_paths_but_accepts(capsys):
    code, err = _run(capsys, "validate", str(ROOT / "examples" / "grpo_tiny.yaml"))
    assert code == 0 and "is a valid grpo job" in err
    if not (ROOT / "models" / "tiny" / "student").exists():
        assert "warning: models.student.path: folder 'models/tiny/student' does not exist" in err


def test_validate_and_submit_reject_an_unknown_task(tmp_path, tiny_models, capsys):
    spec = _spec(tmp_path, tiny_models, **{"data.task": "chainsum"})
    code, err = _run(capsys, "validate", str(spec))
    assert code == 2 and "did you mean: chain_sum" in _one_error(err, "data.task")
    # port 9 (discard): a connection attempt would fail differently
    code, err = _run(capsys, "submit", str(spec), "--address", "http://127.0.0.1:9")
    assert code == 2 and "did you mean: chain_sum" in _one_error(err, "data.task")
