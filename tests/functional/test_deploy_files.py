"""The deployment files in deploy/container, deploy/compose, deploy/kubernetes and
deploy/systemd (docs/deploy.md): they parse, the gateway configs in them pass
``gateway check``, and what one file assumes about another holds: probe ports and
paths, grace periods against drain_timeout, the config path the image runs with
and where compose and Kubernetes mount it, the Prometheus that compose runs.

No container engine is needed: the Dockerfile and the compose/Kubernetes manifests
are read, not run. The compose gateway config itself is run, twice, on one real
redis-server. promtool and systemd-analyze must be installed (they are not skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import glob
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import GatewayConfig
from gateway.config.load import parse_config
from gateway.workers import EXIT_MARGIN_SECONDS
from tests.conftest import RedisServer, TlsFiles
from tests.helpers import (
    GATEWAY,
    POLL_INTERVAL,
    assert_succeeded,
    base_url,
    bucket,
    free_port,
    gateway_run,
    http_status,
    run,
    tool,
)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "container" / "Dockerfile"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
COMPOSE_GATEWAY_CONFIG = COMPOSE_DIR / "gateway.yaml"
# Two replicas of a backend behind one gateway (upstream.servers).
REPLICAS_FILE = COMPOSE_DIR / "replicas.yml"
REPLICAS_GATEWAY_CONFIG = COMPOSE_DIR / "replicas-gateway.yaml"
KUBERNETES_DIR = DEPLOY / "kubernetes"
COMPOSE_TLS_FILE = COMPOSE_DIR / "docker-compose.tls.yml"
COMPOSE_TLS_CONFIG = COMPOSE_DIR / "gateway-tls.yaml"
KUBERNETES_TLS_FILE = KUBERNETES_DIR / "tls" / "gateway-tls.yaml"
SYSTEMD_UNIT = DEPLOY / "systemd" / "ratelimit-gateway.service"
EXAMPLE_CONFIG = REPO / "config" / "gateway.yaml"  # what the systemd unit's docs install
PROMETHEUS_RULES = DEPLOY / "prometheus" / "rules"
ALERT_RULES = PROMETHEUS_RULES / "gateway-alerts.yml"

UNIT_GATEWAY = "/opt/ratelimit-gateway/.venv/bin/gateway"
GATEWAY_SERVICES = ("gateway-a", "gateway-b")
PROMETHEUS_JOB = "ratelimit-gateway"  # what deploy/prometheus/rules select on
CLI_TIMEOUT_SECONDS = 30
GUARD_SECONDS = 15.0  # a bound so that a hang fails clearly; never a timing target

YAML_FILES = sorted(
    [*COMPOSE_DIR.glob("*.y*ml"), *KUBERNETES_DIR.glob("**/*.y*ml")], key=lambda p: str(p)
)


# -- durations ------------------------------------------------------------------------

_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)")
_SYSTEMD_UNITS = {
    **dict.fromkeys(("us", "usec"), 1e-6),
    **dict.fromkeys(("ms", "msec"), 1e-3),
    **dict.fromkeys(("", "s", "sec", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
    **dict.fromkeys(("w", "week", "weeks"), 604800.0),
}
_SYSTEMD_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)")


def go_duration(text: str) -> float:
    """Seconds in a Go duration, as compose's stop_grace_period takes it: ``45s``,
    ``1m30s``."""
    parts = _GO_PART.findall(text)
    assert parts, f"not a duration: {text!r}"
    assert "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * _GO_UNITS[u] for n, u in parts)


def systemd_timespan(text: str) -> float:
    """Seconds in a systemd time span (systemd.time(7)): ``45``, ``45s``,
    ``1min 30s``, ``1min30s``."""
    total, position = 0.0, 0
    text = text.strip()
    assert text, "empty time span"
    while position < len(text):
        match = _SYSTEMD_PART.match(text, position)
        assert match is not None, f"not a time span: {text!r}"
        number, unit = match.groups()
        assert unit in _SYSTEMD_UNITS, f"unknown unit {unit!r} in {text!r}"
        total += float(number) * _SYSTEMD_UNITS[unit]
        position = match.end()
    return total


# -- readers --------------------------------------------------------------------------


def yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return document


def kubernetes_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, metadata.name) -> object, over every manifest in deploy/kubernetes."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(KUBERNETES_DIR.glob("*.y*ml")):
        for doc in yaml_documents(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} defined twice"
            objects[key] = doc
    return objects


def gateway_deployment() -> dict[str, Any]:
    return kubernetes_objects()[("Deployment", "ratelimit-gateway")]


def gateway_container() -> dict[str, Any]:
    containers = gateway_deployment()["spec"]["template"]["spec"]["containers"]
    (container,) = (c for c in containers if c["name"] == "gateway")
    return dict(container)


def configmap_volume() -> tuple[dict[str, Any], dict[str, Any]]:
    """The Deployment's configMap volume and the ConfigMap it names."""
    pod = gateway_deployment()["spec"]["template"]["spec"]
    (volume,) = (v for v in pod["volumes"] if "configMap" in v)
    configmap = kubernetes_objects()[("ConfigMap", volume["configMap"]["name"])]
    return volume, configmap


