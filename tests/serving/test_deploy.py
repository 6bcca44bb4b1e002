"""deploy/: the Kubernetes manifests validate against the Kubernetes schemas (offline, no
cluster), agree with each other and with ember's own flags, metrics and install steps."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from ember.cli import build_parser
from ember.server.launch import API_KEY_ENV
from ember.server.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.37.0"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if d]


def _by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


MANIFESTS = sorted(p.name for p in (DEPLOY / "kubernetes").glob("*.yaml"))


def _pod_templates(ray_service: dict) -> list[dict]:
    cluster = ray_service["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"],
            *(group["template"] for group in cluster["workerGroupSpecs"])]


def _validate(doc: dict) -> None:
    # strict: a misspelt or misplaced field is an error, not ignored
    if doc["kind"] == "RayService":
        # KubeRay's resource: its pods against Kubernetes' schemas (as PodTemplates)
        for template in _pod_templates(doc):
            kubernetes_validate.validate(
                {"apiVersion": "v1", "kind": "PodTemplate",
                 "metadata": {"name": doc["metadata"]["name"]}, "template": template},
                KUBERNETES_VERSION, strict=True)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifests_validate_against_the_kubernetes_schemas(name):
    for doc in _docs(name):
        _validate(doc)


def test_schema_validation_catches_a_bad_field():
    deployment = _by_kind(_docs("ember.yaml"))["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"][
        "paht"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)
    ray_service = _by_kind(_docs("rayservice.yaml"))["RayService"]
    _pod_templates(ray_service)[1]["spec"]["containers"][0]["resources"]["limit"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(ray_service)


def _serve_args(argv: list[str]):
    args = build_parser().parse_args(argv)  # exits (SystemExit) on an unknown flag
    assert args.command == "serve"
    return args


def test_deployment_runs_ember_serve_as_the_service_expects():
    kinds = _by_kind(_docs("ember.yaml"))
    deployment, service = kinds["Deployment"], kinds["Service"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    args = _serve_args(container["args"])
    assert args.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == args.port
    # the Service reaches those pods on that port
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports) | set(ports.values())
    # probes on /health (503 while loading, 200 when serving), on a port the container opens
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ports
    # the API key from a Secret, through the variable `ember serve` reads
    env = {e["name"]: e for e in container["env"]}
    assert env[API_KEY_ENV]["valueFrom"]["secretKeyRef"]["key"]
    assert container["resources"]["limits"]["cpu"] and container["resources"]["requests"]["memory"]
    # SIGTERM's grace: ember's own, within the pod's
    assert args.shutdown_grace < pod["spec"]["terminationGracePeriodSeconds"]


def test_autoscaler_scales_the_deployment_on_a_metric_ember_exports():
    hpa = _by_kind(_docs("hpa.yaml"))["HorizontalPodAutoscaler"]
    rules = yaml.safe_load(_by_kind(_docs("hpa.yaml"))["ConfigMap"]["data"]["config.yaml"])
    deployment = _by_kind(_docs("ember.yaml"))["Deployment"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    hpa_name = metric["pods"]["metric"]["name"]
    (rule,) = [r for r in rules["rules"] if r["name"]["as"] == hpa_name]
    source = re.fullmatch(r"\^(.+)\$", rule["name"]["matches"]).group(1)
    assert rule["seriesQuery"].startswith(source + "{")
    exported = {m.name for m in ServerMetrics("m").registry.collect()}
    assert source in exported


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_installs_with_the_makefile_and_serves():
    instructions = _dockerfile_instructions()
    runs = [rest for word, rest in instructions if word == "RUN"]
    makefile = (ROOT / "Makefile").read_text()
    # the Makefile's own install target, not a second copy of its steps: no pip of its own,
    # and what it sets on make's command line are the Makefile's settings
    assert re.search(r"^install:", makefile, re.M)
    (install,) = [r for r in runs if r.startswith("make install")]
    assert not any("pip" in r for r in runs)
    settings = dict(a.split("=", 1) for a in shlex.split(install.split("&&")[0])[2:])
    assert {"PYTHON", "TORCH_SPEC", "CHROMIUM"} <= set(settings)
    for name in settings:
        assert re.search(rf"^{name} \?=", makefile, re.M), name
    assert settings["CHROMIUM"] == "no"  # a server image needs no browser
    assert '"$(CHROMIUM)" != no' in makefile
    # the caches `make install` fills as root belong to the user the server runs as
    env = dict(re.findall(r"(\w+)=(\S+)", dict(instructions)["ENV"]))
    owned = re.search(r"chown -R ember (\S+)", install).group(1)
    for cache in ("EMBER_KERNELS_CACHE", "EMBER_MODELS_CACHE", "TORCHINDUCTOR_CACHE_DIR"):
        assert env[cache].startswith(owned + "/"), cache
    entry = json.loads(dict(instructions)["ENTRYPOINT"])
    cmd = json.loads(dict(instructions)["CMD"])
    assert entry == ["ember"]
    args = _serve_args(cmd)
    exposed = [int(p) for word, rest in instructions if word == "EXPOSE" for p in rest.split()]
    assert args.port in exposed and args.host == "0.0.0.0"
    # the image's default torch is the CPU build; a CUDA base is a build argument
    args_by_name = {shlex.split(rest)[0].split("=")[0]: rest for word, rest in instructions
                    if word == "ARG"}
    assert {"BASE", "TORCH_SPEC"} <= set(args_by_name)
    assert "/cpu" in args_by_name["TORCH_SPEC"]


def test_ray_service_runs_the_replicas_application():
    from ember.serving.ray import parse_settings

    ray_service = _by_kind(_docs("rayservice.yaml"))["RayService"]
    assert ray_service["apiVersion"] == "ray.io/v1"
    spec = ray_service["spec"]
    (app,) = yaml.safe_load(spec["serveConfigV2"])["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == ("ember.serving.ray", "build_app")
    _, replicas, _ = parse_settings(app["args"])  # the settings are ember serve's own
    assert replicas.autoscaling and replicas.min_replicas <= replicas.max_replicas
    import ray

    assert spec["rayClusterConfig"]["rayVersion"] == ray.__version__
    head, *workers = _pod_templates(ray_service)
    env = {e["name"]: e for e in head["spec"]["containers"][0]["env"]}
    assert env[API_KEY_ENV]["valueFrom"]["secretKeyRef"]["key"]
    for template, group in zip(workers, spec["rayClusterConfig"]["workerGroupSpecs"]):
        (container,) = template["spec"]["containers"]
        # a worker pod's Ray CPUs are its cores, and a replica's threads fit in them
        cores = int(container["resources"]["limits"]["cpu"])
        assert int(group["rayStartParams"]["num-cpus"]) == cores
        assert replicas.replica_threads <= cores


def test_build_app_settings_are_checked():
    from ember.errors import ConfigError
    from ember.serving.ray import parse_settings

    config, replicas, server = parse_settings(
        {"data_parallel_size": "2", "enforce_eager": "true", "api_key": "k", "router": "pow2"})
    assert (replicas.data_parallel_size, config.enforce_eager, server.api_key) == (2, True, "k")
    with pytest.raises(ConfigError, match="unknown setting.*data_paralel_size"):
        parse_settings({"data_paralel_size": 2})
    with pytest.raises(ConfigError, match="enforce_eager must be true or false"):
        parse_settings({"enforce_eager": "yes"})
    with pytest.raises(ConfigError, match="router must be"):
        parse_settings({"router": "random"})
