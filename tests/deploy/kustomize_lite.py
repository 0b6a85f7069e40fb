"""Build a kustomization in pure Python, for the subset of kustomize that deploy/kubernetes uses.

No kustomize binary is needed, so CI can schema-check the exact objects `kubectl apply -k` would
send. Supported: `resources` (files and directories), `namespace`, `labels` (metadata only),
`images`, and `patches` holding JSON 6902 operations (add, remove, replace). Any other field fails
loudly, so an overlay that outgrows this subset is noticed instead of half-built. Where kubectl is
installed, a test compares this output with `kubectl kustomize`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}
CLUSTER_SCOPED_KINDS = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
    "StorageClass", "RuntimeClass", "PriorityClass", "APIService", "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration", "Node",
}
POD_SPEC_PATHS = {  # kind -> keys from the object to its PodSpec
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}


class KustomizeError(Exception):
    pass


def build(directory: str | Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize DIRECTORY` would print (order aside)."""
    directory = Path(directory)
    kustomization = _read_kustomization(directory)
    unknown = set(kustomization) - SUPPORTED_FIELDS
    if unknown:
        raise KustomizeError(f"{directory}: kustomize_lite does not support {sorted(unknown)}")

    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects.extend(build(path))
        elif path.is_file():
            objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
        else:
            raise KustomizeError(f"{directory}: resource {entry} does not exist")

    for patch in kustomization.get("patches", []):
        _apply_patch(directory, patch, objects)
    for label_set in kustomization.get("labels", []):
        _apply_labels(label_set, objects)
    for image in kustomization.get("images", []):
        _apply_image(image, objects)
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED_KINDS:
                obj.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    _check_unique(directory, objects)
    return objects


def _read_kustomization(directory: Path) -> dict[str, Any]:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (directory / name).is_file():
            data = yaml.safe_load((directory / name).read_text()) or {}
            if data.get("kind", "Kustomization") != "Kustomization":
                raise KustomizeError(f"{directory / name}: kind is {data.get('kind')}, not Kustomization")
            return data
    raise KustomizeError(f"{directory}: no kustomization.yaml")


def _matches(target: dict[str, Any], obj: dict[str, Any]) -> bool:
    unknown = set(target) - {"kind", "name", "namespace", "group", "version"}
    if unknown:
        raise KustomizeError(f"patch target fields {sorted(unknown)} are not supported")
    group, _, version = obj["apiVersion"].rpartition("/")
    wanted = {
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "namespace": obj["metadata"].get("namespace"),
        "group": group,
        "version": version,
    }
    return all(wanted[key] == value for key, value in target.items())


def _apply_patch(directory: Path, patch: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    if "patch" in patch:
        operations = yaml.safe_load(patch["patch"])
    elif "path" in patch:
        operations = yaml.safe_load((directory / patch["path"]).read_text())
    else:
        raise KustomizeError(f"{directory}: a patch needs `patch` or `path`")
    if not isinstance(operations, list):
        raise KustomizeError(f"{directory}: only JSON 6902 patches (a list of operations) are supported")
    if "target" not in patch:
        raise KustomizeError(f"{directory}: a JSON 6902 patch needs a target")
    targets = [obj for obj in objects if _matches(patch["target"], obj)]
    if not targets:
        raise KustomizeError(f"{directory}: patch target {patch['target']} matches no object")
    for obj in targets:
        for operation in operations:
            _apply_operation(obj, operation)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _apply_operation(obj: dict[str, Any], operation: dict[str, Any]) -> None:
    op, parts = operation["op"], _pointer(operation["path"])
    parent: Any = obj
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    try:
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if op == "add":
                parent.insert(index, copy.deepcopy(operation["value"]))
            elif op == "replace":
                parent[index] = copy.deepcopy(operation["value"])
            elif op == "remove":
                del parent[index]
            else:
                raise KustomizeError(f"JSON 6902 op {op!r} is not supported")
        else:
            if op in ("replace", "remove") and last not in parent:
                raise KustomizeError(f"{operation['path']} does not exist in {obj['kind']}")
            if op in ("add", "replace"):
                parent[last] = copy.deepcopy(operation["value"])
            elif op == "remove":
                del parent[last]
            else:
                raise KustomizeError(f"JSON 6902 op {op!r} is not supported")
    except (IndexError, KeyError, ValueError) as error:
        raise KustomizeError(f"cannot {op} {operation['path']} in {obj['kind']}: {error}") from error


def _apply_labels(label_set: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    unknown = set(label_set) - {"pairs", "includeSelectors", "includeTemplates"}
    if unknown or label_set.get("includeSelectors") or label_set.get("includeTemplates"):
        raise KustomizeError("only `labels: [{pairs: ...}]` on metadata is supported")
    for obj in objects:
        obj.setdefault("metadata", {}).setdefault("labels", {}).update(label_set["pairs"])


def _split_image(image: str) -> tuple[str, str]:
    """'registry:5000/a/b:tag' -> ('registry:5000/a/b', ':tag'); digests kept with '@'."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def _apply_image(rule: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    unknown = set(rule) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise KustomizeError(f"images fields {sorted(unknown)} are not supported")
    for obj in objects:
        spec: Any = obj
        for key in POD_SPEC_PATHS.get(obj["kind"], ()):
            spec = spec.get(key, {}) if isinstance(spec, dict) else {}
        if obj["kind"] not in POD_SPEC_PATHS:
            continue
        for container in spec.get("initContainers", []) + spec.get("containers", []):
            name, suffix = _split_image(container["image"])
            if name != rule["name"]:
                continue
            name = rule.get("newName", name)
            if "digest" in rule:
                suffix = "@" + rule["digest"]
            elif "newTag" in rule:
                suffix = ":" + str(rule["newTag"])
            container["image"] = name + suffix


def _check_unique(directory: Path, objects: list[dict[str, Any]]) -> None:
    seen = set()
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if key in seen:
            raise KustomizeError(f"{directory}: {key} is defined twice")
        seen.add(key)
