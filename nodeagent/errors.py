"""Errors the node agent reports to users: each message names what is wrong and where."""


class AgentError(Exception):
    """Base for every error the agent turns into a clear message and a non-zero exit."""


class ConfigError(AgentError):
    """A bootstrap file, flag or snapshot is malformed; the message names the field."""


class CaptureError(AgentError):
    """Traffic capture cannot be installed, verified or removed on this host."""


class ProxyError(AgentError):
    """A listener cannot start (port in use, missing privilege, ...)."""
