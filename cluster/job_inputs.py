"""What a submitted job reads, and how each of those inputs reaches the cluster.

``protege submit`` runs the job somewhere else: the cluster sees the job's working directory (the
project as uploaded, cluster/jobs.py) and its own disks, not this machine's. Every path in the spec
(``models.{student,teacher,reward_model}.path``, ``data.path``, a ``rewards[].function`` file) is
classified here, before anything is sent:

========  ===================================================================  =====================
kind      what it is                                                           on the cluster
========  ===================================================================  =====================
hub       not a path here, but a Hugging Face id (``org/name``)                passed through
uri       an object-store URI (``s3://…``)                                     passed through
shared    an absolute path the cluster can read too: the head is this          passed through
          machine, the path is on a network filesystem, or it is not on this
          machine at all (then it can only be the cluster's own)
project   a relative path inside the project that the upload already holds     unchanged
upload    any other local file or folder (``models/``, ``runs/``, a path       linked under
          outside the project, a local disk)                                   ``_inputs/``, rewritten
missing   nothing here, and not a hub id                                       refused
========  ===================================================================  =====================

Uploads ride in the job's working directory, so Ray unpacks them on every node that runs a part
of the job, where the rewritten relative paths resolve. Ray keeps that package in its GCS, which
refuses one past ~512 MiB (its gRPC message limit), so :data:`UPLOAD_LIMIT` is 500 MiB. A job
that would upload more goes through the run's bucket when ``checkpoint.dir`` is an object-store
URI (the working dir is zipped and put there; Ray fetches it on each node), else it is refused
with one line naming the field and what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

INPUTS_DIR = "_inputs"
UPLOAD_LIMIT = 500 * 2**20
#: $PROTEGE_SHARED_PATHS: colon-separated folders the cluster mounts too, for shared storage that
#: /proc/mounts does not show as a network filesystem (a SAN volume, a bind mount).
SHARED_PATHS_ENV = "PROTEGE_SHARED_PATHS"
# Filesystem types whose files other machines see too (an NFS home, Lustre scratch, a bucket mount).
NETWORK_FS = {
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "lustre",
    "gpfs",
    "beegfs",
    "ceph",
    "glusterfs",
    "wekafs",
    "fuse.gcsfuse",
    "fuse.s3fs",
    "fuse.juicefs",
    "fuse.sshfs",
    "fuse.rclone",
    "fuse.mountpoint-s3",
    "fuse.goofys",
    "fuse.ceph",
    "fuse.glusterfs",
    "fuse.lustre",
}


@dataclass
class Input:
    field: str  # the spec field: models.student.path, data.path, rewards[0].function
    value: str  # as written in the spec
    kind: str  # hub | uri | shared | project | upload | missing
    local: Path | None = None  # the file or folder here (project / upload / shared)
    size: int = 0  # bytes under ``local`` (upload only)
    staged: str | None = None  # relative path in the job's working dir (upload only)


@dataclass
class Plan:
    inputs: list[Input]
    project_bytes: int
    route: str = "upload"  # upload: Ray's working-dir upload; bucket: a zip in the run's bucket
    links: dict[str, Path] = field(default_factory=dict)  # staged path -> local file or folder

    @property
    def total_bytes(self) -> int:
        return self.project_bytes + sum(i.size for i in self.uploads)

    @property
    def uploads(self) -> list[Input]:
        seen, out = set(), []
        for i in self.inputs:  # the same folder for two roles travels once
            if i.kind == "upload" and i.staged not in seen:
                seen.add(i.staged)
                out.append(i)
        return out


def spec_paths(spec) -> Iterator[tuple[str, str, str]]:
    """(field, value, what) for every path the job reads; what is model | data | file."""
    for role in ("student", "teacher", "reward_model"):
        ref = getattr(spec.models, role)
        if ref is not None:
            yield f"models.{role}.path", ref.path, "model"
    if spec.data.source == "file" and spec.data.path:
        yield "data.path", spec.data.path, "data"
    for i, r in enumerate(spec.rewards):
        target = (r.function or "").rpartition(":")[0]
        if target.endswith(".py"):  # a module name is imported from the cluster's Python
            yield f"rewards[{i}].function", target, "file"


def human(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fs type), longest mount point first."""
    try:
        rows = [ln.split()[1:3] for ln in Path("/proc/mounts").read_text().splitlines() if len(ln.split()) > 2]
    except OSError:
        return []
    return sorted(((m.replace("\\040", " "), t) for m, t in rows), key=lambda r: -len(r[0]))


