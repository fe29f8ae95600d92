"""The errors a user can cause and fix: bad config, corpus, model reference, run directory, labelled pairs, pool
setup, a full disk.

Every such error derives from ``GplflowError``; the CLI prints one as a single line and exits with code 2.
Any other exception is a bug in gplflow or a library under it, and keeps its traceback (exit code 1). Each
error also derives from the built-in class its callers catch (``ValueError``, ``FileNotFoundError``,
``OSError``), so ``except ValueError`` keeps working where it did.
"""

from __future__ import annotations


class GplflowError(Exception):
    """Something a user can fix (an input, a setting, a path, the disk); the message is one line saying what."""


class InputError(GplflowError, ValueError):
    """A value a user supplied (a setting, a file's content, an artifact imported or left in a run directory)
    that cannot be used."""


class MissingInputError(GplflowError, FileNotFoundError):
    """A file, folder or artifact a user named, or a stage needs, that is not there."""
