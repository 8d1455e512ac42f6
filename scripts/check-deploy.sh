#!/usr/bin/env bash
# Checks the operations material under deploy/ (run by scripts/test.sh; the tools come
# from scripts/test-deps.sh):
#
# 1. builds every overlay with `kubectl kustomize` and validates each object of the
#    build (scripts/check_manifests.py): core kinds against the Kubernetes schemas
#    (kubernetes-validate, strict), the ServiceMonitor against the Prometheus
#    Operator's models, and the references between objects (selectors, named ports,
#    Secrets and ConfigMaps, the autoscaler's target);
# 2. `promtool check rules` on the rule files and `promtool test rules` on their unit
#    tests;
# 3. the Grafana dashboards are valid JSON.
#
# That every metric the dashboards and rules query is exported by a running node is
# checked by tests/tests/observability.rs.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT

for overlay in deploy/overlays/*/; do
  name=$(basename "$overlay")
  echo "== kubectl kustomize $overlay"
  # Current kubectl releases warn about the kustomize v2 fields the files keep for
  # old ones; the warnings are not what this checks.
  kubectl kustomize "$overlay" > "$BUILD/$name.yaml" 2> "$BUILD/$name.log" \
    || { cat "$BUILD/$name.log" >&2; exit 1; }
done
echo "== validate the manifests"
"$PY" scripts/check_manifests.py "$BUILD"/*.yaml

echo "== promtool check rules"
promtool check rules deploy/prometheus/alerts.yaml
echo "== promtool test rules"
(cd deploy/prometheus && promtool test rules alerts_test.yaml)

echo "== dashboards are JSON"
for dashboard in deploy/grafana/*.json; do
  "$PY" -m json.tool "$dashboard" > /dev/null
  echo "$dashboard: ok"
done
