"""The student endpoint (serve/): versions, request validation, the plain StudentGenerator on the HF
engine. The real Ray Serve app with the vLLM engine is in tests/integration/test_serve.py."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from protege.core import checkpoints
from protege.core.spec import AutoscaleSpec, ServeSpec
from protege.serve import versions
from protege.serve.api import ApiError, ChatCompletionRequest, CompletionRequest, ServeArgs

KEY = "test-key-123"


def publish(run_dir: Path, step: int, version: int, src: str | Path, *, noise: float = 0.0, keep: int = 10) -> Path:
    """A complete checkpoint of ``src`` (optionally with perturbed weights), written the driver's way."""
    tmp = checkpoints.tmp_dir(run_dir, step)
    shutil.copytree(src, tmp / "model")
    if noise:
        import torch
        from safetensors.torch import load_file, save_file

        f = tmp / "model" / "model.safetensors"
        g = torch.Generator().manual_seed(step)
        w = {k: v + noise * torch.randn(v.shape, generator=g) for k, v in load_file(f).items()}
        save_file(w, f, metadata={"format": "pt"})
    return checkpoints.commit(tmp, {"step": step, "version": version}, keep=keep)


def fake_run(tmp_path: Path, steps: list[tuple[int, int]]) -> Path:
    run = tmp_path / "run"
    for step, version in steps:
        tmp = checkpoints.tmp_dir(run, step)
        (tmp / "model").mkdir()
        (tmp / "model" / "config.json").write_text("{}")
        checkpoints.commit(tmp, {"step": step, "version": version}, keep=10)
    return run


# ------------------------------------------------------------------------------------- versions
def test_versions_follow_newest_pin_and_rollback(tmp_path):
    run = fake_run(tmp_path, [(10, 1), (20, 2), (30, 3)])
    (run / "checkpoints" / ".tmp-step_000040-1").mkdir()  # half-written: never published
    assert [v.number for v in versions.list_versions(run)] == [1, 2, 3]
    t = versions.resolve(run)
    assert (t.version.number, t.version.step, t.run_dir) == (3, 30, run)
    assert t.version.model_path == run / "checkpoints" / "step_000030" / "model"

    assert versions.rollback(run) == (3, 2)
    assert versions.read_pin(run) == 2 and versions.current(run).number == 2
    assert versions.rollback(run) == (2, 1)
    with pytest.raises(ValueError, match="no published version before 1"):
        versions.rollback(run)
    assert versions.rollback(run, to=3) == (1, 3)
    with pytest.raises(ValueError, match="version 7 is not published"):
        versions.rollback(run, to=7)
    versions.write_pin(run, None)
    assert versions.read_pin(run) is None and versions.current(run).number == 3

    versions.write_pin(run, 9)  # a pin to a pruned version: servers keep what they serve
    assert versions.current(run) is None
    with pytest.raises(ValueError, match="pins version 9"):
        versions.resolve(run)


def test_resolve_checkpoint_and_model_folder(tmp_path):
    run = fake_run(tmp_path, [(5, 4)])
    ckpt = run / "checkpoints" / "step_000005"
    assert versions.resolve(ckpt) == versions.Target(versions.Version(4, 5, ckpt / "model"), None)
    assert versions.resolve(ckpt / "model").version.number == 4
    plain = tmp_path / "hf"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert versions.resolve(plain) == versions.Target(versions.Version(0, None, plain), None)
    with pytest.raises(ValueError, match="not a run dir"):
        versions.resolve(tmp_path / "nothing")
    with pytest.raises(ValueError, match="no complete checkpoint yet"):
        (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
        versions.resolve(tmp_path / "empty")


# ------------------------------------------------------------------------------------- api / app args
def test_requests_validate_with_field_names():
    from pydantic import ValidationError

    from protege.serve.api import validation_error

    ok = CompletionRequest(model="m", prompt="hi", stop="\n")
    assert ok.stop == ["\n"] and ok.max_tokens == 16
    # vLLM's layer implements batched prompts and logit_bias (once refused here as unsupported).
    assert CompletionRequest(model="m", prompt=["a", "b"], logit_bias={"5": 1.0}).prompt == ["a", "b"]
    for bad, field in [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logit_bias_typo": {}}, "logit_bias_typo"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", ""]}, "prompt"),
        ({"stop": ["a"] * 5}, "stop"),
        # vLLM-internal fields are a trusted router's, not a client's
        ({"request_id": "x"}, "request_id"),
        ({"kv_transfer_params": {}}, "kv_transfer_params"),
    ]:
        with pytest.raises(ValidationError) as exc:
            CompletionRequest.model_validate({"model": "m", "prompt": "hi", **bad})
        err = validation_error(exc.value)
        assert err.status == 400 and err.message.startswith(f"{field}:"), err.message
        assert err.body()["error"]["param"] == field
    with pytest.raises(ValidationError, match="not both"):
        ChatCompletionRequest(
            model="m", messages=[{"role": "user", "content": "x"}], max_tokens=2, max_completion_tokens=3
        )