def on_shared_storage(path: Path) -> bool:
    """Is ``path`` on storage other machines mount too ($PROTEGE_SHARED_PATHS or a network fs)?"""
    path = path.resolve()
    for root in filter(None, os.environ.get(SHARED_PATHS_ENV, "").split(":")):
        if path.is_relative_to(Path(root).resolve()):
            return True
    for mount, fstype in _mounts():
        if path.is_relative_to(mount):
            return fstype in NETWORK_FS
    return False


def classify(
    field_: str,
    value: str,
    what: str,
    *,
    project: Path,
    remote: bool,
    cwd: Path | None = None,
    packed: set[str] | None = None,
) -> Input:
    """Where ``value`` (a spec path, relative to ``cwd`` as ``protege run`` would read it) comes
    from on the cluster. ``remote``: the head is another machine. ``packed``: the project's files
    the upload holds (relative paths), to tell a data file that already travels."""
    from protege.core.storage import is_uri

    if is_uri(value):
        return Input(field_, value, "uri")
    cwd = cwd or Path.cwd()
    raw = Path(value).expanduser()
    here = raw if raw.is_absolute() else cwd / raw
    if not here.exists():
        if what == "model" and not raw.is_absolute() and _is_hub_id(value):
            return Input(field_, value, "hub")
        if raw.is_absolute() and remote:
            return Input(field_, value, "shared")  # not on this machine: the cluster's own path
        return Input(field_, value, "missing")
    here = here.resolve()
    if raw.is_absolute() and (not remote or on_shared_storage(here)):
        return Input(field_, value, "shared", local=here)
    root = project.resolve()
    if not raw.is_absolute() and packed is not None and (root / raw).resolve() == here and here.is_relative_to(root):
        # Already in the upload, every file of it (a folder under models/ or with *.safetensors is not).
        files = [here] if here.is_file() else [f for f in here.rglob("*") if f.is_file()]
        if files and all(f.relative_to(root).as_posix() in packed for f in files):
            return Input(field_, value, "project", local=here)
    # A folder keeps its name under the field's own folder (a model is found by its config.json,
    # a data file by its suffix).
    staged = f"{INPUTS_DIR}/{_slug(field_)}/{here.name}"
    return Input(field_, value, "upload", local=here, size=tree_bytes(here), staged=staged)


def _slug(field_: str) -> str:
    return field_.replace("[", ".").replace("]", "").removesuffix(".path").removesuffix(".function")


def _is_hub_id(value: str) -> bool:
    from protege.core.models import is_hub_id

    return is_hub_id(value)


