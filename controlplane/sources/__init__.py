"""Where desired state comes from. Today: a directory of YAML files (`files`)."""

from controlplane.sources.files import (
    DirectoryLoader,
    FileSource,
    load_directory,
    signature,
)

__all__ = ["DirectoryLoader", "FileSource", "load_directory", "signature"]
