#!/usr/bin/env bash
# Install what the tests need: redis-server from Debian (the Redis storage backend
# and cluster tests start their own servers on free loopback ports), haproxy (the
# PROXY protocol test runs one in front of a node), Prosody from Debian with
# lua-unbound (the federation interop test runs its own Prosody on loopback ports,
# resolving through the test's DNS server), kubectl (its built-in kustomize) and
# promtool from Debian for scripts/check-deploy.sh, and a Python venv at .venv in the
# repo root with tests/interop/requirements.txt and
# scripts/check-deploy.requirements.txt in it.
#
# Idempotent and cheap on re-runs: pip is only invoked when a requirements file
# or the interpreter changed since the last successful install (a stamp file
# inside .venv records both). Meant for CI on a fresh Debian machine as root;
# reaches only PyPI and Debian's archive (redis-server, haproxy, prosody,
# lua-unbound, kubernetes-client, prometheus; python3/venv if missing).
#
# env: PYTHON  interpreter to build the venv from (default: python3 on PATH,
#              i.e. pyenv's CPython 3.11 on the project's machines, else Debian's)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
REQS=("$ROOT/tests/interop/requirements.txt" "$ROOT/scripts/check-deploy.requirements.txt")
STAMP="$VENV/.test-deps.stamp"
PYTHON_SET=${PYTHON:+yes}
PYTHON=${PYTHON:-python3}

say() { echo "test-deps: $*"; }

apt_install() {
  # The package lists may be empty on a fresh machine, so refresh them first.
  say "apt-get install $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "$@" >/dev/null
}

if ! command -v redis-server >/dev/null 2>&1; then
  apt_install redis-server
fi
say "redis-server: $(redis-server --version | cut -d' ' -f3)"

# kubectl for `kubectl kustomize`: Debian's kubernetes-client unless a kubectl is
# there already (installing it over another package's /usr/bin/kubectl would fail).
if ! command -v kubectl >/dev/null 2>&1; then
  apt_install kubernetes-client
fi

# Servers the tests start themselves (a real HAProxy in front of a node; a Prosody to
# federate with) and Prometheus (for its promtool only): installed without their
# recommendations and without starting their system services (policy-rc.d 101 =
# "action forbidden"), unless the machine has a policy of its own.
servers=()
command -v haproxy >/dev/null 2>&1 || servers+=(haproxy)
command -v prosody >/dev/null 2>&1 || servers+=(prosody)
dpkg -s lua-unbound >/dev/null 2>&1 || servers+=(lua-unbound)
command -v promtool >/dev/null 2>&1 || servers+=(prometheus)
if [ ${#servers[@]} -gt 0 ]; then
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt_install --no-install-recommends "${servers[@]}"
fi
say "haproxy: $(haproxy -v | head -1 | cut -d' ' -f3); prosody: $(dpkg-query -W -f '${Version}' prosody)"
say "$(kubectl version --client 2>/dev/null | head -1); $(promtool --version 2>&1 | head -1)"

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  if [ -n "$PYTHON_SET" ]; then
    say "error: PYTHON=$PYTHON not found" >&2
    exit 1
  fi
  apt_install python3 python3-venv
fi

# slixmpp 1.17 requires CPython >= 3.11 (Debian 12's python3 is 3.11).
if ! pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); then
  say "error: cannot run '$PYTHON' (set PYTHON=/path/to/python3.11+)" >&2
  exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  say "error: $PYTHON is Python $pyver, need >= 3.11 (set PYTHON=/path/to/python3.11+)" >&2
  exit 1
fi

# Debian splits ensurepip out of python3.X into python3.X-venv; without it
# `python3 -m venv` fails half-way. pyenv's builds always have it.
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  apt_install python3-venv "python$pyver-venv"
fi

# The stamp ties the install to the interpreter and the requirements, so a
# changed pin or a different/removed base Python triggers a reinstall.
want="$("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])') $(cat "${REQS[@]}" | sha256sum | cut -d' ' -f1)"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1 \
   && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  say "up to date: $VENV ($("$VENV/bin/python" -V 2>&1), $(cat "${REQS[@]}" | grep -c '^[a-zA-Z]') pinned packages)"
  exit 0
fi

# A venv whose base interpreter vanished or changed cannot be repaired in
# place; rebuilding it is cheap.
if [ -e "$VENV" ]; then
  say "rebuilding $VENV (interpreter or requirements changed)"
  rm -rf -- "$VENV"
fi
say "creating venv $VENV with $("$PYTHON" -V 2>&1) ($(command -v "$PYTHON"))"
"$PYTHON" -m venv "$VENV"

say "pip install -r ${REQS[*]#"$ROOT"/}"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "${REQS[@]/#/--requirement=}"
# Fail here, not in the first test, if the install is broken.
"$VENV/bin/python" -c 'import slixmpp, kubernetes_validate, cloudcoil.models.prometheus_operator'
echo "$want" > "$STAMP"
say "installed: $("$VENV/bin/python" -m pip freeze --disable-pip-version-check | paste -sd' ')"