def test_api_key_rules_and_deployment_options(monkeypatch):
    from protege.serve.app import api_key_hash, deployment_options, is_loopback

    monkeypatch.delenv("PROTEGE_API_KEY", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")
    assert api_key_hash(ServeSpec()) is None  # localhost without a key: open
    with pytest.raises(ValueError, match="set PROTEGE_API_KEY"):
        api_key_hash(ServeSpec(host="0.0.0.0"))
    monkeypatch.setenv("PROTEGE_API_KEY", KEY)
    assert api_key_hash(ServeSpec()) == api_key_hash(ServeSpec(host="0.0.0.0")) != KEY

    spec = ServeSpec(
        max_concurrent=6, autoscale=AutoscaleSpec(min_replicas=0, max_replicas=3, target_ongoing_requests=2)
    )
    opts = deployment_options(ServeArgs(target="x", serve=spec))
    assert opts["autoscaling_config"] == {
        "min_replicas": 0,
        "initial_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 2,
        "upscale_delay_s": 30,
        "downscale_delay_s": 600,
    }
    assert opts["max_queued_requests"] == 6 and opts["max_ongoing_requests"] > 6


def test_replica_log_handlers_survive_engine_start(tmp_path):
    """Building a vLLM engine ran logging.config.dictConfig, which closes every handler: Serve's buffered
    replica log then held each request's access record in memory for good (the soak's replica growth)."""
    import logging.handlers

    from protege.serve.app import deployment_options, serve_log_handlers_kept

    env = deployment_options(ServeArgs(target="x"))["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env["VLLM_CONFIGURE_LOGGING"] == "0"  # vLLM leaves the replica's logging alone
    assert env["VLLM_LOGGING_CONFIG_PATH"] == ""  # and an inherited config file cannot make it refuse to start

    logger = logging.getLogger("protege-test.replica")
    logger.propagate, logger.level = False, logging.INFO
    target = logging.FileHandler(tmp_path / "replica.log")
    handler = logging.handlers.MemoryHandler(capacity=1, target=target, flushLevel=logging.ERROR)
    logger.addHandler(handler)
    try:
        with serve_log_handlers_kept("protege-test.replica"):
            handler.close()  # what dictConfig does to every existing handler
            assert handler.target is None
        for i in range(100):
            logger.info("POST /v1/completions 200 %d", i)
        assert handler.buffer == []  # nothing held back in memory
        assert (tmp_path / "replica.log").read_text().count("POST /v1/completions") == 100
    finally:
        logger.removeHandler(handler)
        target.close()


def test_cli_pin_rollback_versions(tmp_path, capsys):
    import argparse

    from protege.serve.cli import register

    run = fake_run(tmp_path, [(1, 1), (2, 2)])
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))

    def cli(*argv):
        args = parser.parse_args(["serve", *argv])
        return args.fn(args)

    assert cli("rollback", str(run)) == 0 and versions.read_pin(run) == 1
    assert cli("pin", str(run), "latest") == 0 and versions.read_pin(run) is None
    assert cli("pin", str(run), "5") == 2
    assert cli("versions", str(run)) == 0
    assert "version      2  step      2" in capsys.readouterr().out
    assert cli(str(tmp_path / "nothing")) == 2


# ------------------------------------------------------------------------------------- StudentGenerator (HF engine)
@pytest.fixture(scope="module")
def hf_run(tiny_models, tmp_path_factory):
    run = tmp_path_factory.mktemp("hfrun")
    publish(run, 1, 1, tiny_models["student"])
    return run


def _hf_gen(run, **kw):
    from protege.serve.generator import StudentGenerator

    return StudentGenerator(
        versions.resolve(run).version, model_name="student", engine="hf", max_tokens=32, max_model_len=256, **kw
    )


