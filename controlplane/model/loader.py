"""YAML text -> Documents (with the line of every field) -> validated model.

Multi-document files are split at `---` lines and each document is parsed on its own, so
a syntax error in one document is reported with its line and column and the others are
still checked (one load reports everything). Parsing uses libyaml when available (fast)
and re-parses a failing document with the pure-Python parser for its clearer, stable
message. Nodes are converted by hand (not yaml.safe_load) to record positions, to reject
duplicate keys (PyYAML silently keeps the last) and merge keys, and to bound alias
expansion.

No file I/O here: `sources/files.py` reads the directory and calls `load_file`/`assemble`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from controlplane.model.fields import show
from controlplane.model.objects import ConfigIssue, LoadResult
from controlplane.model.validate import Checked, Document, validate_document
from controlplane.model.validate import assemble as assemble_checked

_FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DOC_START = re.compile(r"^---(?:[ \t\r]|$)")
_DIRECTIVE_OR_BLANK = re.compile(r"^(?:%.*|[ \t]*(?:#.*)?)$")
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
MAX_VALUES_PER_DOCUMENT = 100_000
_constructor = SafeConstructor()


@dataclass(frozen=True)
class FileResult:
    """One file's documents, each validated on its own, plus the file's syntax-level issues."""

    file: str
    checked: tuple[Checked, ...]
    issues: tuple[ConfigIssue, ...] = ()


class _Abort(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


def split_documents(text: str) -> list[tuple[int, str]]:
    """[(first line index, text)] per document; `---` starts a new one (directives stay with it)."""
    chunks: list[tuple[int, list[str]]] = [(0, [])]
    for i, line in enumerate(text.splitlines(keepends=True)):
        if _DOC_START.match(line):
            lines = chunks[-1][1]
            if any(not _DIRECTIVE_OR_BLANK.match(x.rstrip("\r\n")) for x in lines):
                chunks.append((i, [line]))
                continue
        chunks[-1][1].append(line)
    return [(start, "".join(lines)) for start, lines in chunks if lines]


def parse_yaml(file: str, text: str) -> tuple[list[Document], list[ConfigIssue]]:
    """Documents of one YAML text (empty documents skipped) and its syntax errors."""
    docs: list[Document] = []
    issues: list[ConfigIssue] = []
    index = 0
    for offset, chunk in split_documents(text):
        try:
            node = yaml.compose(chunk, Loader=_FAST_LOADER)
        except yaml.YAMLError as fast_exc:
            issues.append(_syntax_issue(file, offset, chunk, fast_exc))
            index += 1
            continue
        if node is None or (isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null"):
            continue
        index += 1
        doc = Document(file=file, index=index, data=None, line=node.start_mark.line + 1 + offset)
        positions: dict[tuple, int] = {}
        try:
            doc.data = _Converter(offset, positions, doc.parse_issues, doc.line).convert(node, ())
        except _Abort as exc:
            issues.append(ConfigIssue(file, exc.line, 0, f"document {index}", "", exc.message))
            continue
        doc.positions = positions
        docs.append(doc)
    return docs, issues


def _syntax_issue(file: str, offset: int, chunk: str, fast_exc: yaml.YAMLError) -> ConfigIssue:
    exc: Any = fast_exc
    try:   # the pure-Python parser words its errors better and the same on every platform
        yaml.compose(chunk, Loader=yaml.SafeLoader)
    except yaml.YAMLError as slow_exc:
        exc = slow_exc
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    message = f"YAML syntax error: {problem}"
    context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context:
        message += f" ({context}"
        if cmark is not None:
            message += f" at line {cmark.line + 1 + offset}, column {cmark.column + 1}"
        message += ")"
    if mark is None:
        return ConfigIssue(file, offset + 1, 0, "", "", message)
    return ConfigIssue(file, mark.line + 1 + offset, mark.column + 1, "", "", message)


class _Converter:
    """Node tree -> plain Python values, recording the line of every mapping key / list item."""

    def __init__(self, offset: int, positions: dict[tuple, int], parse_issues: list, doc_line: int) -> None:
        self.offset = offset
        self.doc_line = doc_line
        self.positions = positions
        self.parse_issues = parse_issues
        self.budget = MAX_VALUES_PER_DOCUMENT

    def line(self, node) -> int:
        return node.start_mark.line + 1 + self.offset

    def convert(self, node, path: tuple) -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise _Abort(self.doc_line, f"document has more than {MAX_VALUES_PER_DOCUMENT} values "
                                          f"(after expanding aliases)")
        if len(path) > 64:
            raise _Abort(self.doc_line, "document is nested more than 64 levels deep")
        if isinstance(node, ScalarNode):
            return self.scalar(node, path)
        if isinstance(node, SequenceNode):
            out = []
            for i, item in enumerate(node.value):
                p = path + (i,)
                self.positions[p] = self.line(item)
                out.append(self.convert(item, p))
            return out
        if isinstance(node, MappingNode):
            out: dict[Any, Any] = {}
            for knode, vnode in node.value:
                if knode.tag == _MERGE_TAG:
                    self.parse_issues.append((path, self.line(knode), "YAML merge keys (<<) are not supported"))
                    continue
                if not isinstance(knode, ScalarNode):
                    self.parse_issues.append((path, self.line(knode), "mapping keys must be plain scalars"))
                    continue
                key = self.scalar(knode, path)
                p = path + (key,)
                if key in out:
                    self.parse_issues.append(
                        (p, self.line(knode), f"duplicate key {show(key)} (first at line {self.positions[p]})"))
                    continue
                self.positions[p] = self.line(knode)
                out[key] = self.convert(vnode, p)
            return out
        raise _Abort(self.line(node), f"unsupported YAML node {type(node).__name__}")  # pragma: no cover

    def scalar(self, node: ScalarNode, path: tuple) -> Any:
        if node.tag == _STR_TAG:
            return node.value
        fn = _constructor.yaml_constructors.get(node.tag)
        if fn is None or node.tag is None:
            self.parse_issues.append((path, self.line(node), f"unsupported YAML tag {node.tag}"))
            return node.value
        try:
            return fn(_constructor, node)
        except (ConstructorError, ValueError) as exc:
            self.parse_issues.append((path, self.line(node), f"invalid {node.tag} value: {exc}"))
            return node.value


def load_file(file: str, text: str) -> FileResult:
    """Parse and validate each document of one file (independent of every other file)."""
    docs, issues = parse_yaml(file, text)
    return FileResult(file, tuple(validate_document(d) for d in docs), tuple(issues))


def assemble(results: Iterable[FileResult]) -> LoadResult:
    """Cross-check the documents of all files (in the given order) into one LoadResult."""
    results = list(results)
    return assemble_checked((c for r in results for c in r.checked), (i for r in results for i in r.issues))


def load_texts(files: Mapping[str, str]) -> LoadResult:
    """Validate a set of YAML texts {file name: text}, taken in sorted name order."""
    return assemble(load_file(name, files[name]) for name in sorted(files))
