"""Property-based fuzzing of everything that accepts a job spec: parse_spec, `protege validate`
and POST /v1/jobs. Every input is accepted or rejected with field errors, never a traceback or a
500, and nothing is submitted for an invalid spec or a bad token."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protege.core.spec import JobSpec, SpecError, parse_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "examples").glob("*.yaml"))]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def _paths(d, prefix=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))


@st.composite
def mutated_specs(draw):
    spec = copy.deepcopy(draw(st.sampled_from(EXAMPLES)))
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(spec))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        node = spec
        for k in path[:-1]:
            node = node[k]
        action = draw(st.sampled_from(["delete", "replace", "unknown"]))
        if action == "delete":
            node.pop(path[-1], None)
        elif action == "replace":
            node[path[-1]] = draw(json_values)
        elif isinstance(node, dict):
            node[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    return spec


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(mutated_specs())
def test_parse_spec_accepts_or_names_fields(data):
    try:
        spec = parse_spec(data)
    except SpecError as err:
        assert err.errors and all(isinstance(f, str) and f and isinstance(m, str) and m for f, m in err.errors)
    else:
        assert isinstance(spec, JobSpec)
        assert parse_spec(json.loads(spec.model_dump_json())) == spec  # what we print loads back


@FUZZ
@given(json_values)
def test_parse_spec_on_arbitrary_json(data):
    with pytest.raises(SpecError) if not isinstance(data, dict) or "models" not in data else _maybe():
        parse_spec(data)


class _maybe:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is None or issubclass(kind, SpecError)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutated_specs())
def test_cli_validate_exit_codes(tmp_path, data):
    from protege.cli import main

    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))
    try:
        code = main(["validate", str(path)])
    except SystemExit as e:
        code = e.code
    assert code in (0, 2)


class RecordingJobs:
    project, address = ROOT, "http://stub"

    def __init__(self):
        self.submitted = []

    def submit(self, spec):
        self.submitted.append(spec)
        return f"{spec.name}-1"

    def list(self):
        return []


@pytest.fixture(scope="module")
def api():
    from fastapi.testclient import TestClient

    from protege.cluster.job_api import create_app

    jobs = RecordingJobs()
    return TestClient(create_app(token="tok", jobs=jobs), raise_server_exceptions=False), jobs


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutated_specs())
def test_post_jobs_never_500(api, data):
    client, jobs = api
    before = len(jobs.submitted)
    # Python's json writes NaN/Infinity, which is not JSON: the server must answer 422, not 500.
    r = client.post(
        "/v1/jobs",
        content=json.dumps(data).encode(),
        headers={"Authorization": "Bearer tok", "Content-Type": "application/json"},
    )
    assert r.status_code in (201, 422), r.text
    if r.status_code == 422:
        assert r.json()["errors"] and len(jobs.submitted) == before
    else:
        assert len(jobs.submitted) == before + 1


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.binary(max_size=200),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
    | st.sampled_from(["Bearer tok", "bearer tok", "Bearer  tok", "Bearer tok2"]),
)
def test_post_jobs_raw_bytes_and_headers(api, body, header):
    client, jobs = api
    before = len(jobs.submitted)
    r = client.post("/v1/jobs", content=body, headers={"Authorization": header, "Content-Type": "application/json"})
    scheme, _, given_token = header.partition(" ")
    authorised = scheme.lower() == "bearer" and given_token.strip() == "tok"  # RFC 7235: scheme is case-insensitive
    assert r.status_code in ((201, 422) if authorised else (401,))
    if not authorised:
        assert r.status_code == 401
        assert len(jobs.submitted) == before
