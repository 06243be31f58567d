"""REST job API: submit, list, inspect and stop Protégé jobs over HTTP (FastAPI, run standalone).

    POST   /v1/jobs        a JobSpec as JSON → 201 {"id", "name", "run_dir", "warnings"}
                           invalid → 422 {"errors": [{"field", "message"}, ...]} (every error, nothing submitted)
    GET    /v1/jobs        {"jobs": [{"id", "name", "state", "algorithm", "steps", ...}]}
    GET    /v1/jobs/{id}   Ray's state + step, latest metrics and checkpoint versions of the run
    DELETE /v1/jobs/{id}   stop the job → {"id", "stopped", "state"}

Every route needs ``Authorization: Bearer $PROTEGE_JOBS_TOKEN``; without it or with a wrong one
the answer is 401 and nothing reaches Ray. The token is required at start (no open mode), compared
in constant time and never logged.

Jobs go to the Ray cluster the app was created for, through :class:`protege.cluster.jobs.JobsClient`
(the Ray Jobs API, with Ray's own token from $RAY_AUTH_TOKEN / ~/.ray/auth_token). Step, metrics
and checkpoints come from the run directory (``checkpoint.dir``), so they are filled in only when
that directory is readable by this process: the API on the head node, or the cluster's shared
storage mounted here. Otherwise ``readable`` is false and Ray's state is all there is.

Run it with ``protege jobs serve-api --host 0.0.0.0 --port 8080 --address http://HEAD:8265``.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

import requests
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from ray.exceptions import RayError

from protege.cluster.jobs import JobNotFound, JobsClient, spec_warnings
from protege.cluster.preflight import UserError
from protege.core.spec import SpecError, parse_spec

TOKEN_ENV = "PROTEGE_JOBS_TOKEN"


def create_app(address: str | None = None, *, token: str | None = None, jobs: JobsClient | None = None) -> FastAPI:
    """The app; ``token`` defaults to $PROTEGE_JOBS_TOKEN and must not be empty."""
    token = token if token is not None else os.environ.get(TOKEN_ENV, "")
    if not token:
        raise RuntimeError(f"the job API needs a bearer token: set {TOKEN_ENV}")
    expected = token.encode()
    jobs = jobs or JobsClient(address)

    def require_token(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    # openapi/docs would be the only unauthenticated routes; the schema is JobSpec's, documented elsewhere.
    app = FastAPI(
        title="Protégé jobs", dependencies=[Depends(require_token)], openapi_url=None, docs_url=None, redoc_url=None
    )

    @app.exception_handler(JobNotFound)
    async def _not_found(_request, exc: JobNotFound):
        return JSONResponse({"detail": f"no job {exc.args[0]}"}, status_code=404)

    @app.exception_handler(ConnectionError)
    @app.exception_handler(requests.exceptions.ConnectionError)
    async def _unreachable(_request, exc: Exception):
        return JSONResponse({"detail": f"Ray job server unreachable at {jobs.address}: {exc}"}, status_code=503)

    # The job server said no, e.g. Ray's own token is missing (RayError) or wrong (RuntimeError, 403).
    @app.exception_handler(RuntimeError)
    @app.exception_handler(RayError)
    async def _ray_error(_request, exc: Exception):
        return JSONResponse({"detail": f"Ray job server: {exc}"}, status_code=502)

    @app.post("/v1/jobs", status_code=201)
    async def submit(request: Request) -> JSONResponse:
        try:
            data: Any = await request.json()
        except ValueError:
            return _invalid([("(body)", "not valid JSON")])
        try:
            spec = parse_spec(data, "request")
        except SpecError as err:
            return _invalid(err.errors)
        try:
            job_id = await run_in_threadpool(jobs.submit, spec)
        except UserError as err:  # a path the cluster cannot read and that cannot travel with the job
            return _invalid([(err.field, err.message)])
        body = {
            "id": job_id,
            "name": spec.name,
            "run_dir": spec.run_location,
            "warnings": spec_warnings(spec, jobs.project),
        }
        return JSONResponse(body, status_code=201, headers={"Location": f"/v1/jobs/{job_id}"})

    @app.get("/v1/jobs")
    def list_jobs() -> dict:
        return {"jobs": jobs.list()}

    @app.get("/v1/jobs/{job_id}")
    def job_status(job_id: str) -> dict:
        return jobs.status(job_id)

    @app.delete("/v1/jobs/{job_id}")
    def stop_job(job_id: str) -> dict:
        stopped = jobs.stop(job_id)
        return {"id": job_id, "stopped": stopped, "state": jobs.state(job_id)}

    return app


def _invalid(errors: list[tuple[str, str]]) -> JSONResponse:
    return JSONResponse({"errors": [{"field": f, "message": m} for f, m in errors]}, status_code=422)


def serve(address: str, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Run the API with uvicorn until interrupted (``protege jobs serve-api``)."""
    import uvicorn

    uvicorn.run(create_app(address), host=host, port=port, log_level="info")
