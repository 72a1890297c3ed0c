"""Errors a user can cause and fix: the CLI prints them without a traceback."""

from __future__ import annotations

import errno
import os

# The disk is full, a file-size limit (ulimit -f) or a quota was reached.
DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


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


class ResourceError(PrivsegError):
    """The machine ran out of disk space or memory: the input is fine, the command can be rerun."""


def resource_error(exc: BaseException) -> ResourceError | None:
    """The message for a full disk or exhausted memory, or None for any other error.

    Writers publish by rename from staging (io.py, output.py), so a failed write leaves the
    previous state; the message says so instead of showing a traceback.
    """
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        where = f" while writing {exc.filename}" if exc.filename else ""
        return ResourceError(
            f"the disk is full or a file-size limit was reached{where} "
            f"({errno.errorcode.get(exc.errno or 0, '?')}: {os.strerror(exc.errno or 0)}); "
            "nothing half-written was kept: free space (or raise the limit) and run the "
            "command again"
        )
    if isinstance(exc, MemoryError):
        return ResourceError(
            "out of memory (MemoryError); nothing half-written was kept: free memory, use a "
            "larger machine, or lower data.max_voxels / data.resolution / train.batch_size"
        )
    return None
