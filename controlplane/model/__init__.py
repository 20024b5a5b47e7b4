"""The config model: objects, validation and the YAML loader.

    from controlplane.model import load_texts
    result = load_texts({"mesh.yaml": text})      # LoadResult(model | None, errors, warnings)
    for issue in result.errors: print(issue)      # file:line: Kind ns/name: field.path: message

Modules: `fields` (typed field validators), `kinds` (one schema per kind), `objects`
(MeshObject, MeshModel, ConfigIssue, LoadResult), `validate` (document -> object, and
the whole set), `references` (cross-object rules), `selection` (Service -> Workloads),
`loader` (YAML with line numbers).
"""

from controlplane.model.fields import format_duration, parse_duration
from controlplane.model.kinds import KINDS, KindSpec
from controlplane.model.loader import (
    FileResult,
    assemble,
    load_file,
    load_texts,
    parse_yaml,
)
from controlplane.model.objects import (
    ConfigIssue,
    LoadResult,
    MeshModel,
    MeshObject,
    MeshSettings,
    Source,
    canonical_json,
)
from controlplane.model.validate import (
    Checked,
    Document,
    validate_document,
    validate_documents,
)

__all__ = [
    "KINDS", "Checked", "ConfigIssue", "Document", "FileResult", "KindSpec", "LoadResult", "MeshModel",
    "MeshObject", "MeshSettings", "Source", "assemble", "canonical_json", "format_duration", "load_file",
    "load_texts", "parse_duration", "parse_yaml", "validate_document", "validate_documents",
]