def kubernetes_config_text() -> str:
    _, configmap = configmap_volume()
    text: str = configmap["data"]["gateway.yaml"]
    return text


def kubernetes_config() -> GatewayConfig:
    return parse_config(kubernetes_config_text(), "configmap:gateway.yaml")


def compose_config() -> GatewayConfig:
    return parse_config(COMPOSE_GATEWAY_CONFIG.read_text(), str(COMPOSE_GATEWAY_CONFIG))


def container_configs() -> dict[str, GatewayConfig]:
    return {"compose": compose_config(), "kubernetes": kubernetes_config()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        pending = ""
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def only(instructions: list[tuple[str, str]], keyword: str) -> str:
    found = [arguments for k, arguments in instructions if k == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {found}"
    return found[0]


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"not the exec (JSON) form: {arguments}"
    assert all(isinstance(v, str) for v in value)
    return value


def option_value(argv: list[str], option: str) -> str:
    assert option in argv, f"{option} missing from {argv}"
    return argv[argv.index(option) + 1]


def docker_config_path() -> str:
    return option_value(exec_form(only(final_stage(), "CMD")), "--config")


def healthcheck_command() -> list[str]:
    arguments = only(final_stage(), "HEALTHCHECK")
    options, separator, command = arguments.partition("CMD ")
    assert separator, f"HEALTHCHECK without CMD: {arguments}"
    assert all(o.startswith("--") for o in options.split()), options
    return exec_form(command)


def unit_entries() -> list[tuple[str, str, str]]:
    """(section, key, value) of the systemd unit, in order, repeated keys kept."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    pending = ""
    for raw in SYSTEMD_UNIT.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        key, separator, value = (pending + line).partition("=")
        pending = ""
        assert separator, f"not KEY=VALUE: {line!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_values(key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in unit_entries() if s == section and k == key]


def unit_value(key: str, section: str = "Service") -> str:
    values = unit_values(key, section)
    assert len(values) == 1, f"expected one {key}= in [{section}], found {values}"
    return values[0]


def unit_command(value: str) -> list[str]:
    """An Exec*= line's argv, without systemd's prefixes (-, @, :, +, !)."""
    return shlex.split(value.lstrip("-@:+!"))


def volume_mount(spec: str) -> tuple[str, str]:
    """(source, target) of a compose short-syntax volume ``SRC:DST[:MODE]``."""
    source, target, *_ = spec.split(":")
    return source, target


# -- parsing --------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    documents = yaml_documents(path)
    assert documents, f"{path} holds no YAML document"
    assert all(isinstance(doc, dict) for doc in documents)


def test_the_yaml_files_are_the_expected_ones() -> None:
    names = {str(p.relative_to(DEPLOY)) for p in YAML_FILES}
    assert names >= {
        "compose/docker-compose.yml",
        "compose/gateway.yaml",
        "compose/replicas.yml",
        "compose/replicas-gateway.yaml",
        "kubernetes/gateway.yaml",
        "kubernetes/redis.yaml",
        "compose/docker-compose.tls.yml",
        "compose/gateway-tls.yaml",
        "kubernetes/tls/gateway-tls.yaml",
    }


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("45s", 45.0), ("1m30s", 90.0), ("500ms", 0.5), ("1h", 3600.0), ("1.5s", 1.5)],
)
def test_go_duration(text: str, seconds: float) -> None:
    assert go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("45", 45.0), ("45s", 45.0), ("1min 30s", 90.0), ("1min30s", 90.0), ("2h", 7200.0)],
)
def test_systemd_timespan(text: str, seconds: float) -> None:
    assert systemd_timespan(text) == pytest.approx(seconds)


# -- the gateway configs --------------------------------------------------------------


@pytest.fixture(params=["compose", "replicas", "kubernetes"])
def container_config_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The gateway config as the container sees it: compose's mounted file (the
    shared-redis example's or the replicas example's), or the Kubernetes
    ConfigMap's data written out."""
    if request.param == "compose":
        return COMPOSE_GATEWAY_CONFIG
    if request.param == "replicas":
        return REPLICAS_GATEWAY_CONFIG
    path = tmp_path / "gateway.yaml"
    path.write_text(kubernetes_config_text())
    return path


def test_container_config_passes_gateway_check(container_config_file: Path) -> None:
    result = run(
        [GATEWAY, "check", "--config", str(container_config_file)], timeout=CLI_TIMEOUT_SECONDS
    )
    assert_succeeded(result)
    assert ": ok (" in result.stdout


@pytest.mark.parametrize("name", ["compose", "kubernetes"])
def test_container_config_shares_buckets_through_redis(name: str) -> None:
    config = container_configs()[name]
    assert config.storage.backend == "redis"
    assert config.storage.on_error == "local"
    assert urlsplit(config.storage.redis_url).hostname == "redis"


@pytest.mark.parametrize("name", ["compose", "kubernetes"])
def test_container_config_listens_on_every_interface(name: str) -> None:
    """Probes and Prometheus come from outside the container: 127.0.0.1 would hide
    the admin listener from them (the Dockerfile's HEALTHCHECK would still pass)."""
    config = container_configs()[name]
    assert config.listen_host in {"0.0.0.0", "::"}
    assert config.admin_host in {"0.0.0.0", "::"}


# -- Dockerfile -----------------------------------------------------------------------


def test_dockerfile_builds_on_python_slim_and_installs_the_project() -> None:
    instructions = dockerfile_instructions()
    images = [args.split()[0] for keyword, args in instructions if keyword == "FROM"]
    assert images, "no FROM"
    assert set(images) == {"python:3.11-slim"}
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert re.search(r"\bpip install \.(\s|$)", runs), runs


def test_dockerfile_copies_only_what_exists() -> None:
    """Build context = the repository root (docs/deploy.md): every COPY source exists."""
    for keyword, arguments in dockerfile_instructions():
        if keyword != "COPY" or arguments.startswith("--from"):
            continue
        *sources, _destination = arguments.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def test_dockerfile_runs_gateway_as_non_root() -> None:
    stage = final_stage()
    user = only(stage, "USER").split(":")[0]
    assert user not in {"root", "0"}
    # Kubernetes' runAsNonRoot can only verify a numeric uid; the pod runs as the same.
    assert user.isdigit()
    pod_security = gateway_deployment()["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsUser"] == int(user)
    assert exec_form(only(stage, "ENTRYPOINT")) == ["gateway"]
    assert exec_form(only(stage, "CMD")) == ["run", "--config", "/etc/gateway/gateway.yaml"]
    assert only(stage, "STOPSIGNAL") == "SIGTERM"


@pytest.mark.parametrize("name", ["compose", "kubernetes"])
def test_dockerfile_exposes_the_container_configs_ports(name: str) -> None:
    config = container_configs()[name]
    exposed = set(only(final_stage(), "EXPOSE").split())
    assert exposed == {"8080", "9090"}
    assert {str(config.listen_port), str(config.admin_port)} == exposed


@pytest.mark.parametrize("name", ["compose", "kubernetes"])
def test_healthcheck_probes_healthz_on_the_admin_port(name: str) -> None:
    command = healthcheck_command()
    assert command[0] in {"python", "python3"}
    assert command[1] == "-c"
    code = command[2]
    assert "urllib" in code
    compile(code, "HEALTHCHECK", "exec")
    urls = re.findall(r"http://[^'\"\s]+", code)
    assert urls == [f"http://127.0.0.1:{container_configs()[name].admin_port}/healthz"]


def test_config_path_matches_where_compose_and_kubernetes_mount_it() -> None:
    path = docker_config_path()
    assert path == "/etc/gateway/gateway.yaml"
    # compose: both gateways mount deploy/compose/gateway.yaml there, and keep the CMD.
    services = compose()["services"]
    for name in GATEWAY_SERVICES:
        service = services[name]
        mounts = dict(volume_mount(v)[::-1] for v in service["volumes"])
        assert path in mounts, f"{name} mounts nothing at {path}"
        assert (COMPOSE_DIR / mounts[path]).resolve() == COMPOSE_GATEWAY_CONFIG
        if "command" in service:
            assert option_value(list(service["command"]), "--config") == path
    # Kubernetes: the ConfigMap volume's mountPath + item path, and the args.
    volume, configmap = configmap_volume()
    container = gateway_container()
    (mount,) = (m for m in container["volumeMounts"] if m["name"] == volume["name"])
    items = volume["configMap"].get("items") or [
        {"key": k, "path": k} for k in configmap["data"]
    ]
    mounted = {
        str(PurePosixPath(mount["mountPath"]) / item["path"]): item["key"] for item in items
    }
    assert mounted.get(path) == "gateway.yaml"
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    assert mount.get("readOnly") is True
    if "args" in container:
        assert option_value(container["args"], "--config") == path


# -- compose --------------------------------------------------------------------------


def test_compose_runs_two_gateways_redis_an_upstream_and_prometheus() -> None:
    services = compose()["services"]
    assert set(services) >= {*GATEWAY_SERVICES, "redis", "upstream", "prometheus"}
    assert services["upstream"]["image"] == "nginx:alpine"
    config = compose_config()
    assert urlsplit(config.upstream.url).hostname == "upstream"
    assert urlsplit(config.storage.redis_url).hostname == "redis"
    for name in GATEWAY_SERVICES:
        service = services[name]
        build = service["build"]
        assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert "redis" in service["depends_on"]


def test_compose_publishes_admin_ports_on_loopback_only() -> None:
    admin_port = str(compose_config().admin_port)
    for name in GATEWAY_SERVICES:
        for spec in compose()["services"][name].get("ports", []):
            *host, container_port = str(spec).split(":")
            if container_port == admin_port:
                assert host[:1] == ["127.0.0.1"], f"{name} publishes {spec} beyond loopback"


def test_compose_prometheus_scrapes_both_gateways_and_loads_the_rules(
    tmp_path: Path,
) -> None:
    document = compose()
    service = document["services"]["prometheus"]
    (config_ref,) = (c for c in service["configs"] if c["target"].endswith("prometheus.yml"))
    assert (
        option_value(
            [part for arg in service["command"] for part in arg.split("=", 1)], "--config.file"
        )
        == (config_ref["target"])
    )
    prometheus = yaml.safe_load(document["configs"][config_ref["source"]]["content"])

    (job,) = prometheus["scrape_configs"]
    assert job["job_name"] == PROMETHEUS_JOB
    assert f'job="{PROMETHEUS_JOB}"' in ALERT_RULES.read_text()
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    admin_port = compose_config().admin_port
    assert targets == {f"{name}:{admin_port}" for name in GATEWAY_SERVICES}

    # rule_files, resolved through the service's bind mounts, are deploy/prometheus/rules.
    mounts = [volume_mount(v) for v in service["volumes"]]
    resolved: list[str] = []
    for pattern in prometheus["rule_files"]:
        matches = [(s, t) for s, t in mounts if pattern.startswith(t.rstrip("/") + "/")]
        assert matches, f"rule file {pattern} is not under a mounted directory"
        source, target = matches[0]
        resolved.append(str((COMPOSE_DIR / source).resolve()) + pattern[len(target) :])
    loaded = sorted(Path(p) for pattern in resolved for p in glob.glob(pattern))
    assert loaded == sorted(PROMETHEUS_RULES.glob("*.yml"))

    # The same config, its rule paths resolved, is one Prometheus accepts.
    prometheus["rule_files"] = resolved
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(prometheus))
    assert_succeeded(
        run(
            [tool("promtool"), "check", "config", str(config_path)], timeout=CLI_TIMEOUT_SECONDS
        )
    )


# -- Kubernetes -----------------------------------------------------------------------


def resolve_port(port: int | str) -> int:
    if isinstance(port, int):
        return port
    (named,) = (p for p in gateway_container()["ports"] if p["name"] == port)
    return int(named["containerPort"])


def test_kubernetes_probes_use_the_configmaps_admin_port() -> None:
    config = kubernetes_config()
    container = gateway_container()
    liveness = container["livenessProbe"]["httpGet"]
    readiness = container["readinessProbe"]["httpGet"]
    assert liveness["path"] == "/healthz"
    assert readiness["path"] == "/readyz"
    assert resolve_port(liveness["port"]) == config.admin_port
    assert resolve_port(readiness["port"]) == config.admin_port
    ports = {p["containerPort"] for p in container["ports"]}
    assert ports == {config.listen_port, config.admin_port} == {8080, 9090}


def test_kubernetes_deployment_shape() -> None:
    deployment = gateway_deployment()
    assert deployment["spec"]["replicas"] == 2
    template = deployment["spec"]["template"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(kubernetes_config().admin_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    container = gateway_container()
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    # A read-only root needs a writable /tmp (the supervisor's metrics, tempfiles).
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts


def prestop_sleep_seconds(container: dict[str, Any]) -> float:
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:  # the native sleep action (Kubernetes 1.30+)
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] in {"sleep", "/bin/sleep"}, command
    return float(command[1])


def test_kubernetes_prestop_sleeps_before_the_drain() -> None:
    assert 1 <= prestop_sleep_seconds(gateway_container()) <= 15


def test_kubernetes_service_and_disruption_budget_select_the_gateway_pods() -> None:
    objects = kubernetes_objects()
    labels = gateway_deployment()["spec"]["template"]["metadata"]["labels"]
    service = objects[("Service", "ratelimit-gateway")]
    assert service["spec"]["selector"].items() <= labels.items()
    named_ports = {p["name"]: p["containerPort"] for p in gateway_container()["ports"]}
    (port,) = service["spec"]["ports"]
    assert named_ports[port["targetPort"]] == kubernetes_config().listen_port
    pdbs = [doc for (kind, _), doc in objects.items() if kind == "PodDisruptionBudget"]
    (pdb,) = pdbs
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_kubernetes_redis_is_what_the_configmap_points_at() -> None:
    objects = kubernetes_objects()
    url = urlsplit(kubernetes_config().storage.redis_url)
    service = objects[("Service", url.hostname or "")]
    (port,) = service["spec"]["ports"]
    assert port["port"] == (url.port or 6379)
    deployment = objects[("Deployment", url.hostname or "")]
    assert deployment["spec"]["replicas"] == 1
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert "managed" in (KUBERNETES_DIR / "redis.yaml").read_text()


def test_kubernetes_documents_how_a_config_change_reaches_the_pods() -> None:
    text = (KUBERNETES_DIR / "gateway.yaml").read_text()
    assert "rollout restart" in text
    assert "SIGHUP" in text


# -- grace periods against drain_timeout ----------------------------------------------


def test_kubernetes_grace_period_covers_prestop_and_drain() -> None:
    """The grace period starts before preStop: it must cover the sleep, the drain and
    the exit margin, or the kubelet SIGKILLs a draining gateway."""
    drain = kubernetes_config().drain_timeout_seconds
    grace = gateway_deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    sleep = prestop_sleep_seconds(gateway_container())
    assert grace > sleep + drain
    assert grace >= sleep + drain + EXIT_MARGIN_SECONDS


def test_compose_stop_grace_period_exceeds_drain_timeout() -> None:
    drain = compose_config().drain_timeout_seconds
    for name in GATEWAY_SERVICES:
        grace = go_duration(compose()["services"][name]["stop_grace_period"])
        assert grace > drain
        assert grace >= drain + EXIT_MARGIN_SECONDS


def test_systemd_timeout_stop_exceeds_drain_timeout() -> None:
    drain = parse_config(EXAMPLE_CONFIG.read_text(), str(EXAMPLE_CONFIG)).drain_timeout_seconds
    timeout = systemd_timespan(unit_value("TimeoutStopSec"))
    assert timeout > drain
    assert timeout >= drain + EXIT_MARGIN_SECONDS


# -- systemd --------------------------------------------------------------------------


def test_systemd_unit_checks_the_config_it_runs() -> None:
    assert unit_value("Type") == "exec"
    start = unit_command(unit_value("ExecStart"))
    assert start[:2] == [UNIT_GATEWAY, "run"]
    config = option_value(start, "--config")
    assert config == "/etc/ratelimit-gateway/gateway.yaml"
    checks = [unit_command(v) for v in unit_values("ExecStartPre")]
    assert [UNIT_GATEWAY, "check", "--config", config] in checks


def test_systemd_unit_reloads_with_sighup() -> None:
    reloads = [unit_command(v) for v in unit_values("ExecReload")]
    kills = [argv for argv in reloads if "-HUP" in argv]
    assert kills == [["/bin/kill", "-HUP", "$MAINPID"]]
    assert unit_value("KillSignal") == "SIGTERM"
    # Only the main process: a supervisor's workers must not get a second SIGTERM.
    assert unit_value("KillMode") == "mixed"


def test_systemd_unit_restarts_limits_and_hardening() -> None:
    assert unit_value("Restart") == "on-failure"
    assert unit_value("LimitNOFILE") == "65536"
    assert unit_values("DynamicUser") == ["yes"] or unit_values("User") not in ([], ["root"])
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert unit_value(key) == value, key


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """With the /opt path pointed at this checkout's gateway (verify insists the
    binaries exist). It exits 0 even for unknown keys, so no line may name the unit."""
    unit = tmp_path / SYSTEMD_UNIT.name
    unit.write_text(SYSTEMD_UNIT.read_text().replace(UNIT_GATEWAY, GATEWAY))
    result = run(
        [tool("systemd-analyze"), "verify", "--man=no", str(unit)], timeout=CLI_TIMEOUT_SECONDS
    )
    assert_succeeded(result)
    complaints = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if SYSTEMD_UNIT.name in line or str(unit) in line
    ]
    assert complaints == []


# -- compose: two replicas behind one gateway -----------------------------------------


def replicas_compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(REPLICAS_FILE.read_text())
    return document


def replicas_config() -> GatewayConfig:
    return parse_config(REPLICAS_GATEWAY_CONFIG.read_text(), str(REPLICAS_GATEWAY_CONFIG))


def test_replicas_compose_puts_one_gateway_before_every_replica_it_names() -> None:
    """The gateway's servers are the compose services of the replicas (names and
    the port their nginx image listens on), and nothing else."""
    services = replicas_compose()["services"]
    config = replicas_config()
    servers = [urlsplit(url) for url in config.upstream.servers]
    assert len(servers) == 2
    replicas = {server.hostname for server in servers}
    assert replicas == {name for name in services if name != "gateway"}
    for server in servers:
        assert services[server.hostname]["image"] == "nginx:alpine"
        assert (server.port or 80) == 80
    assert config.upstream.health_check.path == "/"  # nginx serves its index there
    gateway = services["gateway"]
    assert set(gateway["depends_on"]) == replicas
    build = gateway["build"]
    assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    mounts = dict(volume_mount(v)[::-1] for v in gateway["volumes"])
    assert (COMPOSE_DIR / mounts[docker_config_path()]).resolve() == REPLICAS_GATEWAY_CONFIG
    assert config.listen_host == "0.0.0.0"
    assert config.admin_host == "0.0.0.0"
    grace = go_duration(gateway["stop_grace_period"])
    assert grace >= config.drain_timeout_seconds + EXIT_MARGIN_SECONDS
    for spec in gateway["ports"]:
        *host, container_port = str(spec).split(":")
        assert host[:1] == ["127.0.0.1"], f"{spec} is published beyond loopback"
        assert int(container_port) in {config.listen_port, config.admin_port}


def _named_app(name: str) -> web.Application:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text=f"{name}\n")

    app = web.Application()
    app.router.add_get("/{tail:.*}", page)
    return app


