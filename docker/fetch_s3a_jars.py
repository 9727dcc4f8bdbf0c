"""Put Hadoop's S3A connector beside pyspark's jars, at image build time (docker/Dockerfile).

    python fetch_s3a_jars.py HADOOP_VERSION PYSPARK_JARS_DIR

The pyspark wheel ships Hadoop's client jars but not hadoop-aws; hadoop-aws must be exactly the Hadoop
version of those jars (hadoop-client-api-<version>.jar), and the AWS SDK v2 bundle the version that
Hadoop release was built against (the aws-java-sdk-v2.version property of its hadoop-project POM).
Each jar is checked against the repository's SHA-1 file. Stops the build on any mismatch.
"""

from __future__ import annotations

import hashlib
import sys
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

MAVEN = "https://repo1.maven.org/maven2"
POM_NS = {"m": "http://maven.apache.org/POM/4.0.0"}
SDK_PROPERTY = "aws-java-sdk-v2.version"


def artifact_url(group: str, artifact: str, version: str, extension: str) -> str:
    return f"{MAVEN}/{group.replace('.', '/')}/{artifact}/{version}/{artifact}-{version}.{extension}"


def sdk_version(hadoop_project_pom: bytes) -> str:
    """The AWS SDK v2 version a hadoop-project POM pins."""
    found = ET.fromstring(hadoop_project_pom).find(f"m:properties/m:{SDK_PROPERTY}", POM_NS)
    if found is None or not (found.text or "").strip():
        raise SystemExit(f"hadoop-project POM has no {SDK_PROPERTY} property")
    return found.text.strip()  # type: ignore[union-attr]


def check_hadoop_version(jars: Path, version: str) -> None:
    """Stop unless pyspark's own Hadoop client is `version`."""
    found = sorted(p.name for p in jars.glob("hadoop-client-api-*.jar"))
    if found != [f"hadoop-client-api-{version}.jar"]:
        raise SystemExit(f"HADOOP_VERSION={version}, but pyspark ships {found}: set the build arg to match")


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as response:
        return bytes(response.read())


def fetch_verified(group: str, artifact: str, version: str, into: Path) -> None:
    data = fetch(artifact_url(group, artifact, version, "jar"))
    expected = fetch(artifact_url(group, artifact, version, "jar.sha1")).decode().split()[0]
    if hashlib.sha1(data).hexdigest() != expected:
        raise SystemExit(f"{artifact}-{version}.jar does not match its SHA-1")
    (into / f"{artifact}-{version}.jar").write_bytes(data)
    print(f"added {artifact}-{version}.jar")


def main(hadoop_version: str, jars_dir: str) -> None:
    jars = Path(jars_dir)
    check_hadoop_version(jars, hadoop_version)
    sdk = sdk_version(fetch(artifact_url("org.apache.hadoop", "hadoop-project", hadoop_version, "pom")))
    fetch_verified("org.apache.hadoop", "hadoop-aws", hadoop_version, jars)
    fetch_verified("software.amazon.awssdk", "bundle", sdk, jars)


if __name__ == "__main__":
    main(*sys.argv[1:3])
