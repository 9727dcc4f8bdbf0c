"""docker/alerts.yml holds: promtool checks it and the config that loads it, its unit cases cover every
alert both ways, and a real Prometheus scraping a real API, speed consumers and lake writer on a real
Redis fires each alert on the processes' own series when the situation it watches is staged."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from common import redis_keys
from common.events import EventType
from common.redis_server import free_port
from common.registry import Registry
from common.settings import PROJECT_ROOT, get_settings
from common.stream import group_lag
from serving.core.load import OVERLOAD_BATCH_ONLY, request_start
from tests.speed_factories import add_events, make_event
from tests.test_serving_limits import serving
from tests.test_serving_push import sse_messages
from tests.test_serving_support import make_settings, view_event

pytest_plugins = ["tests.test_serving_support"]

DOCKER = PROJECT_ROOT / "docker"
RULES = DOCKER / "alerts.yml"
UNIT_CASES = PROJECT_ROOT / "tests" / "fixtures" / "alerts_test.yml"
# Debian's `prometheus` package (scripts/setup-system.sh) ships both.
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def alert_names() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"]]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------- static checks


def test_promtool_accepts_the_rules_and_the_config_that_loads_them(tmp_path: Path) -> None:
    rules = promtool("check", "rules", str(RULES))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in rules.stdout
    config = promtool("check", "config", str(DOCKER / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS: 1 rule files found" in config.stdout  # alerts.yml, found beside it

    broken = tmp_path / "alerts.yml"  # the check is no rubber stamp: a typo in an expression fails it
    broken.write_text(RULES.read_text().replace("max by (group) (recs_stream_group_lag)", "max by (group (lag"))
    assert promtool("check", "rules", str(broken)).returncode != 0


def test_unit_cases_fire_and_quiet_every_alert_and_pass() -> None:
    cases = yaml.safe_load(UNIT_CASES.read_text())["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        for check in case["alert_rule_test"]:
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    for name in alert_names():
        assert name in fires, f"no case where {name} fires"
        assert name in quiet, f"no case where {name} stays quiet"
    result = promtool("test", "rules", str(UNIT_CASES))
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- a real Prometheus on the real processes

# The live copy of the rules: no `for` (each alert fires at its first true evaluation) and thresholds
# the short test reaches; the rest of each expression is the file's own. Alerts left out read series
# this branch's processes do not export yet (the drift monitor's, issue 16 item 2).
LIVE_THRESHOLDS = {
    "StreamGroupLag": ("> 10000", "> 100"),  # above what the healthy part sends (30 events)
    "SpeedFreshnessSlow": ("> 2", "> 0"),  # any applied event in the window
    "LakeWriterStalled": ("> 300", ">= 0"),  # the real gauge, however recent
    "RecommendationsLatencyP99High": ("> 0.1", "> 0"),  # any served list
    "ModelTooOld": ("> 108000", "> 1800"),  # the synthetic model's cutoff is an hour old
    "RecommendationsShed": ("> 0.05", "> 0"),  # any shed list
}
NOT_LIVE = {"ModelDrifted", "ModelDriftPSIHigh"}
# A scrape that times out on a busy machine is not a dead process: the target must stay down this long.
LIVE_FOR = {"TargetDown": "3s"}


def live_rules(target: Path) -> None:
    document = yaml.safe_load(RULES.read_text())
    for group in document["groups"]:
        group["rules"] = [rule for rule in group["rules"] if rule["alert"] not in NOT_LIVE]
        for rule in group["rules"]:
            rule.pop("for", None)
            if rule["alert"] in LIVE_FOR:
                rule["for"] = LIVE_FOR[rule["alert"]]
            if rule["alert"] in LIVE_THRESHOLDS:
                old, new = LIVE_THRESHOLDS[rule["alert"]]
                assert rule["expr"].rstrip().endswith(old), f"{rule['alert']}: threshold changed, update the test"
                rule["expr"] = rule["expr"].rstrip()[: -len(old)] + new
    target.write_text(yaml.safe_dump(document))


class Prometheus:
    """A private prometheus on loopback scraping `targets` (job -> port) twice a second."""

    def __init__(self, directory: Path, targets: dict[str, int]) -> None:
        directory.mkdir()
        live_rules(directory / "rules.yml")
        config = {
            "global": {"scrape_interval": "500ms", "evaluation_interval": "500ms", "scrape_timeout": "500ms"},
            "rule_files": ["rules.yml"],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                for job, port in targets.items()
            ],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=(directory / "log").open("w"),
        )  # fmt: skip
        wait_for(self._ready, 30, "prometheus to start")

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def api(self, path: str, **params: str) -> Any:
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=5).json()
        assert body["status"] == "success", body
        return body["data"]

    def value(self, query: str) -> float | None:
        result = self.api("query", query=query)["result"]
        return float(result[0]["value"][1]) if result else None

    def firing(self) -> dict[str, list[dict[str, str]]]:
        """alertname -> the labels of each of its firing alerts."""
        out: dict[str, list[dict[str, str]]] = {}
        for alert in self.api("alerts")["alerts"]:
            if alert["state"] == "firing":
                out.setdefault(alert["labels"]["alertname"], []).append(alert["labels"])
        return out

    def wait_firing(self, names: set[str], timeout_s: float) -> dict[str, list[dict[str, str]]]:
        """The firing alerts, once `names` are among them."""
        firing: dict[str, list[dict[str, str]]] = {}

        def all_fire() -> bool:
            firing.clear()
            firing.update(self.firing())
            return firing.keys() >= names

        try:
            wait_for(all_fire, timeout_s, f"{sorted(names)} to fire")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; firing: {sorted(firing)}") from None
        return firing

    def wait_value(self, query: str, accept: Callable[[float], bool], timeout_s: float) -> float:
        wait_for(lambda: (v := self.value(query)) is not None and accept(v), timeout_s, query)
        return self.value(query) or 0.0

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=15)


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


@pytest.fixture
def prometheus_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "prometheus"
    yield directory
    log = directory / "log"
    if log.exists() and log.read_text().strip():
        print("prometheus log:\n" + log.read_text()[-3000:])


@pytest.mark.slow
def test_alerts_fire_on_the_series_of_real_processes(
    published: Any, recs_env: Path, redis_client: redis.Redis, prometheus_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    speed_port, writer_port = free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT_ROOT),
        "RECS_METRICS__SPEED_PORT": str(speed_port),
        "RECS_METRICS__LAKE_WRITER_PORT": str(writer_port),
        "RECS_METRICS__STREAM_REFRESH_S": "0.2",
        "RECS_SPEED__BLOCK_MS": "10",
        "RECS_LAKE__FLUSH_SECONDS": "0.5",
    }
    recs = [sys.executable, "-c", "from recs.main import app; app()"]
    # Two consumers: the supervisor serves their summed metrics on one port (multiprocess mode).
    speed = subprocess.Popen([*recs, "speed", "run", "--consumers", "2"], cwd=PROJECT_ROOT, env=env,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    writer = subprocess.Popen([*recs, "lake-writer", "run"], cwd=PROJECT_ROOT, env=env, stderr=subprocess.DEVNULL)
    prometheus = None
    settings = get_settings()
    # Low enough that the stopped consumers below make POST /v1/events answer 503 (the error rate).
    stream = settings.redis.stream
    with serving(make_settings(max_stream_lag=50)) as api_port:
        try:
            api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10)
            prometheus = Prometheus(prometheus_dir, {"api": api_port, "speed": speed_port, "lake-writer": writer_port})
            wait_for(lambda: prometheus.value("sum(up)") == 3, 40, "every target up")

            # Healthy: events through the API, applied by the consumers, landed by the writer; lists served.
            for k in range(10):
                assert api.post("/v1/events", json=[view_event(f"a{k}", f"i{j}") for j in range(3)]).status_code < 300
                wait_for(lambda: group_lag(redis_client, stream, settings.speed.group) == 0, 30, "the events applied")
                assert api.get("/v1/recommendations", params={"anonymous_id": f"a{k}"}).status_code == 200
            prometheus.wait_value('sum(recs_speed_events_total{outcome="applied"})', lambda v: v >= 30, 30)
            prometheus.wait_value("sum(recs_lake_writer_rows_total)", lambda v: v >= 30, 30)
            # Lists asked for a second after the balancer stamped them: shed (batch-only). rate() counts
            # from the second sample of the new series, so one first, then the rest once it is scraped.
            waited = dict([request_start(time.time() - 1)])
            shed = api.get("/v1/recommendations", params={"anonymous_id": "a0"}, headers=waited)
            assert shed.json()["degraded"] == OVERLOAD_BATCH_ONLY
            prometheus.wait_value('sum(recs_fallbacks_total{reason=~"overload_.*"})', lambda v: v >= 1, 10)
            for _ in range(5):
                waited = dict([request_start(time.time() - 1)])
                assert api.get("/v1/recommendations", params={"anonymous_id": "a0"}, headers=waited).status_code == 200
            healthy = prometheus.wait_firing(set(LIVE_THRESHOLDS) - {"StreamGroupLag"}, 20)
            assert not healthy.keys() & {"SpeedDeadLetters", "StreamGroupLag", "TargetDown", "ApiErrorRate"}
            registry = Registry(settings.models.root)
            cutoff = registry.read_manifest(registry.current() or "").cutoff
            age = prometheus.value("max(recs_model_age_seconds)")
            assert age == pytest.approx(time.time() - cutoff.timestamp(), abs=30)
            assert (prometheus.value("sum(recs_lake_writer_bytes_total)") or 0) > 0
            assert (prometheus.value("sum(recs_lake_writer_files_total)") or 0) >= 1
            for name in ("StreamGroupLag", "ModelTooOld"):  # with the file's thresholds, quiet
                assert prometheus.api("query", query=rule_expr(name))["result"] == [], name

            # A poisoned entry goes to the dead letters.
            redis_client.xadd(redis_keys.stream(stream), {"e": b"{not an event"})
            prometheus.wait_firing({"SpeedDeadLetters"}, 20)
            prometheus.wait_value("max(recs_stream_dead_letters)", lambda v: v == 1, 10)

            # A live stream whose push helper cannot be started (no interpreter at that path): its lists
            # are computed by the worker.
            with monkeypatch.context() as patched:
                patched.setattr(sys, "executable", "/nonexistent/python")
                push_lists(api, "p1", changes=4)
            prometheus.wait_firing({"PushHelpersDown"}, 20)
            prometheus.wait_value('sum(recs_push_helper_lists_total{computed_by="worker"})', lambda v: v >= 5, 10)

            # The consumers stop: their target goes down, the writer reports the speed group's growing lag,
            # and the API refuses events under backpressure (503s).
            speed.send_signal(signal.SIGTERM)
            assert speed.wait(timeout=30) == 0
            late = [make_event(EventType.VIEW, f"i{j % 50}", anonymous_id=f"late{j}") for j in range(200)]
            add_events(redis_client, settings, late)
            wait_for(lambda: api.post("/v1/events", json=view_event("b", "i1")).status_code == 503, 10, "a 503")
            # rate() needs the 5xx series scraped before it grows: the first sample of a new series counts nothing.
            prometheus.wait_value('sum(recs_request_seconds_count{status="5xx"})', lambda v: v >= 1, 10)
            for _ in range(5):
                assert api.post("/v1/events", json=view_event("b", "i1")).status_code == 503
            stopped = prometheus.wait_firing({"TargetDown", "StreamGroupLag", "ApiErrorRate"}, 20)
            assert [a["job"] for a in stopped["TargetDown"]] == ["speed"]
            assert "speed" in {a["group"] for a in stopped["StreamGroupLag"]}
            assert (prometheus.value('max(recs_stream_group_lag{group="speed"})') or 0) >= 200
            # The writer keeps up: its own group drains.
            prometheus.wait_value('max(recs_stream_group_lag{group="lake-writer"})', lambda v: v == 0, 20)
        finally:
            for process in (speed, writer):
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    process.wait(timeout=30)
            if prometheus is not None:
                prometheus.stop()


def push_lists(api: httpx.Client, person: str, changes: int) -> None:
    """Open a live stream for `person` and push it `changes` new lists, a scrape apart (rate() needs the
    counters seen growing). Each change buys the list's first item, which the rules then hide (a list
    that did not change would not be pushed)."""
    with api.stream("GET", f"/v1/stream/recommendations?anonymous_id={person}&session_id=s1&k=5") as stream:
        lists = sse_messages(stream)
        _, shown = next(lists)  # the stream's first list
        for _ in range(changes):
            bought = view_event(person, shown["items"][0]["item_id"], event_type="purchase")
            assert api.post("/v1/events", json=bought).status_code < 300
            _, shown = next(lists)
            time.sleep(0.6)


def rule_expr(name: str) -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return next(rule["expr"] for group in groups for rule in group["rules"] if rule["alert"] == name)
