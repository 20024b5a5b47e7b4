"""A small kustomize renderer for the subset daemonset/ uses, so CI needs no kustomize binary.

There is no kustomize on PyPI or in Debian 12 (its kubectl 1.20 `kustomize` is years old),
so the tests render the overlays themselves. Supported, with kustomize's meaning:

- `resources`: YAML files (several documents each) and directories holding a
  kustomization.yaml, rendered recursively, in order;
- `patches` with a `target` (group, version, kind, name, namespace: exact matches) and a
  JSON 6902 patch, inline (`patch`) or in a file (`path`): ops add, remove, replace, test.

Anything else (another field, a strategic-merge patch, a remote resource, a target that
matches nothing, two resources with the same id) is an error naming it, never ignored:
extend this file and its tests (tests/test_kustomize.py) before the overlays use more.
`kubectl kustomize` renders the same objects (kustomize may order them differently).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION = "kustomization.yaml"
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "patches"}
TARGET_FIELDS = ("group", "version", "kind", "name", "namespace")


class KustomizeError(Exception):
    """The kustomization uses something this renderer does not do, or is wrong."""


def render(directory: str | Path) -> list[dict]:
    """The objects of the kustomization in `directory`, patched."""
    directory = Path(directory)
    kfile = directory / KUSTOMIZATION
    try:
        k = yaml.safe_load(kfile.read_text()) or {}
    except OSError as exc:
        raise KustomizeError(f"{kfile}: cannot read: {exc.strerror}") from None
    unknown = set(k) - SUPPORTED_FIELDS
    if unknown:
        raise KustomizeError(f"{kfile}: {', '.join(sorted(unknown))} not supported by tests/kustomize.py "
                             f"(supported: {', '.join(sorted(SUPPORTED_FIELDS))})")
    objects: list[dict] = []
    for entry in k.get("resources") or []:
        objects += _resource(directory, entry, kfile)
    _refuse_duplicates(objects, kfile)
    for i, p in enumerate(k.get("patches") or []):
        _apply_patch(objects, p, directory, f"{kfile}: patches[{i}]")
    return objects


def _resource(directory: Path, entry: str, kfile: Path) -> list[dict]:
    if "://" in entry or entry.startswith("github.com/"):
        raise KustomizeError(f"{kfile}: remote resource {entry!r} not supported")
    path = (directory / entry).resolve()
    if path.is_dir():
        return render(path)
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except OSError as exc:
        raise KustomizeError(f"{kfile}: resource {entry}: {exc.strerror}") from None
    out = [d for d in docs if d is not None]
    for d in out:
        if not isinstance(d, dict) or "kind" not in d or "metadata" not in d:
            raise KustomizeError(f"{path}: every document must be a Kubernetes object (kind, metadata)")
    return out


def object_id(obj: dict) -> tuple[str, str, str, str]:
    group = obj.get("apiVersion", "").rpartition("/")[0]
    meta = obj.get("metadata") or {}
    return group, obj.get("kind", ""), meta.get("namespace", ""), meta.get("name", "")


def _refuse_duplicates(objects: list[dict], kfile: Path) -> None:
    seen: set = set()
    for obj in objects:
        oid = object_id(obj)
        if oid in seen:
            raise KustomizeError(f"{kfile}: two resources with the id {'/'.join(x or '-' for x in oid)}")
        seen.add(oid)


def _matches(obj: dict, target: dict) -> bool:
    group, _, version = obj.get("apiVersion", "").rpartition("/")
    meta = obj.get("metadata") or {}
    have = {"group": group, "version": version, "kind": obj.get("kind"), "name": meta.get("name"),
            "namespace": meta.get("namespace", "")}
    return all(have[key] == target[key] for key in TARGET_FIELDS if key in target)


def _apply_patch(objects: list[dict], p: dict, directory: Path, where: str) -> None:
    target = p.get("target")
    if not isinstance(target, dict) or set(target) - set(TARGET_FIELDS):
        raise KustomizeError(f"{where}: needs a target of {', '.join(TARGET_FIELDS)} (exact values only)")
    if ("path" in p) == ("patch" in p):
        raise KustomizeError(f"{where}: give exactly one of path and patch")
    text = (directory / p["path"]).read_text() if "path" in p else p["patch"]
    ops = yaml.safe_load(text)
    if not isinstance(ops, list):
        raise KustomizeError(f"{where}: only JSON 6902 patches (a list of ops) are supported, "
                             f"not strategic-merge patches")
    hits = [i for i, obj in enumerate(objects) if _matches(obj, target)]
    if not hits:
        raise KustomizeError(f"{where}: the target {target} matches no resource")
    for i in hits:
        objects[i] = json_patch(objects[i], ops, where)


# ---------------------------------------------------------------- JSON patch (RFC 6902)


def _pointer(path: str, where: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise KustomizeError(f"{where}: {path!r} is not a JSON pointer")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _index(container: list, token: str, where: str, *, append_ok: bool) -> int:
    if token == "-" and append_ok:
        return len(container)
    if not token.isdigit() or (token != "0" and token.startswith("0")):
        raise KustomizeError(f"{where}: {token!r} is not a list index")
    i = int(token)
    if i > len(container) or (i == len(container) and not append_ok):
        raise KustomizeError(f"{where}: index {i} is out of range (the list has {len(container)} items)")
    return i


def _parent(doc: Any, parts: list[str], where: str) -> Any:
    node = doc
    for token in parts[:-1]:
        if isinstance(node, dict):
            if token not in node:
                raise KustomizeError(f"{where}: {token!r} does not exist")
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, where, append_ok=False)]
        else:
            raise KustomizeError(f"{where}: {token!r} is below a scalar")
    return node


def json_patch(doc: dict, ops: list[dict], where: str = "patch") -> dict:
    """`doc` with the RFC 6902 ops add, remove, replace and test applied (a copy)."""
    doc = copy.deepcopy(doc)
    for n, op in enumerate(ops):
        at = f"{where}[{n}] {op.get('op')} {op.get('path')}"
        kind = op.get("op")
        if kind not in ("add", "remove", "replace", "test"):
            raise KustomizeError(f"{at}: op {kind!r} not supported (add, remove, replace, test)")
        parts = _pointer(op.get("path", ""), at)
        if not parts:
            raise KustomizeError(f"{at}: the whole document cannot be patched")
        parent, last = _parent(doc, parts, at), parts[-1]
        if kind == "test":
            current = parent[_index(parent, last, at, append_ok=False)] if isinstance(parent, list) \
                else parent.get(last, _ABSENT)
            if current != op.get("value"):
                raise KustomizeError(f"{at}: test failed: found {current!r}, expected {op.get('value')!r}")
        elif isinstance(parent, list):
            i = _index(parent, last, at, append_ok=kind == "add")
            if kind == "add":
                parent.insert(i, copy.deepcopy(op["value"]))
            elif kind == "remove":
                del parent[i]
            else:
                parent[i] = copy.deepcopy(op["value"])
        elif isinstance(parent, dict):
            if kind != "add" and last not in parent:
                raise KustomizeError(f"{at}: {last!r} does not exist")
            if kind == "remove":
                del parent[last]
            else:
                parent[last] = copy.deepcopy(op["value"])
        else:
            raise KustomizeError(f"{at}: the parent is a scalar")
    return doc


_ABSENT = object()
