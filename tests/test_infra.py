"""infra/: every manifest parses, every `blipbatch` command in it is accepted by our CLI parser, every
spec it names exists and validates, and the deployment invariants hold (GPU per worker, pinned images,
non-root image, no overlapping cron runs, the three RayJob variants in step)."""

from __future__ import annotations

import contextlib
import copy
import functools
import gzip
import io
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from blipbatch.jobs.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
LAUNCHER = INFRA / "cluster-launcher" / "aws.yaml"
DOCKERFILE = INFRA / "Dockerfile"


# ---------------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class Doc:
    """One Kubernetes object; `origin` says where it came from (file, or file#configmap/key if embedded)."""

    origin: str
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.body["kind"]

    @property
    def name(self) -> str:
        meta = self.body["metadata"]
        return meta.get("name") or meta["generateName"]


def load_documents() -> list[Doc]:
    """Every object of infra/kuberay/*.yaml, plus objects kept as YAML templates inside ConfigMaps."""
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for body in yaml.safe_load_all(path.read_text()):
            if body is None:
                continue
            doc = Doc(path.name, body)
            docs.append(doc)
            if doc.kind == "ConfigMap":
                for key, text in body.get("data", {}).items():
                    if key.endswith((".yaml", ".yml")):
                        docs += [
                            Doc(f"{path.name}#{doc.name}/{key}", b) for b in yaml.safe_load_all(text) if b is not None
                        ]
    return docs


DOCS = load_documents()
CONFIGMAPS = {d.name: d.body.get("data", {}) for d in DOCS if d.kind == "ConfigMap"}


def of_kind(kind: str) -> list[Doc]:
    return [d for d in DOCS if d.kind == kind]


def rayjob_specs() -> list[tuple[str, dict[str, Any]]]:
    """(origin, RayJobSpec) of every RayJob and every RayCronJob's job template."""
    specs = [(d.origin, d.body["spec"]) for d in of_kind("RayJob")]
    specs += [(d.origin, d.body["spec"]["jobTemplate"]) for d in of_kind("RayCronJob")]
    return specs


def ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(origin, RayClusterSpec) of every RayCluster and of every cluster a RayJob creates."""
    return [(o, s["rayClusterSpec"]) for o, s in rayjob_specs()] + [
        (d.origin, d.body["spec"]) for d in of_kind("RayCluster")
    ]


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    """(origin, PodSpec) of every pod template in the manifests."""
    pods = []
    for origin, cluster in ray_cluster_specs():
        pods.append((f"{origin} head", cluster["headGroupSpec"]["template"]["spec"]))
        pods += [
            (f"{origin} worker group {g['groupName']}", g["template"]["spec"])
            for g in cluster.get("workerGroupSpecs", [])
        ]
    for d in of_kind("CronJob"):
        pods.append((d.origin, d.body["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    for d in of_kind("Job"):
        pods.append((d.origin, d.body["spec"]["template"]["spec"]))
    return pods


# ---------------------------------------------------------------------------------------------------
# Command lines


def blipbatch_argvs(command: str) -> list[list[str]]:
    """The `blipbatch ...` invocations in a shell command line: direct, quoted inside another command
    (`ray exec cluster.yaml "blipbatch run ..."`, `sh -c "..."`), or as the arguments of our image
    (`docker run ... IMAGE/blipbatch:TAG run ...`, whose entrypoint is `blipbatch`)."""
    found = []
    for line in command.splitlines():
        line = line.strip()
        if "blipbatch" not in line or line.startswith("#"):
            continue
        argv = shlex.split(line)
        if argv and PurePosixPath(argv[0]).name == "blipbatch":
            found.append(argv)
        elif argv[:2] == ["docker", "run"]:
            image = next((i for i, arg in enumerate(argv) if "/blipbatch:" in arg), None)
            if image is not None:
                found.append(["blipbatch", *argv[image + 1 :]])
        else:
            found += [inner for arg in argv[1:] if "blipbatch " in arg for inner in blipbatch_argvs(arg)]
    return found


@dataclass(frozen=True)
class Invocation:
    origin: str
    argv: list[str]
    pod: dict[str, Any] | None  # the pod the command runs in, to resolve mounted files; None: a checkout


def manifest_invocations() -> list[Invocation]:
    """Commands that Kubernetes or Ray will run: RayJob entrypoints and container commands."""
    found = []
    for origin, spec in rayjob_specs():
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        found += [Invocation(f"{origin} entrypoint", argv, head) for argv in blipbatch_argvs(spec["entrypoint"])]
    for origin, pod in pod_specs():
        for container in pod["containers"]:
            command = shlex.join(container.get("command", []) + container.get("args", []))
            for argv in blipbatch_argvs(command):
                found.append(Invocation(f"{origin} container {container['name']}", argv, pod))
            # A shell script given as one argument: its lines are commands too.
            for arg in container.get("args", []):
                if "\n" in arg:
                    found += [
                        Invocation(f"{origin} container {container['name']} script", argv, pod)
                        for argv in blipbatch_argvs(arg)
                    ]
    launcher = yaml.safe_load(LAUNCHER.read_text())
    for key in (
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        for command in launcher.get(key, []):
            found += [Invocation(f"aws.yaml {key}", argv, None) for argv in blipbatch_argvs(command)]
    return found


def documented_invocations() -> list[Invocation]:
    """Commands that people are told to type: in comments of infra/ files and in infra/README.md."""
    found = []
    for path in sorted(INFRA.rglob("*")):
        if path.suffix in (".yaml", ".yml") or path.name == "Dockerfile":
            for number, line in enumerate(path.read_text().splitlines(), 1):
                comment = line.partition("#")[2]
                # Comments are prose too; by our convention a command in a comment is indented: `#   cmd`.
                if comment.startswith("   ") and comment.strip().startswith(("blipbatch ", "docker run ", "ray exec ")):
                    found += [
                        Invocation(f"{path.relative_to(REPO)}:{number}", argv, None)
                        for argv in blipbatch_argvs(comment)
                    ]
    readme = (INFRA / "README.md").read_text()
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S):
        for line in block.splitlines():
            found += [Invocation("infra/README.md", argv, None) for argv in blipbatch_argvs(line.split(" # ")[0])]
    # Inline code that is a whole command naming a spec (not prose such as `blipbatch submit`).
    for command in re.findall(r"`([^`\n]*blipbatch [^`\n]*\.toml[^`\n]*)`", readme):
        found += [Invocation("infra/README.md", argv, None) for argv in blipbatch_argvs(command)]
    return found


ALL_INVOCATIONS = manifest_invocations() + documented_invocations()


def parse(argv: list[str]) -> None:
    """Our parser on argv[1:]; argparse's own message on failure."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(argv[1:])
    except SystemExit as e:
        pytest.fail(f"`{shlex.join(argv)}` is rejected by blipbatch's parser (exit {e.code}):\n{err.getvalue()}")


# ---------------------------------------------------------------------------------------------------
# Spec files named by commands


