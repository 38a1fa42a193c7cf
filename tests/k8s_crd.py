"""Validates custom resources against their CustomResourceDefinition, offline, as the API
server's schema validation would: `python tests/k8s_crd.py CRD.yaml MANIFEST.yaml ...`
checks every object in the manifests whose group and kind the CRD defines against the
openAPIV3Schema of its version, and prints one line per error; exit status 1 when there is one.

It runs in the k8s-check tools' environment (.venv-k8s: make k8s-tools), whose jsonschema
is the validator kubernetes-validate uses. The schema is read as the API server reads it:
- strict: a field the schema does not declare is an error (kubectl's
  --validate=strict; without it the server drops such a field, so a misspelt one would be
  lost silently), except under x-kubernetes-preserve-unknown-fields;
- x-kubernetes-list-type: set means unique items.
What it cannot check: metadata (the server validates names and labels itself), and CEL rules
(x-kubernetes-validations): it says so when a schema has any.
"""
from __future__ import annotations

import sys

import jsonschema
import yaml


def strict(schema):
    """The schema with unknown fields refused, as strict field validation does."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if schema.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def has_cel_rules(schema) -> bool:
    if isinstance(schema, dict):
        return "x-kubernetes-validations" in schema or any(map(has_cel_rules, schema.values()))
    if isinstance(schema, list):
        return any(map(has_cel_rules, schema))
    return False


def validators(crd: dict) -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """{(apiVersion, kind): validator} for each served version of the CRD."""
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    out = {}
    for version in crd["spec"]["versions"]:
        if not version.get("served"):
            continue
        schema = version["schema"]["openAPIV3Schema"]
        if has_cel_rules(schema):
            print(f"note: {kind} {version['name']} has CEL rules, not checked here")
        # metadata is the server's own: the CRD declares it as a bare object
        schema = strict(schema)
        schema["properties"]["metadata"] = {"type": "object"}
        out[(f"{group}/{version['name']}", kind)] = jsonschema.Draft4Validator(schema)
    return out


def main(crd_path: str, *manifests: str) -> int:
    with open(crd_path) as f:
        (crd,) = [d for d in yaml.safe_load_all(f) if d]
    checks = validators(crd)
    errors = checked = 0
    for path in manifests:
        with open(path) as f:
            for obj in filter(None, yaml.safe_load_all(f)):
                validator = checks.get((obj.get("apiVersion"), obj.get("kind")))
                if validator is None:
                    continue
                checked += 1
                name = f"{path}: {obj['kind']}/{obj.get('metadata', {}).get('name')}"
                found = sorted(validator.iter_errors(obj), key=lambda e: list(e.path))
                for e in found:
                    print(f"{name}: {'.'.join(map(str, e.path)) or '(root)'}: {e.message}")
                errors += len(found)
                if not found:
                    print(f"{name}: valid")
    if not checked:
        print(f"no {crd['spec']['names']['kind']} in {', '.join(manifests)}")
        return 1
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
