#!/usr/bin/env bash
# Installs the system pieces Lambdarec needs where they are missing: redis-server, a Java 17+
# runtime (Spark 4), a native BLAS (Spark ALS, implicit), Python's venv module and Prometheus
# (promtool and a short-lived prometheus check docker/alerts.yml in tests/test_alerts.py) and valgrind
# (`recs bench speed|serve --instructions` count Redis' instructions under callgrind).
# Uses apt-get on Debian/Ubuntu; elsewhere prints what to install and stops.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
java_major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1 || true)
if [ -z "${java_major}" ] || [ "${java_major}" -lt 17 ]; then missing+=(openjdk-17-jre-headless); fi
ldconfig -p 2>/dev/null | grep -q 'libblas\.so\.3 ' || missing+=(libopenblas0-pthread)
py=$(command -v python3.11 || command -v python3)
"$py" -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ "${WITH_BROWSER:-1}" = 1 ]; then command -v chromium >/dev/null 2>&1 || missing+=(chromium); fi

[ ${#missing[@]} -eq 0 ] && exit 0

if command -v apt-get >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then sudo="sudo -n"; else
      echo "setup: missing system packages: ${missing[*]}" >&2
      echo "setup: run: sudo apt-get install -y ${missing[*]}" >&2
      exit 1
    fi
  fi
  echo "setup: installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian's prometheus package enables a system service; the tests start their own on free ports.
  if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null 2>&1; then
    $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
else
  echo "setup: missing system packages: ${missing[*]}" >&2
  echo "setup: install them with your package manager (Redis 7+, Java 17+ runtime, OpenBLAS," >&2
  echo "       Python 3.11 with venv, Prometheus 2.x with promtool, valgrind, Chromium for the browser test)," >&2
  echo "       then run make again." >&2
  exit 1
fi