def mounted_file(pod: dict[str, Any], path: str) -> str | None:
    """The text of `path` inside `pod` when a ConfigMap volume provides it; None when no volume covers it."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for container in pod["containers"]:
        for mount in container.get("volumeMounts", []):
            mount_path = PurePosixPath(mount["mountPath"])
            if not PurePosixPath(path).is_relative_to(mount_path):
                continue
            volume = volumes[mount["name"]]
            assert "configMap" in volume, f"{path} comes from volume {mount['name']}, which is not a ConfigMap"
            source = volume["configMap"]
            relative = str(PurePosixPath(path).relative_to(mount_path))
            items = {item["path"]: item["key"] for item in source.get("items", [])}
            key = items.get(relative, relative if not items else None)
            assert source["name"] in CONFIGMAPS, f"ConfigMap {source['name']} (for {path}) is in no manifest"
            data = CONFIGMAPS[source["name"]]
            assert key in data, f"ConfigMap {source['name']} has no key for {path}; it has {sorted(data)}"
            return data[key]
    return None


def repo_file(path: str) -> Path:
    """A path as the image or a launcher node sees it, mapped onto this checkout."""
    for prefix in ("/app/", "~/blipbatch/"):
        if path.startswith(prefix):
            return REPO / path.removeprefix(prefix)
    assert not path.startswith(("/", "~")), f"{path} is neither in the image's /app nor in a ConfigMap"
    return REPO / path


def spec_text(invocation: Invocation, path: str) -> str:
    """The spec `path` as the command sees it: mounted in its pod (any pod, for a documented command), else
    a file of this checkout."""
    pods = [invocation.pod] if invocation.pod is not None else [pod for _, pod in pod_specs()]
    for pod in pods:
        text = mounted_file(pod, path)
        if text is not None:
            return text
    file = repo_file(path)
    assert file.is_file(), f"{invocation.origin}: `{shlex.join(invocation.argv)}` names {path}: no such file {file}"
    return file.read_text()


def named_specs() -> Iterator[tuple[Invocation, str]]:
    for invocation in ALL_INVOCATIONS:
        for arg in invocation.argv[1:]:
            if arg.endswith(".toml"):
                yield invocation, arg


# ---------------------------------------------------------------------------------------------------
# Tests: commands and specs


def test_manifests_hold_the_commands_we_expect() -> None:
    # The collection itself must see every entrypoint, or the checks below would pass on nothing.
    origins = sorted({i.origin.split()[0].split("#")[0] for i in manifest_invocations()})
    assert origins == ["cronjob.yaml", "raycronjob.yaml", "rayjob.yaml"]
    assert {shlex.join(i.argv) for i in manifest_invocations()} == {"blipbatch run /etc/blipbatch/job.toml"}
    documented = {i.argv[1] for i in documented_invocations()}
    assert {"run", "submit"} <= documented


@pytest.mark.parametrize("invocation", ALL_INVOCATIONS, ids=lambda i: f"{i.origin}: {shlex.join(i.argv)}")
def test_command_is_accepted_by_the_cli_parser(invocation: Invocation) -> None:
    parse(invocation.argv)


@pytest.mark.parametrize(
    "invocation,path", list(named_specs()), ids=lambda x: x.origin if isinstance(x, Invocation) else x
)
def test_named_spec_exists_and_validates(invocation: Invocation, path: str, tmp_path: Path) -> None:
    from blipbatch.jobs.spec import load_spec

    text = spec_text(invocation, path)
    file = tmp_path / PurePosixPath(path).name
    file.write_text(text)
    load_spec(file)


def test_configmap_spec_matches_the_gpu_worker_group(tmp_path: Path) -> None:
    from blipbatch.jobs.spec import load_spec

    # One model actor per GPU, as many as the autoscaled GPU group may have pods: the spec asks Ray for that many.
    file = tmp_path / "job.toml"
    file.write_text(CONFIGMAPS["blipbatch-job"]["job.toml"])
    job = load_spec(file)
    (_, spec), *_ = rayjob_specs()
    assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    gpu_pods = sum(g["maxReplicas"] for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert job.run.workers == "auto" and job.run.max_workers == gpu_pods
    assert job.model.device == "cuda"
    assert "file" not in job.fetch.allowed_schemes


def test_the_head_gives_blipbatch_time_to_stop_on_sigterm() -> None:
    """A deleted or stopped RayJob: SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S, inside the pod's grace."""
    for origin, cluster in ray_cluster_specs():
        head = cluster["headGroupSpec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in head["containers"][0].get("env", [])}
        assert int(env["RAY_JOB_STOP_WAIT_TIME_S"]) + 5 <= head["terminationGracePeriodSeconds"], origin


# ---------------------------------------------------------------------------------------------------
# Tests: structure


def gpus(container: dict[str, Any], field: str) -> int:
    return int(container.get("resources", {}).get(field, {}).get("nvidia.com/gpu", 0))


def test_every_ray_cluster_has_gpu_workers_with_one_gpu_per_pod_and_a_cpu_head() -> None:
    clusters = ray_cluster_specs()
    assert len(clusters) == 4  # rayjob, raycronjob, the cronjob's template, raycluster
    for origin, cluster in clusters:
        assert cluster["rayVersion"] == ray.__version__, origin
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert gpus(head, "limits") == 0, f"{origin}: the head should not take a GPU"
        groups = cluster["workerGroupSpecs"]
        gpu_groups = [g for g in groups if any(gpus(c, "limits") for c in g["template"]["spec"]["containers"])]
        assert gpu_groups, f"{origin}: no worker group requests nvidia.com/gpu"
        for group in gpu_groups:
            worker = group["template"]["spec"]["containers"][0]
            assert gpus(worker, "limits") == gpus(worker, "requests") == 1, origin
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], origin
            assert group["minReplicas"] < group["maxReplicas"], f"{origin}: the GPU group should autoscale"
            tolerations = group["template"]["spec"].get("tolerations", [])
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), origin
        assert cluster["enableInTreeAutoscaling"] is True, f"{origin}: GPU workers that join and leave need it"


