"""The failure policy, in one place: which errors are bad input, which are worth a retry, and exit codes.

Every process of the project (``puzzle step`` in a pod, ``puzzle run`` on a laptop, any other
subcommand) ends with one of three exit codes, and Argo's ``retryStrategy`` keys on them:

- :data:`EXIT_OK` (0): done, or already done;
- :data:`EXIT_BAD_INPUT` (2): the input was refused (a config field, a unit, a parent directory, a run
  URI, S3 credentials): a retry cannot help, so it is never retried;
- :data:`EXIT_FAILED` (1): anything else (storage outages after their own retries, out of memory, a
  killed worker, a bug): retried with backoff on another node.

Raise a subclass of :class:`BadInputError` for the first kind (its message names the field, the value
and what is allowed) and of :class:`TransientError` for failures that a retry may fix. The human
descriptions of out-of-memory and disk-full failures (:func:`describe_failure`) live here too, so every
entry point words them the same way. This module imports nothing from the project: every floor may use it.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class PuzzleError(Exception):
    """Base of the project's own errors."""


class BadInputError(PuzzleError, ValueError):
    """Input a user (or the plan) must change: exit 2, never retried. The message names field, value, allowed."""


class ConfigError(BadInputError):
    """A run configuration problem (a YAML field, or what it points to: the parent, the data)."""


class UnitError(BadInputError):
    """A unit that cannot be run as given (unknown variant, layer out of range, missing field)."""


class UserError(BadInputError):
    """A command-line argument that is not allowed (printed without a traceback)."""


class TransientError(PuzzleError):
    """A failure a retry may fix (storage outage after its own retries, a device that went away): exit 1."""


def is_bad_input(err: BaseException) -> bool:
    return isinstance(err, BadInputError)


def exit_code(err: BaseException) -> int:
    """The exit status a process that stops on ``err`` returns."""
    return EXIT_BAD_INPUT if is_bad_input(err) else EXIT_FAILED


# ----- describing failures that are not bugs ----------------------------------------------------------
# Disk full, quota exceeded, or the file-size limit (RLIMIT_FSIZE) reached: retrying on the same node
# fails the same way, so the message says what to give the pod.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# torch's CPU allocator reports exhausted memory as a RuntimeError with this text, not MemoryError
_CPU_OOM = "DefaultCPUAllocator: can't allocate memory"
#: The config field that sets each step's memory-hungry batch.
BATCH_FIELD = {"bld": "bld.batch_size", "score": "score.batch_size", "assemble": "assemble.gkd.batch_size",
               "profile": "profile.scenarios[].batch_size", "evaluate": "score.batch_size"}


def causes(err: BaseException | None) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from (the store wraps OSErrors in its own errors)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def is_out_of_memory(err: BaseException) -> bool:
    return any(isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
               or (isinstance(e, RuntimeError) and _CPU_OOM in str(e)) for e in causes(err))


def no_space(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` that says the disk (or quota, or file-size limit) is full, if any."""
    return next((e for e in causes(err) if isinstance(e, OSError) and e.errno in _NO_SPACE), None)


def describe_failure(err: BaseException, step: str | None = None) -> str | None:
    """One line a user can act on for out-of-memory and disk-full failures; None for anything else."""
    if is_out_of_memory(err):
        knob = BATCH_FIELD.get(step or "", "the step's batch_size")
        return (f"out of memory ({str(err)[:300]}); lower the step's batch_size in the config ({knob})")
    full = no_space(err)
    if full is not None:
        where = str(err) if isinstance(err, PuzzleError) else (full.filename or "")
        return (f"no space left on device ({errno.errorcode.get(full.errno, full.errno)}: {where}); "
                "free disk space or give the pod a larger scratch volume, then retry")
    return None


__all__ = [
    "BATCH_FIELD", "EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "BadInputError", "ConfigError", "PuzzleError",
    "TransientError", "UnitError", "UserError", "causes", "describe_failure", "exit_code", "is_bad_input",
    "is_out_of_memory", "no_space",
]
