#!/usr/bin/env bash
# Runs every Shoal test, installing what the tests need first.
#
#   bash scripts/test.sh            # what CI runs (via .ci/run)
#
# 1. Python venv with slixmpp for the interop tests (scripts/test-deps.sh, idempotent).
#    Then the Kubernetes manifests, Prometheus rules and Grafana dashboards under
#    deploy/ (scripts/check-deploy.sh).
# 2. Formatting and lint checks (cargo fmt, clippy with warnings as errors).
# 3. The whole test suite: unit tests, framer fuzzing (bounded proptest), in-process
#    integration tests over real TCP/TLS, and the slixmpp interop test.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

bash scripts/test-deps.sh

echo "== deploy/: manifests, alert rules, dashboards"
bash scripts/check-deploy.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
# Integration tests open thousands of sockets; lift the soft fd limit as far as allowed.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo test --workspace --exclude shoal-tests
# The end-to-end tests boot real nodes (a cluster test three, plus a redis-server) and
# time failovers: one test at a time, so that on a small machine (CI has 2 cores) one
# test's nodes do not starve another's of the CPU their leases and timeouts assume.
cargo test -p shoal-tests -- --test-threads=1
