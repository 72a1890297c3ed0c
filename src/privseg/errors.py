"""Errors a user can cause and fix: the CLI prints them without a traceback."""

from __future__ import annotations


class PrivsegError(Exception):
    """Base class of user-facing errors (bad input, bad config, exhausted budget)."""


class ConfigError(PrivsegError, ValueError):
    """A config field has a value that is not allowed; the message names field, value, rule."""


class DataError(PrivsegError, ValueError):
    """Input data is missing, malformed or inconsistent; the message names the file."""


class PrivacyBudgetExceeded(PrivsegError):
    """A site refused to train because the round would overspend its (epsilon, delta) budget."""


class CheckpointError(PrivsegError, ValueError):
    """A checkpoint is missing, corrupt, or belongs to another model."""


class FederationError(PrivsegError, RuntimeError):
    """The federation could not be set up or run (unreachable server, bad certificates...)."""
