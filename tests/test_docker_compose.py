"""docker/ is consistent with the code: compose parses, commands are real CLI verbs, settings are real.

No Docker engine runs here, so this checks what can be checked statically: every project-image
command against the real `recs` typer app (and Airflow's parser, and pyspark's spark-class),
every RECS_* variable against common.settings, and ports, volumes, mounts, Prometheus targets,
proxy upstreams and the Grafana dashboard against the services that compose defines.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from common.settings import PROJECT_ROOT, SettingsError, _unknown_env_keys, load_settings
from serving.core.load import REQUEST_START_HEADER

DOCKER = PROJECT_ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
ENV_EXAMPLE = DOCKER / ".env.example"

# Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}; `$$` is a literal `$`.
VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as compose's dotenv reads them (quotes stripped, comments skipped)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Apply compose's variable substitution to every string in a parsed compose tree."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        if name in env and (env[name] or op not in (":-", ":?")):
            return env[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise KeyError(f"compose would refuse to start: ${{{name}}} is required ({arg})")
        return ""

    return VARIABLE.sub(one, value)


def variables_used(value: Any) -> dict[str, str | None]:
    """name -> operator for every ${VAR} in the raw compose tree."""
    found: dict[str, str | None] = {}
    if isinstance(value, dict):
        for v in value.values():
            found.update(variables_used(v))
    elif isinstance(value, list):
        for v in value:
            found.update(variables_used(v))
    elif isinstance(value, str):
        for match in VARIABLE.finditer(value):
            if match.group("name"):
                found[match.group("name")] = match.group("op")
    return found


RAW = yaml.safe_load(COMPOSE_FILE.read_text())
ENV = read_env_file(ENV_EXAMPLE)
COMPOSE = interpolate(RAW, ENV)
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")),
    )
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def last_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    start = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[start:]


def image_env() -> dict[str, str]:
    """ENV of the runtime stage (KEY=VALUE pairs)."""
    env = {}
    for word, rest in last_stage(dockerfile_instructions()):
        if word == "ENV":
            for pair in re.findall(r"(\w+)=(\S+)", rest):
                env[pair[0]] = pair[1]
    return env


def image_entrypoint() -> list[str]:
    entries = [
        json.loads(rest) for word, rest in last_stage(dockerfile_instructions()) if word == "ENTRYPOINT"
    ]
    assert entries, "the Dockerfile has no ENTRYPOINT"
    return entries[-1]


def is_project_image(service: dict[str, Any]) -> bool:
    return "build" in service


def entrypoint_of(service: dict[str, Any]) -> list[str]:
    entrypoint = service.get("entrypoint", image_entrypoint())
    return entrypoint.split() if isinstance(entrypoint, str) else entrypoint


def program(entrypoint: list[str]) -> str:
    """The program an entrypoint runs, past the init wrapper (tini --)."""
    return Path(entrypoint[-1]).name


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def exposed_ports(service: dict[str, Any]) -> set[int]:
    """Container-side ports a service listens on: `expose` plus the target of each published port."""
    ports = {int(str(p).split("/")[0]) for p in service.get("expose", [])}
    for spec in service.get("ports", []):
        ports.add(int(str(spec).split(":")[-1].split("/")[0]))
    return ports


def health_command(service: dict[str, Any]) -> list[str] | None:
    check = service.get("healthcheck") or {}
    test = check.get("test")
    if check.get("disable") or not test or test[0] != "CMD":
        return None
    return [str(part) for part in test[1:]]


PROJECT_SERVICES = sorted(name for name, svc in SERVICES.items() if is_project_image(svc))
RECS_SERVICES = sorted(name for name in PROJECT_SERVICES if program(entrypoint_of(SERVICES[name])) == "recs")
AIRFLOW_SERVICES = sorted(
    name for name in PROJECT_SERVICES if program(entrypoint_of(SERVICES[name])) == "airflow"
)
SPARK_SERVICES = sorted(
    name for name in PROJECT_SERVICES if program(entrypoint_of(SERVICES[name])) == "spark-class"
)


# ---------------------------------------------------------------- the file itself


def test_compose_defines_a_whole_store():
    expected_replicas = {"api": 2, "speed": 2, "spark-worker": 2}
    for name in [
        "redis", "redis-replica", "minio", "minio-init", "spark-master", "spark-worker", "postgres",
        "airflow-init", "airflow-api-server", "airflow-scheduler", "airflow-dag-processor",
        "api", "proxy", "speed", "lake-writer", "prometheus", "grafana",
    ]:  # fmt: skip
        assert name in SERVICES, f"compose lacks {name}"
    for name, replicas in expected_replicas.items():
        assert SERVICES[name].get("deploy", {}).get("replicas") == replicas, name
    assert "--replicaof" in command_of(SERVICES["redis-replica"])
    assert set(PROJECT_SERVICES) == set(RECS_SERVICES) | set(AIRFLOW_SERVICES) | set(SPARK_SERVICES)


def test_every_variable_has_a_value_in_env_example():
    # A fresh `cp .env.example .env` must be enough for `docker compose config` to pass.
    for name, op in variables_used(RAW).items():
        if op not in (":-", "-"):
            assert name in ENV, f"${{{name}}} has no default and is missing from docker/.env.example"
    unused = set(ENV) - set(variables_used(RAW))
    assert not unused, f"docker/.env.example sets variables compose never reads: {sorted(unused)}"


def test_secrets_are_substituted_never_literal():
    secret = re.compile(r"PASSWORD|SECRET|_KEY$|_KEYS$|TOKEN|AUTH|FERNET", re.IGNORECASE)
    for name, service in RAW["services"].items():
        env = service.get("environment") or {}
        for key, value in env.items():
            value = str(value)
            if secret.search(key):
                assert value.startswith("${"), (
                    f"{name}: {key} must come from docker/.env, not be written here"
                )
            if re.search(r"://[^/@\s]*:[^/@\s]+@", value):  # credentials inside a URL
                assert re.search(r"://[^/@\s]*:\$\{\w+", value), f"{name}: {key} embeds a literal password"
    for line in ENV_EXAMPLE.read_text().splitlines():
        key, _, value = line.partition("=")
        if secret.search(key) and not key.startswith("#"):
            assert "CHANGE-ME" in value, f".env.example must not ship a usable secret for {key}"
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


def test_third_party_images_are_pinned():
    for name, service in SERVICES.items():
        if is_project_image(service):
            continue
        image = service["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and re.search(r"\d", tag), f"{name}: pin {image} to a version"


# ---------------------------------------------------------------- commands are real


def recs_usage_error(args: list[str]) -> str | None:
    """None if `recs <args>` parses against the real `recs` command tree, else why it does not."""
    from recs.main import app

    command = typer.main.get_command(app)
    # typer >= 0.2x runs on its own copy of click (typer._click, no Group class), so groups are
    # recognised by what they do and errors by the ClickException of whichever click built them.
    core = next(cls.__module__ for cls in type(command).__mro__ if cls.__name__ == "Command")
    click = importlib.import_module(core.rpartition(".")[0])
    path = ["recs"]
    while hasattr(command, "list_commands"):
        if not args:
            return f"`{' '.join(path)}` needs a sub-command"
        name, args = args[0], args[1:]
        sub = command.get_command(click.Context(command), name)
        if sub is None:
            return f"`{' '.join(path)}` has no command {name!r}"
        command, path = sub, [*path, name]
    try:
        # Parses and validates options and arguments exactly as a run would, without invoking.
        with command.make_context(" ".join(path), list(args)):
            pass
    except click.ClickException as exc:
        return exc.format_message()
    return None


def test_the_command_check_rejects_what_recs_would_reject():
    # The check below is only worth something if it can fail.
    assert recs_usage_error(["config"]) is None
    assert recs_usage_error(["no-such-verb"])
    assert recs_usage_error(["redis"])  # a group without its sub-command
    assert recs_usage_error(["redis", "status", "--no-such-option"])
    assert recs_usage_error(["redis", "status", "extra-argument"])


@pytest.mark.parametrize("service", RECS_SERVICES)
def test_service_command_is_a_real_recs_verb(service: str):
    args = command_of(SERVICES[service])
    assert args, f"{service} runs bare `recs`"
    error = recs_usage_error(args)
    assert error is None, f"{service}: `recs {' '.join(args)}` is not a valid command: {error}"


README_EXAMPLES = re.findall(
    r"^\s*docker compose run --rm recs (.+)$", (DOCKER / "README.md").read_text(), re.MULTILINE
)


@pytest.mark.parametrize("example", README_EXAMPLES)
def test_readme_one_off_jobs_are_real_recs_verbs(example: str):
    error = recs_usage_error(example.split())
    assert error is None, f"docker/README.md shows `recs {example}`: {error}"


@pytest.mark.parametrize(
    "service", sorted(n for n in SERVICES if (health_command(SERVICES[n]) or [""])[0] == "recs")
)
def test_healthcheck_is_a_real_recs_verb(service: str):
    args = health_command(SERVICES[service])[1:]
    error = recs_usage_error(args)
    assert error is None, f"{service} healthcheck: `recs {' '.join(args)}` is not a valid command: {error}"


AIRFLOW_CHECK = """
import json, sys
from airflow.cli.cli_parser import get_parser
from airflow.configuration import conf
request = json.load(sys.stdin)
parser, errors = get_parser(), []
for args in request["commands"]:
    try:
        parser.parse_args(args)
    except SystemExit:
        errors.append("not an airflow command: airflow " + " ".join(args))
