"""The sandbox's own exceptions. It imports nothing of ar: the CLI translates these."""


class SandboxError(Exception):
    """The sandbox could not do what it was asked (start a job, create its log, ...)."""


class SandboxConfigError(SandboxError):
    """Limits or a confinement that make no sense (a negative time limit, a missing path)."""


class InvalidModel(Exception):
    """The scorer cannot give the model a trustworthy score (its code, weights or data, or
    what its workers answered); the message says why."""
