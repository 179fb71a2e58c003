"""The one family of domain errors. The core raises these; only the CLI prints them."""


class ArError(Exception):
    """An expected failure, shown to the user as one red line."""


class WorkspaceError(ArError):
    """No workspace, a broken workspace, or a directory that cannot become one."""


class ConfigError(ArError):
    """ar.toml is missing, unreadable or holds a bad value."""


class DataError(ArError):
    """A data source that cannot be read, is empty, or is too small to split."""


class GitError(ArError):
    """A git operation failed or found the repository in an unexpected state."""


class BusyError(ArError):
    """Another ar command is already running experiments in this workspace."""


class AgentError(ArError):
    """The agent could not produce a proposal (auth, unknown model, budget spent)."""