async def test_replicas_config_runs_round_robin_and_rides_out_a_stopped_replica(
    tmp_path: Path,
) -> None:
    """deploy/compose/replicas-gateway.yaml with only the addresses changed, run
    as `gateway run`: requests alternate over the two replicas; with one
    stopped every request is still answered (a refused connection goes on to
    the other replica) and the stopped one leaves the rotation
    (gateway_upstream_server_up 0, named by /readyz, which stays 200)."""
    replicas = [TestServer(_named_app(f"app-{i}"), host="127.0.0.1") for i in (1, 2)]
    for replica in replicas:
        await replica.start_server()
    config = yaml.safe_load(REPLICAS_GATEWAY_CONFIG.read_text())
    config["listen"] = f"127.0.0.1:{free_port()}"
    config["admin"] = f"127.0.0.1:{free_port()}"
    config["upstream"]["servers"] = [base_url(replica) for replica in replicas]
    config["access_log"]["path"] = str(tmp_path / "access.log")
    proxy, admin = f"http://{config['listen']}", f"http://{config['admin']}"
    stopped = f"127.0.0.1:{replicas[0].port}"
    try:
        async with (
            gateway_processes({"gateway": config}, tmp_path) as processes,
            aiohttp.ClientSession() as http,
        ):
            deadline = time.monotonic() + GUARD_SECONDS
            while await http_status(http, f"{admin}/readyz") != 200:
                assert processes["gateway"].returncode is None, "\n".join(output_of(tmp_path))
                assert time.monotonic() < deadline, "\n".join(output_of(tmp_path))
                await asyncio.sleep(POLL_INTERVAL)

            async def page() -> str:
                async with http.get(f"{proxy}/") as response:
                    assert response.status == 200
                    return (await response.text()).strip()

            assert [await page() for _ in range(4)] == ["app-1", "app-2"] * 2
            await replicas[0].close()
            assert [await page() for _ in range(6)] == ["app-2"] * 6
            async with http.get(f"{admin}/metrics") as response:
                text = await response.text()
            assert (
                f'gateway_upstream_server_up{{server="{stopped}",upstream="default"}} 0.0'
                in text
            )
            async with http.get(f"{admin}/readyz") as response:
                assert response.status == 200
                assert (await response.json())["servers_down"] == [stopped]
            processes["gateway"].send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(processes["gateway"].wait(), GUARD_SECONDS) == 0
    finally:
        for replica in replicas:
            await replica.close()
    records = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    assert all(r["status"] == 200 for r in records)
    assert any(r["upstream_addr"].startswith(f"{stopped}, ") for r in records)