described = conf.configuration_description
for name in request["env"]:
    section, _, key = name[len("AIRFLOW__"):].lower().partition("__")
    if key not in described.get(section, {}).get("options", {}):
        errors.append("not an Airflow option: " + name)
print(json.dumps(errors))
"""


def test_airflow_services_run_real_airflow_commands_and_options(tmp_path: Path):
    commands, env_names = [], set()
    for name in AIRFLOW_SERVICES:
        service = SERVICES[name]
        commands.append(command_of(service))
        if (health_command(service) or [""])[0] == "airflow":
            commands.append(health_command(service)[1:])
        env_names |= {k for k in environment_of(service) if k.startswith("AIRFLOW__")}
    assert {"api-server", "scheduler", "dag-processor"} <= {c[0] for c in commands}
    assert environment_of(SERVICES["airflow-scheduler"])["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    # A separate interpreter with a throw-away AIRFLOW_HOME: importing Airflow writes config there.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env["AIRFLOW_HOME"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", AIRFLOW_CHECK],
        input=json.dumps({"commands": commands, "env": sorted(env_names)}),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_spark_services_run_pyspark_spark_class():
    for name in SPARK_SERVICES:
        script = entrypoint_of(SERVICES[name])[-1]
        # The image's venv mirrors this one: same Python minor, same pyspark wheel layout.
        relative = Path(script).relative_to("/opt/venv/lib")
        assert (Path(sys.prefix) / "lib" / relative).exists(), (
            f"{name}: {script} is not where pyspark puts spark-class"
        )
    master, worker = command_of(SERVICES["spark-master"]), command_of(SERVICES["spark-worker"])
    assert master[0] == "org.apache.spark.deploy.master.Master"
    assert worker[0] == "org.apache.spark.deploy.worker.Worker"
    host, port = master[master.index("--host") + 1], int(master[master.index("--port") + 1])
    assert (
        worker[1] == f"spark://{host}:{port}"
        and host == "spark-master"
        and port in exposed_ports(SERVICES[host])
    )
    for name in RECS_SERVICES + AIRFLOW_SERVICES:
        assert environment_of(SERVICES[name]).get("RECS_SPARK__MASTER") == worker[1], name
    # Driver (Airflow tasks), master and workers share one spark-defaults.conf (S3A for the lake).
    for name in SPARK_SERVICES + AIRFLOW_SERVICES:
        conf_dir = environment_of(SERVICES[name]).get("SPARK_CONF_DIR")
        mounts = {
            str(spec).split(":")[1]: str(spec).split(":")[0] for spec in SERVICES[name].get("volumes", [])
        }
        assert conf_dir and (DOCKER / mounts[conf_dir] / "spark-defaults.conf").exists(), name


# ---------------------------------------------------------------- settings are real


@pytest.mark.parametrize("service", PROJECT_SERVICES)
def test_recs_variables_are_real_settings(service: str, monkeypatch: pytest.MonkeyPatch):
    env = {**image_env(), **environment_of(SERVICES[service])}
    recs_env = {k: v for k, v in env.items() if k.startswith("RECS_")}
    assert _unknown_env_keys(recs_env) == [], f"{service} sets variables that are no setting"
    # And the values must validate: load the settings exactly as the container would.
    for key in list(os.environ):
        if key.startswith("RECS_"):
            monkeypatch.delenv(key)
    for key, value in recs_env.items():
        monkeypatch.setenv(key, value)
    try:
        settings = load_settings()
    except SettingsError as exc:
        pytest.fail(f"{service}: {exc}")
    assert (
        settings.redis.url
        and settings.lake.root.startswith("s3://")
        and settings.models.root.startswith("s3://")
    )


def test_api_listens_where_proxy_healthcheck_and_prometheus_look():
    api = SERVICES["api"]
    command, env = command_of(api), {**image_env(), **environment_of(api)}
    port = int(command[command.index("--port") + 1])
    assert port == int(env["RECS_API__PORT"]) and env["RECS_API__HOST"] == "0.0.0.0"
    assert exposed_ports(api) == {port}
    assert "ports" not in api, "API replicas publish no host port; the proxy does, so scaling never clashes"


# ---------------------------------------------------------------- ports, volumes, mounts, dependencies


def test_published_host_ports_are_unique():
    published: list[str] = []
    for name, service in SERVICES.items():
        for spec in service.get("ports", []):
            parts = str(spec).split(":")
            assert len(parts) in (2, 3), f"{name}: publish {spec} as [ip:]host:container, not a random port"
            published.append(parts[-2])
            assert service.get("deploy", {}).get("replicas", 1) == 1, (
                f"{name} is replicated; its port would clash"
            )
    # One host port per service, whatever the bind address: a wildcard bind clashes with any other.
    assert len(published) == len(set(published)), f"host ports published twice: {sorted(published)}"


def test_depends_on_targets_exist_and_conditions_are_met():
    for name, service in SERVICES.items():
        deps = service.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for target, spec in deps.items():
            assert target in SERVICES, f"{name} depends on unknown service {target}"
            assert target != name
            if spec.get("condition") == "service_healthy":
                target_svc = SERVICES[target]
                has_check = "healthcheck" in target_svc and not target_svc["healthcheck"].get("disable")
                assert has_check or is_project_image(target_svc), (
                    f"{name} waits for {target}, which has no healthcheck"
                )
            if spec.get("condition") == "service_completed_successfully":
                assert SERVICES[target].get("restart") == "no", (
                    f"{target} is a one-shot job; it must not restart"
                )


def test_named_volumes_are_declared_and_bind_mounts_exist():
    declared = set(COMPOSE.get("volumes") or {})
    used = set()
    for name, service in SERVICES.items():
        for spec in service.get("volumes", []):
            source = str(spec).split(":")[0]
            if source.startswith((".", "/")):
                assert (DOCKER / source).resolve().exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in declared, f"{name} uses volume {source}, not declared at the top level"
                used.add(source)
    assert declared == used, f"declared but unused volumes: {sorted(declared - used)}"
    airflow_mounts = {str(spec) for name in AIRFLOW_SERVICES for spec in SERVICES[name].get("volumes", [])}
    assert "../dags:/app/dags:ro" in airflow_mounts


def test_prometheus_targets_are_real_services_and_ports():
    mounted = {str(spec).split(":")[0] for spec in SERVICES["prometheus"]["volumes"]}
    assert "./prometheus.yml" in mounted
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = []
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets += [tuple(t.rsplit(":", 1)) for t in static["targets"]]
        for dns in job.get("dns_sd_configs", []):
            assert dns.get("type", "SRV") == "A", "compose's DNS answers A records only"
            targets += [(host, str(dns["port"])) for host in dns["names"]]
    assert ("api", "8000") in targets
    for host, port in targets:
        assert host in SERVICES, f"Prometheus scrapes {host}, not a compose service"
        assert int(port) in exposed_ports(SERVICES[host]), f"{host} does not listen on {port}"


def test_proxy_upstreams_are_real_services_and_ports():
    mounted = {str(spec).split(":")[0]: str(spec).split(":")[1] for spec in SERVICES["proxy"]["volumes"]}
    assert mounted.get("./nginx.conf") == "/etc/nginx/nginx.conf"
    conf = (DOCKER / "nginx.conf").read_text()
    upstreams = dict(re.findall(r"upstream\s+(\w+)\s*\{([^}]*)\}", conf))
    assert upstreams, "nginx.conf defines no upstream"
    for block in upstreams.values():
        servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", block, re.MULTILINE)
        assert servers
        for host, port in servers:
            assert host in SERVICES, f"proxy upstream {host} is no compose service"
            assert int(port) in exposed_ports(SERVICES[host]), f"{host} does not listen on {port}"
    for name in re.findall(r"proxy_pass\s+http://(\w+)", conf):
        assert name in upstreams, f"proxy_pass to {name}, which is no upstream"
    listen = {int(p) for p in re.findall(r"^\s*listen\s+(\d+)", conf, re.MULTILINE)}
    published = {int(str(spec).split(":")[-1]) for spec in SERVICES["proxy"]["ports"]}
    assert published <= listen, "the proxy publishes a port nginx does not listen on"
    # The balancer's stamp, as the workers read it (serving/core/load.py): when the request reached nginx.
    assert f'proxy_set_header {REQUEST_START_HEADER} "t=${{msec}}";' in conf


# The drift monitor (issue 16, item 2) exports these; the alert rules and the dashboard name them already.
DRIFT_METRICS = {"recs_model_drift_psi_max", "recs_model_drifted"}
PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "max", "count", "le", "label_values",
                "without", "time", "printf", "humanizePercentage", "humanizeDuration"}  # fmt: skip


def exported_sample_names() -> set[str]:
    """Sample names the processes expose (histograms: _bucket/_sum/_count; counters: _total), with `up`."""
    from serving.core import metrics as api_metrics
    from speed_layer import metrics as speed_metrics

    exposed = {"up"} | DRIFT_METRICS
    for module in (api_metrics, speed_metrics):
        for metric in vars(module).values():
            kind, name = getattr(metric, "_type", None), getattr(metric, "_name", None)
            if kind == "histogram":
                exposed |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "counter":
                exposed |= {name, f"{name}_total"}
            elif kind in ("gauge", "summary", "info"):
                exposed.add(name)
    return exposed


def metric_names(expr: str) -> set[str]:
    """The recs_* and `up` series an expression reads."""
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", "", expr)  # drop selectors, ranges, strings
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)) - PROMQL_WORDS
    return {n for n in names if n.startswith("recs_") or n == "up"}


def test_grafana_dashboard_uses_provisioned_datasource_and_real_metrics():
    provisioning = DOCKER / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    uids = {ds["uid"] for ds in datasources}
    for ds in datasources:
        host, port = re.match(r"http://([\w-]+):(\d+)", ds["url"]).groups()
        assert host in SERVICES and int(port) in exposed_ports(SERVICES[host])
    provider = yaml.safe_load((provisioning / "dashboards" / "lambdarec.yml").read_text())["providers"][0]
    mounts = dict(str(spec).split(":")[:2] for spec in SERVICES["grafana"]["volumes"])
    assert mounts["./grafana/lambdarec.json"].startswith(provider["options"]["path"] + "/")

    dashboard = json.loads((DOCKER / "grafana" / "lambdarec.json").read_text())
    titles = " | ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ["latency", "fallback", "stream lag", "model version", "consumer group lag", "dead letters",
                  "freshness", "lake writer", "error rate", "model age", "drift", "alerts firing"]:  # fmt: skip
        assert topic in titles, f"the dashboard lacks a {topic} panel"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"

    exposed = exported_sample_names()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in uids, panel["title"]
        for target in panel["targets"]:
            if target["expr"].startswith("ALERTS{"):  # Prometheus' own series of the rules' alerts
                continue
            names = metric_names(target["expr"])
            assert names and names <= exposed, f"{panel['title']}: {sorted(names - exposed)} not exported"


def test_prometheus_loads_the_alert_rules_on_real_metrics():
    mounts = dict(str(spec).split(":")[:2] for spec in SERVICES["prometheus"]["volumes"])
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    assert mounts["./alerts.yml"] == str(Path(mounts["./prometheus.yml"]).parent / "alerts.yml")
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert {"api", "speed", "lake-writer"} <= jobs, "every Lambdarec process is scraped"

    exposed = exported_sample_names()
    rules = yaml.safe_load((DOCKER / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            names = metric_names(rule["expr"])
            assert names and names <= exposed, f"{rule['alert']}: {sorted(names - exposed)} not exported"
            jobs_named = set(re.findall(r"job=~?\"([^\"]+)\"", rule["expr"]))
            assert all(set(j.split("|")) <= jobs for j in jobs_named), f"{rule['alert']} names an unscraped job"


def test_metrics_ports_of_the_speed_layer_are_the_scraped_ones():
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    ports = {job["job_name"]: job["dns_sd_configs"][0]["port"] for job in config["scrape_configs"] if "dns_sd_configs" in job}
    for service, variable in (("speed", "RECS_METRICS__SPEED_PORT"), ("lake-writer", "RECS_METRICS__LAKE_WRITER_PORT")):
        environment = SERVICES[service]["environment"]
        assert int(environment[variable]) == ports[service], f"{service} listens where prometheus looks"
        assert environment["RECS_METRICS__HOST"] == "0.0.0.0", f"{service}'s metrics must be reachable from prometheus"


# ---------------------------------------------------------------- the Dockerfile


def test_dockerfile_is_multistage_slim_pinned_and_non_root():
    instructions = dockerfile_instructions()
    args = {
        m[0]: m[1]
        for word, rest in instructions
        if word == "ARG"
        for m in [rest.split("=", 1)]
        if len(m) == 2
    }
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    stages = [rest for word, rest in instructions if word == "FROM"]
    assert len(stages) >= 2 and all(s.startswith("${PYTHON_IMAGE}") for s in stages)
    runtime = last_stage(instructions)
    words = [word for word, _ in runtime]
    assert "HEALTHCHECK" in words and "VOLUME" in words
    user = [rest for word, rest in runtime if word == "USER"]
    assert user and user[-1] not in ("root", "0"), "the runtime stage must drop root"
    assert program(image_entrypoint()) == "recs"
    assert any("/app/var" in rest for word, rest in runtime if word == "VOLUME")
    assert image_env()["RECS_VAR_DIR"] == "/app/var"
    install = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "-c constraints.txt" in install, "the image installs with the lock"
    runtime_runs = " ".join(rest for word, rest in runtime if word == "RUN")
    assert "openjdk-17-jre-headless" in runtime_runs and "libopenblas" in runtime_runs
    assert any("--from=builder" in rest for word, rest in runtime if word == "COPY")


def test_dockerfile_copies_only_what_exists_and_the_context_lets_through():
    ignore = [ln.strip() for ln in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()]
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    for word, rest in dockerfile_instructions():
        if word != "COPY" or "--from=" in rest:
            continue
        parts = [p for p in rest.split() if not p.startswith("--")]
        for source in parts[:-1]:
            assert (PROJECT_ROOT / source).exists(), f"COPY {source}: no such path in the repository"
            assert source.rstrip("/") in allowed, f"COPY {source} is excluded by Dockerfile.dockerignore"
    for package in ["common", "spark_jobs", "speed_layer", "serving", "warehouse", "recs", "bench"]:
        assert package in allowed, f"the package {package} is kept out of the build context"
    assert "docker/healthcheck.py" in allowed
