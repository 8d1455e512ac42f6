"""Validates built Kubernetes manifests (the output of `kubectl kustomize`).

    check_manifests.py BUILD.yaml...

For every object:
- core kinds against the Kubernetes OpenAPI schemas of each version in KUBERNETES
  (kubernetes-validate, strict: unknown fields are errors);
- the Prometheus Operator's ServiceMonitor, which those schemas do not know, against
  the operator's typed models (cloudcoil): it must parse, and dumping the parsed model
  must give the object back, so an unknown or misspelt field is an error too.
Then what no schema sees, across the objects of one build: selectors that select
nothing, named ports that do not exist, references to objects that are not there.

Exits 1 and names every problem if there is one.
"""

import sys

import kubernetes_validate
import yaml
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

# The oldest Kubernetes the manifests are meant for (policy/v1, autoscaling/v2,
# StatefulSet minReadySeconds) and the newest the schemas know.
KUBERNETES = ["1.25.0", "1.34.0"]

# Secrets the operator creates before applying an overlay (docs/operations.md); an
# overlay may generate them instead.
SECRETS_CREATED_BY_HAND = {"shoal-secrets", "shoal-tls"}

WORKLOADS = {"StatefulSet", "Deployment", "DaemonSet"}


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def check_schemas(objects, problems):
    for obj in objects:
        what = f"{obj['kind']} {obj['metadata']['name']}"
        if obj["kind"] == "ServiceMonitor":
            back = ServiceMonitor.model_validate(obj).model_dump(
                mode="json", by_alias=True, exclude_unset=True
            )
            if back != obj:
                problems.append(f"{what}: fields the ServiceMonitor schema does not have")
            continue
        for version in KUBERNETES:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{what} (Kubernetes {version}): {e.message} at {list(e.path)}")


def check_references(objects, problems):
    by_kind = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    pods = [  # (workload name, pod labels, pod spec)
        (w["metadata"]["name"], w["spec"]["template"]["metadata"]["labels"], w["spec"]["template"]["spec"])
        for kind in WORKLOADS
        for w in by_kind.get(kind, {}).values()
    ]

    def selected(selector):
        return [p for p in pods if selects(selector, p[1])]

    def port_names(pod_specs):
        return {p["name"] for spec in pod_specs for c in spec["containers"] for p in c.get("ports", [])}

    for name, svc in by_kind.get("Service", {}).items():
        chosen = selected(svc["spec"]["selector"])
        if not chosen:
            problems.append(f"Service {name} selects no pods")
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort")
            if isinstance(target, str) and target not in port_names(s for _, _, s in chosen):
                problems.append(f"Service {name}: no container port named {target}")
    for name, sm in by_kind.get("ServiceMonitor", {}).items():
        services = [
            s for s in by_kind.get("Service", {}).values()
            if selects(sm["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))
        ]
        if len(services) != 1:
            problems.append(f"ServiceMonitor {name} selects {len(services)} services, not 1")
        ports = {p.get("name") for s in services for p in s["spec"]["ports"]}
        for endpoint in sm["spec"]["endpoints"]:
            if endpoint["port"] not in ports:
                problems.append(f"ServiceMonitor {name}: its service has no port {endpoint['port']}")
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for name, obj in by_kind.get(kind, {}).items():
            selector = (obj["spec"].get("selector") or obj["spec"]["podSelector"]).get("matchLabels", {})
            chosen = selected(selector)
            if selector and not chosen:
                problems.append(f"{kind} {name} selects no pods")
            for rule in obj["spec"].get("ingress", []):
                for port in rule.get("ports", []):
                    if isinstance(port["port"], str) and port["port"] not in port_names(s for _, _, s in chosen):
                        problems.append(f"{kind} {name}: no container port named {port['port']}")
                for peer in rule.get("from", []):
                    if "podSelector" in peer and not selected(peer["podSelector"]["matchLabels"]):
                        problems.append(f"{kind} {name}: admits pods that do not exist")
    for name, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
        target = hpa["spec"]["scaleTargetRef"]
        if target["name"] not in by_kind.get(target["kind"], {}):
            problems.append(f"HorizontalPodAutoscaler {name}: no {target['kind']} {target['name']}")
    secrets = set(by_kind.get("Secret", {})) | SECRETS_CREATED_BY_HAND
    config_maps = set(by_kind.get("ConfigMap", {}))
    for workload, _, spec in pods:
        refs = []
        for c in spec["containers"]:
            for env in c.get("env", []):
                source = env.get("valueFrom", {})
                if "secretKeyRef" in source:
                    refs.append(("Secret", source["secretKeyRef"]["name"]))
                if "configMapKeyRef" in source:
                    refs.append(("ConfigMap", source["configMapKeyRef"]["name"]))
            for env in c.get("envFrom", []):
                if "configMapRef" in env:
                    refs.append(("ConfigMap", env["configMapRef"]["name"]))
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                refs.append(("Secret", volume["secret"]["secretName"]))
            if "configMap" in volume:
                refs.append(("ConfigMap", volume["configMap"]["name"]))
        for kind, ref in refs:
            if ref not in (secrets if kind == "Secret" else config_maps):
                problems.append(f"{workload}: no {kind} {ref}")


def main(paths):
    failed = False
    for path in paths:
        with open(path) as f:
            objects = [o for o in yaml.safe_load_all(f) if o]
        problems = []
        check_schemas(objects, problems)
        check_references(objects, problems)
        kinds = sorted({o["kind"] for o in objects})
        if problems:
            failed = True
            print(f"{path}: {len(problems)} problem(s)")
            for p in problems:
                print(f"  {p}")
        else:
            print(f"{path}: {len(objects)} objects valid ({', '.join(kinds)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