# -- the compose config, run: two instances, one redis --------------------------------


async def run_healthcheck(admin: str) -> int:
    """The Dockerfile's HEALTHCHECK command, aimed at ``admin`` instead of 127.0.0.1:9090."""
    command = healthcheck_command()
    code = command[2].replace("http://127.0.0.1:9090", admin)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return await asyncio.wait_for(process.wait(), GUARD_SECONDS)


@contextlib.asynccontextmanager
async def gateway_processes(
    configs: dict[str, dict[str, Any]], tmp_path: Path
) -> AsyncIterator[dict[str, asyncio.subprocess.Process]]:
    processes: dict[str, asyncio.subprocess.Process] = {}
    async with contextlib.AsyncExitStack() as stack:
        for name, config in configs.items():
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump(config))
            with (tmp_path / f"{name}.out").open("wb") as output:
                processes[name] = await stack.enter_async_context(
                    gateway_run(path, stdout=output, stderr=output)
                )
        yield processes


def output_of(tmp_path: Path) -> Iterator[str]:
    for path in sorted(tmp_path.glob("*.out")):
        yield f"--- {path.name}\n{path.read_text(errors='replace')}"


async def test_compose_config_runs_as_two_instances_sharing_one_redis(
    tmp_path: Path, upstream: TestServer, redis_server: RedisServer
) -> None:
    """deploy/compose/gateway.yaml as gateway-a and gateway-b would run it, with only
    the addresses (and a small, slow-refilling default limit) changed: both ready,
    one client's requests alternated over both share one bucket, the image's health
    check passes, and SIGTERM drains and exits 0."""
    base = yaml.safe_load(COMPOSE_GATEWAY_CONFIG.read_text())
    max_tokens = 4
    configs: dict[str, dict[str, Any]] = {}
    for name in GATEWAY_SERVICES:
        config = copy.deepcopy(base)
        config["listen"] = f"127.0.0.1:{free_port()}"
        config["admin"] = f"127.0.0.1:{free_port()}"
        config["upstream"]["url"] = base_url(upstream)
        config["storage"]["redis_url"] = redis_server.url
        config["limits"]["default"] = bucket(max_tokens)
        config["access_log"]["path"] = str(tmp_path / f"{name}-access.log")
        configs[name] = config

    async with (
        gateway_processes(configs, tmp_path) as processes,
        aiohttp.ClientSession() as http,
    ):
        deadline = time.monotonic() + GUARD_SECONDS
        for name, config in configs.items():
            while await http_status(http, f"http://{config['admin']}/readyz") != 200:
                assert processes[name].returncode is None, "\n".join(output_of(tmp_path))
                assert time.monotonic() < deadline, "not ready\n" + "\n".join(
                    output_of(tmp_path)
                )
                await asyncio.sleep(POLL_INTERVAL)
            assert await http_status(http, f"http://{config['admin']}/healthz") == 200
            assert await run_healthcheck(f"http://{config['admin']}") == 0

        statuses = [
            await http_status(http, f"http://{configs[name]['listen']}/status/200")
            for _ in range(max_tokens)
            for name in GATEWAY_SERVICES
        ]
        # One bucket for both: max_tokens admitted in all (one more if an hourly
        # refill happens to fall inside the test), not max_tokens on each instance.
        assert set(statuses) <= {200, 429}, statuses
        assert max_tokens <= statuses.count(200) <= max_tokens + 1, statuses
        assert statuses[:max_tokens] == [200] * max_tokens

        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for name, process in processes.items():
            code = await asyncio.wait_for(process.wait(), GUARD_SECONDS)
            assert code == 0, f"{name} exited {code}\n" + "\n".join(output_of(tmp_path))
        assert await run_healthcheck(f"http://{configs['gateway-a']['admin']}") == 1


