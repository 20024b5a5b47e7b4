"""Errors the control plane reports: each message says what is wrong and where."""

from __future__ import annotations

from collections.abc import Iterable


class ControlPlaneError(Exception):
    """Base for every control-plane error turned into a clear message."""


class ConfigInvalid(ControlPlaneError):
    """The desired state has errors; `issues` holds every one (ConfigIssue), str() lists them."""

    def __init__(self, issues: Iterable[object]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues) or "invalid config")


class SnapshotError(ControlPlaneError):
    """A built snapshot failed its consistency check; it must not be published."""