def test_rayjobs_clean_up_retry_and_have_deadlines() -> None:
    specs = rayjob_specs()
    assert len(specs) == 3
    for origin, spec in specs:
        assert spec["shutdownAfterJobFinishes"] is True, origin
        assert spec["ttlSecondsAfterFinished"] > 0, origin
        assert spec["backoffLimit"] >= 1, origin
        assert 0 < spec["activeDeadlineSeconds"] < 24 * 3600, f"{origin}: a nightly run must end within a day"


def test_the_three_rayjob_variants_stay_identical() -> None:
    (origin, reference), *others = rayjob_specs()
    for other_origin, other in others:
        assert other == reference, f"{other_origin} differs from {origin}: change them together"


def test_plain_cronjob_forbids_overlap_and_may_create_rayjobs() -> None:
    (cron,) = of_kind("CronJob")
    spec = cron.body["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    # The pod waits for its RayJob, so its deadline must outlast the RayJob's.
    (_, rayjob), *_ = rayjob_specs()
    assert spec["jobTemplate"]["spec"]["activeDeadlineSeconds"] > rayjob["activeDeadlineSeconds"]

    account = pod["serviceAccountName"]
    assert account in {d.name for d in of_kind("ServiceAccount")}
    bindings = [
        d.body
        for d in of_kind("RoleBinding")
        if any(s["kind"] == "ServiceAccount" and s["name"] == account for s in d.body["subjects"])
    ]
    assert bindings, f"no RoleBinding for ServiceAccount {account}"
    roles = {d.name: d.body for d in of_kind("Role")}
    rules = [rule for b in bindings for rule in roles[b["roleRef"]["name"]]["rules"]]
    for verb in ("create", "get"):
        assert any("ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and verb in r["verbs"] for r in rules), (
            f"the CronJob's ServiceAccount may not {verb} rayjobs.ray.io"
        )

    # `kubectl create -f FILE` must find a RayJob template with a generated name in the mounted ConfigMap.
    (container,) = pod["containers"]
    script = "\n".join(container.get("command", []) + container.get("args", []))
    (template_path,) = re.findall(r"kubectl create -f (\S+)", script)
    template = list(yaml.safe_load_all(mounted_file(pod, template_path)))
    assert [t["kind"] for t in template] == ["RayJob"]
    assert "generateName" in template[0]["metadata"], "a fixed name would fail on the second night"


def test_raycronjob_has_a_schedule_and_notes_its_feature_gate() -> None:
    (cron,) = of_kind("RayCronJob")
    assert len(cron.body["spec"]["schedule"].split()) == 5
    assert "feature gate" in (KUBERAY / "raycronjob.yaml").read_text()


def image_refs() -> list[tuple[str, str]]:
    refs = []

    def walk(origin: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "image" and isinstance(value, str):
                    refs.append((origin, value))
                walk(origin, value)
        elif isinstance(node, list):
            for item in node:
                walk(origin, item)

    for doc in DOCS:
        walk(doc.origin, doc.body)
    launcher = yaml.safe_load(LAUNCHER.read_text())
    walk("aws.yaml", launcher["docker"])
    refs += [("Dockerfile", ref) for ref in re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), flags=re.M)]
    return refs


