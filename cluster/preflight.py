"""Pre-flight checks: what a user can get wrong outside the spec's own rules, found before any
resource (Ray, actors, an engine) is taken.

core/spec.py checks a spec on its own (pydantic, no I/O). These look at the world the job will
meet: model folders and the Hugging Face cache, the data, reasoning-gym's task list, tokenizers,
model configs (KV cache size), the Ray address, the serving port and the bucket. Each check raises
:class:`UserError` naming the field (or environment variable) to fix; the CLI prints it as one line
``error: field.path: what is wrong and what to do`` and exits 2.

Which checks run where: ``protege run`` all of them; ``protege validate`` the ones that hold on any
machine (task, KV cache), with the local ones (model folders, data file) as warnings, since a spec
may be meant for another machine; ``protege submit`` the machine-independent ones plus files it
uploads; ``protege serve`` the Ray address and the port.
"""

from __future__ import annotations

import errno
import json
import math
import os
import socket
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit


class UserError(ValueError):
    """Bad input from the user: ``field`` is the spec path (``models.student.path``), CLI option or
    environment variable to change; ``message`` says what is wrong and what to do."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --------------------------------------------------------------------------- models
def _roles(spec) -> Iterator[tuple[str, object]]:
    for role in ("student", "teacher", "reward_model"):
        ref = getattr(spec.models, role)
        if ref is not None:
            yield f"models.{role}.path", ref


def check_model(field: str, path: str, revision: str | None = None) -> None:
    """A local model folder with config.json and weights, or a hub id this machine can load: in
    the local Hugging Face cache, or anything when the hub is reachable (not HF_HUB_OFFLINE)."""
    from protege.core.models import has_weights, hub_offline, is_hub_id, model_config_file

    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            inner = sorted(str(p.parent) for p in folder.glob("*/config.json"))
            hint = (
                f"; did you mean {' or '.join(inner[:3])}{' or ...' if len(inner) > 3 else ''}?"
                if inner
                else "; point it at the folder that holds config.json"
            )
            raise UserError(field, f"'{path}' is not a model folder (no config.json){hint}")
        if not has_weights(folder):
            raise UserError(field, f"'{path}' has config.json but no weights (*.safetensors, *.bin)")
        return
    if folder.exists():
        raise UserError(field, f"'{path}' is a file; give the model's folder (the one with config.json)")
    if not is_hub_id(path):
        raise UserError(
            field,
            f"folder '{path}' does not exist (relative paths start at {Path.cwd()}); "
            "give a model folder or a Hugging Face id (org/name)",
        )
    if model_config_file(path, revision) is not None or not hub_offline():
        return  # cached, or the hub will be asked (users load by id): a wrong id fails there
    raise UserError(
        field,
        f"'{path}' is not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE "
        f"is set; give a model folder, or download it first (huggingface-cli download {path})",
    )


def check_models(spec) -> None:
    for field, ref in _roles(spec):
        check_model(field, ref.path, ref.revision)


def check_tokenizers(spec) -> None:
    """Teacher signals are compared token id by token id: the teacher must share the student's
    tokenizer. (The driver checks this again; here it fails before Ray starts.)"""
    teacher = spec.models.teacher
    if teacher is None:
        return
    from protege.core.models import load_tokenizer, tokenizers_match

    toks = {}
    for field, ref in (("models.student.path", spec.models.student), ("models.teacher.path", teacher)):
        try:
            toks[field] = load_tokenizer(ref.path, revision=ref.revision)
        except Exception as err:  # noqa: BLE001 - the tokenizers library raises bare Exception for a broken file
            # the user's folder: no tokenizer files, or ones its library cannot read
            raise UserError(field, f"cannot load a tokenizer from '{ref.path}': {_first_line(err)}") from None
    ok, why = tokenizers_match(toks["models.student.path"], toks["models.teacher.path"])
    if not ok:
        raise UserError(
            "models.teacher.path",
            f"the teacher's tokenizer differs from the student's "
            f"(student vs teacher: {why}); "
            f"'{spec.algorithm.type}' compares them token by token: use a teacher and student from "
            "one family (protege models prune makes a student from a teacher)",
        )


# --------------------------------------------------------------------------- KV cache
#: vLLM on CPU stores the KV cache in blocks of 128 tokens and keeps one block back (its null
#: block), so one sequence of N tokens needs ceil(N / 128) + 1 blocks (vllm/platforms/cpu.py,
#: vllm/v1/core/kv_cache_utils.py: check_enough_kv_cache_memory).
CPU_KV_BLOCK_TOKENS = 128


def kv_cache_needed(bytes_per_token: int, max_model_len: int) -> int:
    """Bytes of KV cache vLLM (CPU) needs to hold one sequence of ``max_model_len`` tokens."""
    blocks = math.ceil(max_model_len / CPU_KV_BLOCK_TOKENS) + 1
    return blocks * CPU_KV_BLOCK_TOKENS * bytes_per_token


def _kv_engines(spec) -> Iterator[object]:
    """The models whose vLLM engine gets rollout.kv_cache_gb: on CPU only (on a GPU vLLM sizes its
    cache from gpu_memory_utilization instead)."""
    if spec.rollout.engine != "vllm":
        return
    if spec.resources.rollout.gpus == 0:
        yield spec.models.student
    if spec.models.teacher is not None and spec.resources.teacher.gpus == 0:
        yield spec.models.teacher


def check_kv_cache(spec) -> None:
    """rollout.kv_cache_gb must hold one whole sequence (prompt + response + template), or vLLM
    refuses to start after Ray and the actors are up. Skipped when the model's config is not on
    this machine, or its layout is not a plain decoder's."""
    from protege.core.models import kv_cache_bytes_per_token, model_config_file

    need = 0
    for ref in _kv_engines(spec):
        cfg_file = model_config_file(ref.path, ref.revision)
        if cfg_file is None:
            continue
        try:
            per_token = kv_cache_bytes_per_token(json.loads(cfg_file.read_text()), ref.dtype)
        except (OSError, ValueError):
            continue  # an unreadable config is reported by the model check / the loader
        if per_token:
            need = max(need, kv_cache_needed(per_token, spec.max_model_len))
    have = int(spec.rollout.kv_cache_gb * (1 << 30))
    if need > have:
        gb = math.ceil(need / (1 << 30) * 1e4) / 1e4  # rounded up: the suggestion must suffice
        prompt = spec.rollout.max_prompt_tokens
        raise UserError(
            "rollout.kv_cache_gb",
            f"{spec.rollout.kv_cache_gb} GB cannot hold one sequence of "
            f"{spec.max_model_len} tokens ({prompt} prompt + {spec.max_model_len - prompt - 64} "
            f"response + 64 template); set it to at least {gb}, or lower rollout.max_prompt_tokens "
            "/ max_new_tokens",
        )