def packed_files(root: Path, excludes: list[str]) -> dict[str, int]:
    """Files Ray would pack from ``root`` with ``excludes`` and the .gitignore files (its own
    traversal and matcher), relative path -> bytes."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    found: dict[str, int] = {}

    def add(p: Path):
        if p.is_file():
            found[p.relative_to(root).as_posix()] = p.stat().st_size

    _dir_travel(root, [_get_excludes(root, list(excludes))], add, include_gitignore=True)
    return found


def plan(spec, project: Path, *, remote: bool, excludes: list[str], cwd: Path | None = None) -> Plan:
    """Classify every input; raise UserError (one line, its field) for a missing one or an upload
    past :data:`UPLOAD_LIMIT` when there is no bucket to take it."""
    from protege.cluster.preflight import UserError

    packed = packed_files(project, excludes)
    inputs = [
        classify(f, v, w, project=project, remote=remote, cwd=cwd, packed=set(packed)) for f, v, w in spec_paths(spec)
    ]
    for i in inputs:
        if i.kind == "missing":
            hint = (
                "give a model folder, a Hugging Face id (org/name), or a path on storage the cluster shares"
                if i.field.startswith("models.")
                else "give a file that exists here, or one on storage the cluster shares"
            )
            where = "" if Path(i.value).is_absolute() else f" (relative paths start at {cwd or Path.cwd()})"
            raise UserError(i.field, f"'{i.value}' does not exist on this machine{where}; {hint}")
    first: dict[Path, str] = {}
    for i in inputs:  # the same folder for two roles travels once
        if i.kind == "upload":
            i.staged = first.setdefault(i.local, i.staged)
    out = Plan(inputs, project_bytes=sum(packed.values()))
    for i in out.uploads:
        out.links[i.staged] = i.local
    if out.total_bytes <= UPLOAD_LIMIT:
        return out
    if spec.run_uri is not None:
        out.route = "bucket"
        return out
    big = max(out.uploads, key=lambda i: i.size, default=None)
    if big is None:  # the project alone: Ray's own error says which files
        return out
    alone = big.size + out.project_bytes <= UPLOAD_LIMIT
    extra = (
        f" (the job's upload would be {human(out.total_bytes)} with the project and the other inputs)" if alone else ""
    )
    raise UserError(
        big.field,
        f"{big.local} is {human(big.size)}{extra}, larger than Ray's {UPLOAD_LIMIT // 2**20} "
        "MiB upload; put it on storage the cluster shares or use a bucket checkpoint.dir",
    )


def rewritten(spec, p: Plan):
    """A copy of ``spec`` whose uploaded inputs point at their place in the job's working dir.
    Written past validation: a reward file's validator looks for the file from *here*."""
    new = spec.model_copy(deep=True)
    for i in p.inputs:
        if i.kind != "upload":
            continue
        if i.field.startswith("models."):
            getattr(new.models, i.field.split(".")[1]).__dict__["path"] = i.staged
        elif i.field == "data.path":
            new.data.__dict__["path"] = i.staged
        else:
            r = new.rewards[int(i.field.split("[")[1].split("]")[0])]
            r.__dict__["function"] = f"{i.staged}:{r.function.rpartition(':')[2]}"
    return new


def publish(working_dir: Path, uri: str, excludes: list[str]) -> str:
    """Zip ``working_dir`` the way Ray packs one (same excludes and .gitignore files) and put it
    at ``uri`` (…/NAME.zip); Ray downloads and unpacks it on every node of the job. Returns uri."""
    import tempfile

    from ray._private.runtime_env.packaging import create_package

    from protege.core import storage

    with tempfile.TemporaryDirectory(prefix="protege-wd-") as tmp:
        zipped = Path(tmp) / "working_dir.zip"
        # One top-level folder: Ray strips it when it unpacks a remote package.
        create_package(str(working_dir), zipped, include_gitignore=True, include_parent_dir=True, excludes=excludes)
        fs, path = storage.filesystem(uri)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(zipped), path)
    return uri


def describe(p: Plan) -> list[str]:
    """One line per input that does not stay as written, for the submitter."""
    lines = []
    for i in p.inputs:
        if i.kind == "upload":
            lines.append(f"{i.field}: {i.value} ({human(i.size)}) travels with the job as {i.staged}")
    if p.route == "bucket":
        lines.append(
            f"the job's files ({human(p.total_bytes)}) are past Ray's {UPLOAD_LIMIT // 2**20} MiB upload: "
            "they go through the run's bucket (checkpoint.dir)"
        )
    return lines