def test_every_image_is_pinned() -> None:
    refs = image_refs()
    assert len(refs) >= 10
    for origin, ref in refs:
        name, _, digest = ref.partition("@")
        tag = name.rpartition(":")[2] if ":" in name.rpartition("/")[2] else ""
        assert digest or (tag and tag != "latest"), f"{origin}: image {ref} is not pinned to a tag or digest"
    ours = {ref for _, ref in refs if "blipbatch" in ref}
    assert len(ours) == 1, f"every manifest should run the same blipbatch image, found {sorted(ours)}"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_runs_as_non_root_and_pins_what_matters() -> None:
    steps = dockerfile_instructions()
    kinds = [kind for kind, _ in steps]
    (base,) = [arg for kind, arg in steps if kind == "FROM"]
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    users = [arg for kind, arg in steps if kind == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    assert kinds.index("USER") < kinds.index("ENTRYPOINT")
    assert ("WORKDIR", "/app") in steps
    assert ("ENTRYPOINT", '["blipbatch"]') in steps
    installs = " ".join(arg for kind, arg in steps if kind == "RUN" and "pip install" in arg)
    assert f'"ray[default]=={ray.__version__}"' in installs
    assert re.search(r'"torch==[\d.]+"', installs)
    assert "-r /tmp/requirements.txt" in installs


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_image_requirements_pin_every_dependency_of_the_project() -> None:
    pins = {}
    for line in (INFRA / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[\d.]+", version), f"infra/requirements.txt: {line!r} is not pinned"
            pins[normalize(name)] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    needed = {normalize(re.split(r"[\[<>=!~ ;]", dep, maxsplit=1)[0]) for dep in project} - {"torch", "ray"}
    assert needed <= set(pins), f"not pinned for the image: {sorted(needed - set(pins))}"


def test_cluster_launcher_config_is_valid_for_ray_up() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` checks before it launches anything
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for t in workers)
    assert config["file_mounts"] == {"~/blipbatch": "."}
    assert any("pip install" in c and "~/blipbatch" in c for c in config["setup_commands"])
    assert ".venv" in config["rsync_exclude"]
    # Ray runs `docker run ... IMAGE bash`; with our image's ENTRYPOINT that would be `blipbatch bash`.
    assert '--entrypoint=""' in config["docker"]["run_options"]


def test_the_image_has_what_kuberays_probes_run() -> None:
    """KubeRay's default readiness and liveness probes of Ray containers are exec probes that run `wget` against the
    raylet's and dashboard agent's health endpoints: an image without it never becomes ready."""
    installs = " ".join(arg for kind, arg in dockerfile_instructions() if kind == "RUN" and "apt-get install" in arg)
    assert re.search(r"\bwget\b", installs), installs


# ---------------------------------------------------------------------------------------------------
# Tests: every manifest against a schema, as the API server would check it

KUBERAY_CRDS = Path(__file__).parent / "schemas" / "kuberay-v1.6.2"


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema of each version of KubeRay's CRDs (tests/schemas: v1.6.2, unchanged)."""
    schemas = {}
    for path in sorted(KUBERAY_CRDS.glob("*.yaml.gz")):
        crd = yaml.load(gzip.decompress(path.read_bytes()), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        for version in crd["spec"]["versions"]:
            api_version = f"{crd['spec']['group']}/{version['name']}"
            schemas[(api_version, crd["spec"]["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    return schemas


def kubernetes_validate() -> Any:
    """The Kubernetes API's schemas (the `[test]` extra installs kubernetes-validate; a venv made before it was added
    skips these checks, saying so)."""
    return pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]' installs kubernetes-validate")


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: f"{d.origin}:{d.kind}/{d.name}")
def test_every_manifest_is_valid_against_its_schema(doc: Doc) -> None:
    """Kubernetes objects against the API's JSON schema (kubernetes-validate, strict: no unknown field); KubeRay's
    against the schema of its CRD, unknown fields refused as the API server's pruning would drop them."""
    if doc.body["apiVersion"].startswith("ray.io/"):
        schema = crd_schemas()[(doc.body["apiVersion"], doc.kind)]
        validator = jsonschema.Draft7Validator(strict_objects(schema))
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc.body)]
        assert errors == [], f"{doc.origin}: {doc.kind} {doc.name} does not match KubeRay v1.6.2's CRD"
    else:
        validate = kubernetes_validate()
        validate.validate(doc.body, validate.latest_version(), strict=True)


def strict_objects(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with every object that lists its properties closed to others (structural schemas prune unknown
    fields, so a misspelt key in a manifest would be dropped without a word), `metadata` left open."""
    schema = dict(schema)
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    for key in ("properties", "patternProperties"):
        if key in schema:
            schema[key] = {
                name: sub if name == "metadata" else strict_objects(sub) for name, sub in schema[key].items()
            }
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = strict_objects(schema[key])
    return schema


def test_the_schema_check_catches_a_misspelt_key() -> None:
    (rayjob,) = [d for d in DOCS if d.kind == "RayJob" and d.origin == "rayjob.yaml"]
    body = copy.deepcopy(rayjob.body)
    body["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    validator = jsonschema.Draft7Validator(strict_objects(crd_schemas()[("ray.io/v1", "RayJob")]))
    assert any("maxReplica" in e.message for e in validator.iter_errors(body))
    configmap = copy.deepcopy(next(d.body for d in DOCS if d.kind == "ConfigMap"))
    configmap["dta"] = configmap.pop("data")
    validate = kubernetes_validate()
    with pytest.raises(validate.ValidationError):
        validate.validate(configmap, validate.latest_version(), strict=True)