# --------------------------------------------------------------------------- data
def _data_error(field: str, fn: Callable, *args, **kwargs):
    from protege.core.data import DataError

    try:
        return fn(*args, **kwargs)
    except DataError as err:
        raise UserError(field, str(err)) from None


def check_task(spec) -> None:
    """A reasoning-gym task that exists, with a config its generator accepts (cheap: entries are
    generated when read; the first one is, to catch configs that fail only then)."""
    d = spec.data
    if d.source != "reasoning_gym":
        return
    from protege.core.data import DataError, check_task as known, open_reasoning_gym

    _data_error("data.task", known, d.task)
    try:
        open_reasoning_gym(d.task, size=d.size, seed=d.seed, config=d.task_config)[0]
    except DataError as err:
        raise UserError("data.task_config", str(err)) from None
    except Exception as err:  # the generator's own complaint about this config, whatever its type
        raise UserError(
            "data.task_config",
            f"reasoning-gym task {d.task!r} cannot generate with {d.task_config}: {_first_line(err)}",
        ) from None


def _examples(spec) -> list:
    """The job's examples, loaded as the driver will load them."""
    d = spec.data
    if d.source == "reasoning_gym":
        from protege.core.data import DataError, load_reasoning_gym

        check_task(spec)  # the name and the config, naming the field at fault
        try:
            return load_reasoning_gym(d.task, size=d.size, seed=d.seed, config=d.task_config)
        except DataError as err:
            raise UserError("data.task_config", str(err)) from None
        except Exception as err:  # an entry past the first failed to generate with this config
            raise UserError(
                "data.task_config",
                f"reasoning-gym task {d.task!r} cannot generate with {d.task_config}: {_first_line(err)}",
            ) from None
    from protege.core.data import load_file, load_preferences

    if spec.algorithm.needs().responses == "preferences":
        return _data_error(
            "data.path",
            load_preferences,
            d.path,
            prompt_field=d.prompt_field,
            chosen_field=d.chosen_field,
            rejected_field=d.rejected_field,
        )
    return _data_error(
        "data.path",
        load_file,
        d.path,
        prompt_field=d.prompt_field,
        answer_field=d.answer_field,
        response_field=d.response_field,
    )


