"""The image's S3 and Postgres pieces, checked statically (no Docker engine here): every package the
Dockerfile installs resolves from the lock at its pinned version, the hadoop-aws it adds is the Hadoop
of the installed pyspark's jars, Spark's S3A settings come from the environment compose gives, and
Airflow's metadata DB URL in compose names a driver the lock installs."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pyspark
import pytest
import sqlalchemy
from packaging.requirements import Requirement

from common.settings import PROJECT_ROOT
from tests.test_docker_compose import COMPOSE, DOCKER, SERVICES, dockerfile_instructions, environment_of

sys.path.insert(0, str(DOCKER))
import fetch_s3a_jars  # noqa: E402  (docker/ is not a package)

sys.path.remove(str(DOCKER))


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    pins = {}
    for line in (PROJECT_ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            pins[normalized(name)] = version.strip()
    return pins


def dockerfile_arg(name: str) -> str:
    values = [rest.split("=", 1)[1] for word, rest in dockerfile_instructions() if word == "ARG" and rest.startswith(f"{name}=")]
    assert values, f"the Dockerfile has no ARG {name}=..."
    return values[-1]


def pip_targets() -> list[str]:
    """What the Dockerfile's pip installs name, e.g. ".[deploy]"."""
    targets = []
    for word, rest in dockerfile_instructions():
        if word == "RUN" and "pip install" in rest:
            words = rest.split("pip install", 1)[1].split()
            skip_next = False
            for w in words:
                if skip_next:
                    skip_next = False
                elif w in ("-c", "-r", "--constraint"):
                    skip_next = True
                elif not w.startswith("-") and w not in ("&&", "\\"):
                    targets.append(w.strip("\"'"))
    return targets


def test_what_the_dockerfile_installs_resolves_from_the_lock_at_the_pins() -> None:
    """Walks the requirements of the Dockerfile's `.[deploy]` through the metadata of the packages the
    lock installed here (`make setup` installs the same extras): every one is pinned, its pin meets every
    requirement on it, and it is what is installed. (`pip install --dry-run` over the index checks the
    same but took 147 s here.)"""
    assert pip_targets() == [".[deploy]"]
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    pins = locked()
    todo = [(Requirement(r), "") for r in project["dependencies"] + project["optional-dependencies"]["deploy"]]
    seen: set[tuple[str, str]] = set()
    while todo:
        requirement, parent_extra = todo.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": parent_extra}):
            continue
        name = normalized(requirement.name)
        assert name in pins, f"{requirement} is not in the lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{requirement} refuses the pin {pins[name]}"
        for extra in requirement.extras or {""}:
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            installed = metadata.distribution(name)
            assert installed.version == pins[name], f"{name} {installed.version} is installed, the lock says {pins[name]}"
            todo.extend((Requirement(r), extra) for r in installed.requires or [])
    assert {"s3fs", "aiobotocore", "botocore", "apache-airflow-providers-postgres", "psycopg2-binary"} <= {n for n, _ in seen}


def test_the_deploy_extra_is_pinned_in_step_with_fsspec() -> None:
    extras = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = locked()
    for requirement in extras["deploy"] + ["s3fs", "moto[server]"]:
        assert normalized(re.split(r"[\[<>=!~; ]", requirement)[0]) in pins, requirement
    assert pins["s3fs"] == pins["fsspec"], "s3fs is released in step with fsspec and pins it exactly"


def test_hadoop_aws_is_the_hadoop_of_the_installed_pyspark() -> None:
    version = dockerfile_arg("HADOOP_VERSION")
    jars = Path(pyspark.__file__).parent / "jars"
    fetch_s3a_jars.check_hadoop_version(jars, version)  # what the build runs
    assert [p.name for p in jars.glob("hadoop-client-api-*.jar")] == [f"hadoop-client-api-{version}.jar"]
    with pytest.raises(SystemExit, match="set the build arg"):
        fetch_s3a_jars.check_hadoop_version(jars, "3.3.4")
    run = " ".join(rest for word, rest in dockerfile_instructions() if word == "RUN" and "fetch_s3a_jars.py" in rest)
    assert "${HADOOP_VERSION}" in run and "site-packages/pyspark/jars" in run
    # The runtime stage runs compose's spark-class from this venv's pyspark, with the jars added here.
    assert any("--from=builder /opt/venv" in rest for word, rest in dockerfile_instructions() if word == "COPY")


def test_the_sdk_bundle_version_is_read_from_the_hadoop_release() -> None:
    pom = b"""<project xmlns="http://maven.apache.org/POM/4.0.0"><properties>
        <aws-java-sdk-v2.version>2.99.1</aws-java-sdk-v2.version></properties></project>"""
    assert fetch_s3a_jars.sdk_version(pom) == "2.99.1"
    with pytest.raises(SystemExit, match="aws-java-sdk-v2.version"):
        fetch_s3a_jars.sdk_version(b'<project xmlns="http://maven.apache.org/POM/4.0.0"/>')
    url = fetch_s3a_jars.artifact_url("software.amazon.awssdk", "bundle", "2.99.1", "jar")
    assert url.endswith("/software/amazon/awssdk/bundle/2.99.1/bundle-2.99.1.jar")


def test_spark_s3a_settings_come_from_the_environment_compose_gives_spark() -> None:
    conf = dict(
        line.split(None, 1) for line in (DOCKER / "spark" / "spark-defaults.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )  # fmt: skip
    assert conf["spark.hadoop.fs.s3.impl"] == "org.apache.hadoop.fs.s3a.S3AFileSystem"  # s3:// lake URLs
    referenced = {m for value in conf.values() for m in re.findall(r"\$\{env\.(\w+)\}", value)}
    assert {"AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"} <= referenced
    for name, service in SERVICES.items():
        if "spark-class" in " ".join(service.get("entrypoint") or []) or name.startswith("airflow"):
            env = environment_of(service)
            assert referenced <= env.keys(), name
            # S3A and s3fs reach the same store.
            assert env["AWS_ENDPOINT_URL"] == env["FSSPEC_S3_ENDPOINT_URL"], name


def test_airflows_metadata_db_url_names_an_installed_driver() -> None:
    urls = {environment_of(s).get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN") for s in SERVICES.values()} - {None}
    assert len(urls) == 1, urls
    (url,) = urls
    assert url.startswith("postgresql+psycopg2://")
    engine = sqlalchemy.create_engine(url)  # imports the driver; connects to nothing
    assert engine.dialect.driver == "psycopg2"
    assert COMPOSE["services"]["postgres"]["image"].startswith("postgres:")