def test_generator_requests_limits_and_overload(hf_run):
    gen = _hf_gen(hf_run, max_concurrent=1)

    async def main():
        r = await gen.complete(CompletionRequest(model="student", prompt="1 + 1 =", max_tokens=8, temperature=0))
        assert r.system_fingerprint == "protege-v1" and r.usage.completion_tokens <= 8 and r.choices[0].finish_reason
        chat = ChatCompletionRequest(
            model="student", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, n=2
        )
        c = await gen.chat(chat)
        assert [ch.index for ch in c.choices] == [0, 1] and c.choices[0].message.content == c.choices[1].message.content
        events = [e async for e in gen.stream_chat(chat.model_copy(update={"n": 1}))]
        assert events[-1] == "data: [DONE]\n\n"
        first = json.loads(events[0][6:])
        assert first["choices"][0]["delta"]["role"] == "assistant"
        assert (
            "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1])
            == c.choices[0].message.content
        )

        for req, field in [
            (CompletionRequest(model="student", prompt="x", max_tokens=33), "max_tokens"),
            (CompletionRequest(model="student", prompt="x", n=5), "n"),
            (CompletionRequest(model="student", prompt="x " * 300), "prompt"),
            (CompletionRequest(model="student", prompt=[10**6]), "prompt"),
            (CompletionRequest(model="other", prompt="x"), "model"),
        ]:
            with pytest.raises(ApiError) as exc:
                await gen.complete(req)
            assert exc.value.param == field and exc.value.status in (400, 404), exc.value.message

        held = gen.stream_completion(CompletionRequest(model="student", prompt="x", max_tokens=4))  # holds the slot
        with pytest.raises(ApiError) as exc:
            await gen.complete(CompletionRequest(model="student", prompt="x"))
        assert exc.value.status == 503 and "overloaded" in exc.value.message
        assert [e async for e in held][-1] == "data: [DONE]\n\n"  # finishing the stream frees the slot
        del held
        assert gen.admitted == 0
        assert (await gen.complete(CompletionRequest(model="student", prompt="x", max_tokens=2))).choices

    asyncio.run(main())
    gen.close()


def test_generator_switches_versions_without_failing_requests(hf_run, tiny_models, tmp_path):
    run = tmp_path / "run"
    publish(run, 1, 1, tiny_models["student"])
    gen = _hf_gen(run, max_concurrent=64)
    req = CompletionRequest(model="student", prompt="7 * 6 =", max_tokens=12, temperature=0)

    async def main():
        before = (await gen.complete(req)).choices[0].text
        publish(run, 2, 2, tiny_models["student"], noise=0.5)
        calls = [gen.complete(req) for _ in range(12)]
        switch = gen.load_version(versions.current(run))
        results = await asyncio.gather(*calls[:6], switch, *calls[6:])
        outs = [r for r in results if not isinstance(r, dict)]
        assert {r.system_fingerprint for r in outs} <= {"protege-v1", "protege-v2"}
        assert gen.models().data[0].version == 2
        after = (await gen.complete(req)).choices[0].text
        assert after != before  # the new weights answer
        # A different architecture (the teacher) cannot be loaded in place: a fresh engine takes over.
        publish(run, 3, 3, tiny_models["teacher"])
        assert (await gen.load_version(versions.current(run)))["version"] == 3
        assert (await gen.complete(req)).system_fingerprint == "protege-v3"
        versions.rollback(run, to=1)
        await gen.load_version(versions.current(run))
        assert (await gen.complete(req)).choices[0].text == before
        # keep=1 prunes every older checkpoint, the served one included: the switch must not need it.
        versions.write_pin(run, None)
        publish(run, 4, 4, tiny_models["student"], noise=0.3, keep=1)
        assert (await gen.load_version(versions.current(run)))["version"] == 4

    asyncio.run(main())
    gen.close()


def test_asgi_app_auth_and_errors(hf_run):
    import httpx

    from protege.serve.app import _sha256, make_asgi_app

    gen = _hf_gen(hf_run)
    app = make_asgi_app(gen, _sha256(KEY))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert (await c.get("/health")).json()["version"] == 1
            r = await c.post("/v1/completions", json={"model": "student", "prompt": "x", "temperature": 9})
            assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
            h = {"Authorization": f"Bearer {KEY}"}
            r = await c.post("/v1/completions", headers=h, json={"model": "student", "prompt": "x", "temperature": 9})
            assert r.status_code == 400 and r.json()["error"]["message"].startswith("temperature:")
            r = await c.post("/v1/completions", headers={"Authorization": "Bearer nope"}, json={})
            assert r.status_code == 401 and r.json()["error"]["message"] == "invalid API key"
            r = await c.get("/v1/models", headers=h)
            assert r.json()["data"][0]["version"] == 1

    asyncio.run(main())
    gen.close()


def test_serve_modules_import_without_heavy_libraries():
    """Versions, request models, the CLI and the generator import without Ray, vLLM or torch (docs/design.md)."""
    import subprocess
    import sys

    code = (
        "import sys\nfor m in ('vllm', 'ray', 'torch', 'transformers', 'fastapi'): sys.modules[m] = None\n"
        "import protege.serve.api, protege.serve.versions, protege.serve.cli, protege.serve.generator"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