def _where(spec) -> str:
    d = spec.data
    return f"in {d.path}" if d.source == "file" else f"among the {d.size} examples generated for {d.task}"


def check_data(spec) -> int:
    """Load the data as the job will (a missing or unreadable file, a bad row at its line, a task
    that cannot generate) and return its number of distinct questions: the split holds out whole
    questions, so that is what data.eval_size must stay below."""
    distinct = len({ex.prompt for ex in _examples(spec)})
    d = spec.data
    if d.held_out(distinct) >= distinct:
        raise UserError(
            "data.eval_size",
            f"holding out {d.eval_size} of the {distinct} distinct questions "
            f"{_where(spec)} leaves none to train on; set it below {distinct} (0 turns evaluation off)",
        )
    return distinct


def check_data_file(spec) -> int | None:
    """:func:`check_data` for a data file (a reasoning-gym task is generated, not read); else None."""
    return check_data(spec) if spec.data.source == "file" else None


def fit_data(spec, distinct: int) -> None:
    """Let unset eval sizes follow the data's real number of distinct questions; an explicit
    eval.size that no longer fits is the user's to change."""
    spec.fit_data(distinct)
    d, ev = spec.data, spec.eval
    if 0 < d.eval_size < ev.size:
        raise UserError(
            "eval.size",
            f"{ev.size} is more than the {d.eval_size} questions held out of the {distinct} "
            f"distinct ones {_where(spec)} (data.eval_size unset holds out at most half); lower it, "
            "or set data.eval_size",
        )


# --------------------------------------------------------------------------- Ray, ports
def _is_loopback(host: str) -> bool:
    return host in ("localhost", "") or host.startswith("127.") or host == "::1"


def _reach(host: str, port: int, timeout_s: float) -> str | None:
    """None when a TCP connection to host:port opens, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except socket.gaierror:
        return f"unknown host '{host}'"
    except socket.timeout:
        return f"no answer within {timeout_s:g} s"
    except OSError as err:
        return err.strerror or str(err)


def _ray_host_port(address: str) -> tuple[str, int]:
    if address == "auto":
        address = _auto_address()
    scheme = address.split("://", 1)[0] if "://" in address else ""
    parts = urlsplit(address if scheme else f"//{address}")
    try:
        port = parts.port or (10001 if scheme == "ray" else None)
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise UserError(
            "RAY_ADDRESS", f"'{address}' is not HOST:PORT (the head's GCS port, usually 6379), ray://HOST:10001 or auto"
        )
    return parts.hostname, port


def _auto_address() -> str:
    """What ray.init(address='auto') would connect to: the cluster `ray start` last started here."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        found = canonicalize_bootstrap_address("auto")
    except ConnectionError:
        found = None
    if not found:
        raise UserError(
            "RAY_ADDRESS",
            "'auto' found no running Ray cluster on this machine; start one "
            "(ray start --head) or unset RAY_ADDRESS to run on a Ray started in-process",
        )
    return found


