"""hostmesh: the `hostmesh` command line and the version shared by every component."""

__version__ = "0.1.0"
