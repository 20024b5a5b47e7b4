"""From documents to a model: validate each document on its own, then the whole set.

A `Document` is one Kubernetes-shaped mapping plus where it came from (file, index,
line) and, when the source has them, the line of every field path (YAML files do;
`loader.py` fills them in). Any source (files, Kubernetes, etcd) can build Documents and
call `validate_document` + `assemble`; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from controlplane.model import kinds
from controlplane.model.fields import (
    INVALID,
    Obj,
    not_supported_yet_message,
    Problems,
    Str,
    describe,
    optional,
    render_path,
    required,
    show,
    suggest,
)
from controlplane.model.objects import (
    ConfigIssue,
    LoadResult,
    MeshModel,
    MeshObject,
    Source,
    canonical_json,
    object_label,
    sorted_issues,
)

TOP_FIELDS = ("apiVersion", "kind", "metadata", "spec")

METADATA = Obj({
    "name": required(Str(max_len=253)),
    "namespace": optional(kinds.NAMESPACE_FIELD),
    "labels": optional(kinds.LABELS_FIELD),
    "annotations": optional(kinds.ANNOTATIONS_FIELD),
})


@dataclass
class Document:
    """One config document. `positions` maps field paths to 1-based lines; `parse_issues`
    are (path, line, message) problems the parser found (duplicate keys, unsupported tags)."""

    file: str
    index: int                      # 1-based position in its file
    data: Any
    line: int = 0                   # where the document starts
    positions: Mapping[tuple, int] = field(default_factory=dict)
    parse_issues: list[tuple[tuple, int, str]] = field(default_factory=list)

    def line_of(self, path: Iterable[Any]) -> int:
        """The line of the field at `path`, or of its closest written ancestor."""
        p = tuple(path)
        positions = self.positions
        while p:
            line = positions.get(p)
            if line:
                return line
            p = p[:-1]
        return self.line


@dataclass(frozen=True)
class Checked:
    """A validated document: the object when valid, and the identity when it could be read
    (so that an invalid object still counts for duplicates and does not cause "missing
    reference" noise in the objects that point at it)."""

    doc: Document
    obj: MeshObject | None
    key: tuple[str, str, str] | None
    label: str
    issues: tuple[ConfigIssue, ...] = ()

    def issue(self, path: tuple, message: str, severity: str = "error") -> ConfigIssue:
        return ConfigIssue(self.doc.file, self.doc.line_of(path), 0, self.label, render_path(path), message,
                           severity)


def _label(doc: Document, data: dict) -> tuple[str, tuple[str, str, str] | None]:
    kind = data.get("kind")
    fallback = f"document {doc.index}"
    if not isinstance(kind, str) or kind not in kinds.KINDS:
        return fallback, None
    meta = data.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    name = meta.get("name")
    ns = meta.get("namespace", "default")
    ns = ns if isinstance(ns, str) and ns else "default"
    if not isinstance(name, str) or not name:
        return f"{kind} ({fallback})", None
    return object_label(kind, ns, name), (kind, ns, name)


def validate_document(doc: Document) -> Checked:
    """Check one document against its kind's schema; never raises for bad input."""
    data = doc.data
    if not isinstance(data, dict):
        label = f"document {doc.index}"
        issue = ConfigIssue(doc.file, doc.line, 0, label, "",
                            f"a config document must be a mapping with apiVersion, kind, metadata and spec, "
                            f"got {describe(data)}")
        return Checked(doc, None, None, label, (issue,))

    label, key = _label(doc, data)
    problems = Problems()

    for k in data:
        if k not in TOP_FIELDS:
            if isinstance(k, str):
                problems.add((k,), "unknown field" + (suggest(k, TOP_FIELDS) or f" (known: {', '.join(TOP_FIELDS)})"))
            else:
                problems.add((k,), f"field names must be strings, got {describe(k)}")

    kind_spec = _check_type(data, problems)
    obj = None
    if kind_spec is not None:   # known kind: check the rest too, even when apiVersion is wrong
        obj = _check_object(kind_spec, data, problems, doc)

    issues = tuple([ConfigIssue(doc.file, line, 0, label, render_path(path), message)
                    for path, line, message in doc.parse_issues] +
                   [ConfigIssue(doc.file, doc.line_of(path), 0, label, render_path(path), message)
                    for path, message in problems.items])
    if issues:
        obj = None
    return Checked(doc, obj, key, label, issues)


def _check_type(data: dict, problems: Problems) -> kinds.KindSpec | None:
    """The KindSpec when `kind` is known (apiVersion problems are reported, not fatal)."""
    api, kind = data.get("apiVersion"), data.get("kind")
    spec = None
    if "kind" not in data:
        problems.add(("kind",), f"required field is missing (known kinds: {kinds.known_kinds_text()})")
    elif not isinstance(kind, str):
        problems.add(("kind",), f"must be a string, got {describe(kind)}")
    elif kind not in kinds.KINDS:
        problems.add(("kind",), f"unknown kind {show(kind)}{suggest(kind, kinds.KINDS)}; "
                                f"known kinds: {kinds.known_kinds_text()}")
    else:
        spec = kinds.KINDS[kind]
    if "apiVersion" not in data:
        problems.add(("apiVersion",), "required field is missing" + (f" (use {spec.api_version})" if spec else ""))
    elif not isinstance(api, str):
        problems.add(("apiVersion",), f"must be a string, got {describe(api)}")
    elif spec is None:
        if api not in kinds.API_VERSIONS:
            problems.add(("apiVersion",), f"unknown apiVersion {show(api)} (known: {', '.join(kinds.API_VERSIONS)})")
    elif api != spec.api_version:
        problems.add(("apiVersion",), f"{kind} is served as {spec.api_version}, not {show(api)}")
    return spec


def _check_object(ks: kinds.KindSpec, data: dict, problems: Problems, doc: Document) -> MeshObject | None:
    before = len(problems)
    if "metadata" not in data:
        problems.add(("metadata",), "required field is missing")
        return None
    raw_meta = data["metadata"]
    meta = METADATA.check(raw_meta, ("metadata",), problems)
    if meta is INVALID:   # still check the name, when it is at least a string
        meta = {}
        raw_name = raw_meta.get("name") if isinstance(raw_meta, dict) else None
        name = raw_name if isinstance(raw_name, str) and raw_name else None
    else:
        name = meta.get("name")
    if name is not None:
        msg = ks.name_rule(name)
        if msg:
            problems.add(("metadata", "name"), msg)
            name = None
    namespace = meta.get("namespace", "default")
    problems.namespace = namespace
    if ks.not_supported_yet:
        problems.add(("kind",), not_supported_yet_message(ks.not_supported_yet))

    if "spec" in data:
        spec = ks.spec.check(data["spec"], ("spec",), problems)
    elif ks.spec_required:
        problems.add(("spec",), "required field is missing")
        spec = INVALID
    else:
        spec = ks.spec.check({}, ("spec",), problems)

    if len(problems) != before or spec is INVALID or name is None:
        return None
    obj = MeshObject(
        kind=ks.kind, namespace=namespace, name=name, spec_json=canonical_json(spec), api_version=ks.api_version,
        labels=tuple(sorted(meta.get("labels", {}).items())),
        annotations=tuple(sorted(meta.get("annotations", {}).items())),
        source=Source(doc.file, doc.line),
    )
    object.__setattr__(obj, "_spec", spec)   # the parsed spec, shared read-only (see MeshObject.spec_view)
    return obj


def assemble(checked: Iterable[Checked], issues: Iterable[ConfigIssue] = ()) -> LoadResult:
    """Cross-object validation over every document, then the model (only when nothing is wrong)."""
    from controlplane.model.references import cross_check

    checked = list(checked)
    errors = [i for c in checked for i in c.issues]
    errors.extend(issues)
    objects, cross_errors, warnings = cross_check(checked)
    errors.extend(cross_errors)
    errors = sorted_issues(errors)
    warnings = sorted_issues(warnings)
    if errors:
        return LoadResult(None, errors, warnings)
    return LoadResult(MeshModel(tuple(objects)), [], warnings)


def validate_documents(docs: Iterable[Document], issues: Iterable[ConfigIssue] = ()) -> LoadResult:
    """Validate documents from any source into a model (or every issue found)."""
    return assemble((validate_document(d) for d in docs), issues)