def check_ray_address(timeout_s: float = 5.0) -> None:
    """$RAY_ADDRESS must answer: ray.init would otherwise retry for minutes, then print a traceback."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address or address == "local" or os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return  # an in-process Ray, or inside a Ray job (its runtime found the cluster already)
    host, port = _ray_host_port(address)
    why = _reach(host, port, timeout_s)
    if why and _is_loopback(host):
        # Ray itself replaces a loopback address with this node's IP; the head may listen only there.
        from ray._private.services import resolve_ip_for_localhost

        if _reach(resolve_ip_for_localhost(host), port, min(timeout_s, 1.0)) is None:  # local: answers at once
            return
    if why:
        raise UserError(
            "RAY_ADDRESS",
            f"cannot reach {address} ({why}); start the cluster (ray start --head) "
            "or check the address, or unset RAY_ADDRESS to run on a Ray started in-process",
        )


def serving_here() -> bool:
    """Ray Serve listens on this machine only with an in-process Ray (no RAY_ADDRESS, not inside a
    Ray job): on a cluster the port may rightly be held already, by Serve itself."""
    return os.environ.get("RAY_ADDRESS", "").strip() in ("", "local") and not os.environ.get(
        "RAY_JOB_CONFIG_JSON_ENV_VAR"
    )


def check_port(host: str, port: int, port_field: str = "serve.port", host_field: str = "serve.host") -> None:
    """Bind host:port for a moment: Serve's HTTP proxy would otherwise fail after Ray is up."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror:
        raise UserError(
            host_field, f"unknown host '{host}'; listen on 127.0.0.1, 0.0.0.0 or an address of this machine"
        ) from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to use
        try:
            s.bind(addr)
        except OSError as err:
            if err.errno == errno.EADDRNOTAVAIL:
                raise UserError(
                    host_field,
                    f"{host} is not an address of this machine; listen on 127.0.0.1, 0.0.0.0 or one of its addresses",
                ) from None
            why = {errno.EADDRINUSE: "is in use", errno.EACCES: "needs privileges (ports below 1024)"}.get(
                err.errno, f"cannot be bound ({err.strerror or err})"
            )
            raise UserError(
                port_field, f"{host}:{port} {why}; choose another port (--port / serve.port) or stop what holds it"
            ) from None


# --------------------------------------------------------------------------- bucket
def _store_errors() -> tuple[type[BaseException], ...]:
    """What an object store raises for missing or refused credentials, besides OSError."""
    errors: list[type[BaseException]] = [OSError, RuntimeError, ValueError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    except ImportError:
        pass
    try:
        from google.auth.exceptions import GoogleAuthError

        errors.append(GoogleAuthError)
    except ImportError:
        pass
    return tuple(errors)


def check_bucket(spec, *, write: bool = True) -> None:
    """A ``checkpoint.dir`` URI must be writable with this machine's credentials; the probe is the
    write of resolved_spec.json the driver does anyway (``write=False``: a read, for dry runs)."""
    uri = spec.run_uri
    if uri is None:
        return
    from protege.core import storage

    try:
        storage.filesystem(uri)
    except RuntimeError as err:  # the backend is not installed; the message says what to install
        raise UserError("checkpoint.dir", _first_line(err)) from None
    try:
        if write:
            storage.write_text(storage.join(uri, "resolved_spec.json"), spec.model_dump_json(indent=2))
        else:
            storage.exists(uri)
    except _store_errors() as err:
        raise UserError(
            "checkpoint.dir",
            f"cannot {'write to' if write else 'read'} {uri}: {_first_line(err)}; "
            "give this machine credentials for the bucket, or use a local path",
        ) from None


# --------------------------------------------------------------------------- per command
def portable_checks(spec) -> None:
    """True of the spec on any machine with the same packages and models (and cheap: the task's
    first entry is generated, not the whole set)."""
    check_task(spec)
    check_kv_cache(spec)


def for_run(spec, *, dry_run: bool = False) -> None:
    """Everything ``protege run`` needs, cheapest first; nothing is started or (for a dry run) written."""
    check_models(spec)
    fit_data(spec, check_data(spec))
    check_kv_cache(spec)
    check_ray_address()
    if spec.serve.enabled and serving_here():
        check_port(spec.serve.host, spec.serve.port)
    check_tokenizers(spec)
    check_bucket(spec, write=not dry_run)


def validate_warnings(spec) -> list[str]:
    """``protege validate``: local problems as warnings (the spec may be for another machine)."""
    out = []
    for check in (check_models, check_data_file):
        try:
            check(spec)
        except UserError as err:
            out.append(f"{err} (checked on this machine; fine if the job runs on another)")
    return out


def for_submit(spec) -> None:
    """``protege submit``: the cluster's files are not visible here, but a relative data file is
    uploaded with the project, so it must be right here."""
    portable_checks(spec)
    if spec.data.source == "file" and not Path(spec.data.path).is_absolute():
        check_data_file(spec)


def for_serve(host: str, port: int, port_field: str = "serve.port", host_field: str = "serve.host") -> None:
    check_ray_address()
    if serving_here():
        check_port(host, port, port_field, host_field)