# -- the TLS variants: compose override, Kubernetes with a kubernetes.io/tls Secret ----


def tls_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, metadata.name) -> object of deploy/kubernetes/tls/gateway-tls.yaml."""
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml_documents(KUBERNETES_TLS_FILE)}


def tls_container(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    pod = objects[("Deployment", "ratelimit-gateway")]["spec"]["template"]["spec"]
    (container,) = (c for c in pod["containers"] if c["name"] == "gateway")
    return dict(container)


def tls_configmap_text() -> str:
    text: str = tls_objects()[("ConfigMap", "ratelimit-gateway-config")]["data"]["gateway.yaml"]
    return text


def with_pair(text: str, tls_files: TlsFiles) -> str:
    """A TLS config with the test's pair in place of the container's paths."""
    config = yaml.safe_load(text)
    config["tls"] = tls_files.config()
    return yaml.safe_dump(config)


def without_tls(text: str, listen: str) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(text)
    del config["tls"]
    config["listen"] = listen
    return config


def test_tls_configs_are_their_base_with_tls() -> None:
    """What differs between the TLS files and the plain ones: tls, the port."""
    assert without_tls(COMPOSE_TLS_CONFIG.read_text(), "0.0.0.0:8080") == yaml.safe_load(
        COMPOSE_GATEWAY_CONFIG.read_text()
    )
    assert without_tls(tls_configmap_text(), "0.0.0.0:8080") == yaml.safe_load(
        kubernetes_config_text()
    )


@pytest.mark.parametrize("source", ["compose", "kubernetes"])
def test_tls_config_passes_gateway_check_with_a_real_pair(
    source: str, tls_files: TlsFiles, tmp_path: Path
) -> None:
    text = COMPOSE_TLS_CONFIG.read_text() if source == "compose" else tls_configmap_text()
    path = tmp_path / "gateway.yaml"
    path.write_text(with_pair(text, tls_files))
    result = run([GATEWAY, "check", "--config", str(path)], timeout=CLI_TIMEOUT_SECONDS)
    assert_succeeded(result)
    config = parse_config(path.read_text(), str(path))
    assert config.tls is not None
    assert config.listen_port == 8443


def test_compose_tls_override_mounts_the_pair_where_the_config_reads_it() -> None:
    override = yaml.safe_load(COMPOSE_TLS_FILE.read_text())
    config = yaml.safe_load(COMPOSE_TLS_CONFIG.read_text())
    cert, key = PurePosixPath(config["tls"]["cert"]), PurePosixPath(config["tls"]["key"])
    assert cert.parent == key.parent
    listen_port = str(config["listen"]).rpartition(":")[2]
    base_services = compose()["services"]
    for name in GATEWAY_SERVICES:
        service = override["services"][name]
        mounts = {target: source for source, target in map(volume_mount, service["volumes"])}
        # The override's config replaces the base's at the same target.
        assert (COMPOSE_DIR / mounts[docker_config_path()]).resolve() == COMPOSE_TLS_CONFIG
        # The pair's directory, as a directory: a renewed file is seen after SIGHUP.
        source = mounts[str(cert.parent)]
        assert source == "./tls"
        assert all(v.endswith(":ro") for v in service["volumes"])
        published = [str(p).split(":") for p in service["ports"]]
        assert [p[2] for p in published] == [listen_port]
        assert all(p[0] == "127.0.0.1" for p in published)
        assert name in base_services


def test_kubernetes_tls_mounts_a_tls_secret_where_the_config_reads_it() -> None:
    objects = tls_objects()
    config = yaml.safe_load(tls_configmap_text())
    pod = objects[("Deployment", "ratelimit-gateway")]["spec"]["template"]["spec"]
    container = tls_container(objects)
    (volume,) = (v for v in pod["volumes"] if "secret" in v)
    secret = volume["secret"]
    assert secret["secretName"] == "ratelimit-gateway-tls"
    # The keys of a kubernetes.io/tls Secret.
    assert {item["key"] for item in secret["items"]} == {"tls.crt", "tls.key"}
    (mount,) = (m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert "subPath" not in mount, "a subPath mount never sees the Secret renewed"
    assert mount["readOnly"] is True
    mounted = {
        str(PurePosixPath(mount["mountPath"]) / item["path"]): item["key"]
        for item in secret["items"]
    }
    assert mounted == {config["tls"]["cert"]: "tls.crt", config["tls"]["key"]: "tls.key"}
    # The key readable by the gateway's group only (not a nested mount in the ConfigMap's).
    assert secret["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    configmap_mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert not mount["mountPath"].startswith(configmap_mount["mountPath"] + "/")
    # The https port is the config's listen port, and the Service's target.
    listen_port = int(str(config["listen"]).rpartition(":")[2])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["https"] == listen_port
    (service_port,) = objects[("Service", "ratelimit-gateway")]["spec"]["ports"]
    assert (service_port["port"], service_port["targetPort"]) == (443, "https")


def test_kubernetes_tls_manifest_is_the_base_with_tls() -> None:
    """Everything but the TLS parts is ../gateway.yaml's, so the two stay alike."""
    tls, base = tls_objects(), kubernetes_objects()
    assert set(tls) == {key for key in base if key[1].startswith("ratelimit-gateway")}
    tls = copy.deepcopy(tls)
    configmap = tls[("ConfigMap", "ratelimit-gateway-config")]
    configmap["data"]["gateway.yaml"] = kubernetes_config_text()
    pod = tls[("Deployment", "ratelimit-gateway")]["spec"]["template"]["spec"]
    pod["volumes"] = [v for v in pod["volumes"] if "secret" not in v]
    del pod["securityContext"]["fsGroup"]
    container = tls_container(tls)
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "tls"]
    for port in container["ports"]:
        if port["name"] == "https":
            port.update(name="http", containerPort=8080)
    pod["containers"] = [container]
    (service_port,) = tls[("Service", "ratelimit-gateway")]["spec"]["ports"]
    service_port.update(name="http", port=80, targetPort="http")
    assert tls == {key: base[key] for key in tls}
