"""What every config source shares: turning each load into the callbacks the control plane
listens to, while keeping the last good model.

`on_change(model)` after a successful load whose model differs from the last one reported
(or after a failed load: the errors are gone); `on_error(errors)` after a failed load whose
errors differ from the last ones reported. A source never reports a partial model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from controlplane.model import ConfigIssue, LoadResult, MeshModel

log = logging.getLogger("hostmesh.controlplane.sources")


class ReportingSource:
    kind = "source"

    def __init__(self, on_change: Callable[[MeshModel], None],
                 on_error: Callable[[list[ConfigIssue]], None]) -> None:
        self.on_change = on_change
        self.on_error = on_error
        self.model: MeshModel | None = None          # the last good model
        self.errors: list[ConfigIssue] = []          # the errors of the last load ([] when it was good)
        self.warnings: list[ConfigIssue] = []
        self.loads = 0

    def _report(self, result: LoadResult) -> None:
        self.loads += 1
        self.warnings = result.warnings
        if result.errors:
            if result.errors != self.errors:
                self.errors = result.errors
                log.error("config rejected; keeping the last good config:\n%s", result.error_text())
                self.on_error(result.errors)
            return
        had_errors, self.errors = bool(self.errors), []
        model = result.model
        if model != self.model or had_errors:
            self.model = model
            log.info("config loaded: version %s, %s", model.version, model.counts())
            self.on_change(model)
