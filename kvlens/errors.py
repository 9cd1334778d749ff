"""kvlens's error types: one base class, and each kind subclassing the builtin callers already catch.

Every error kvlens raises on purpose says what was wrong and how to fix it. The classes let a
caller tell the kinds apart (``except kvlens.errors.CorruptCache``) while ``except ValueError``
and friends keep working:

* :class:`BadInput` (``ValueError``): an argument or a request that cannot be used as given;
  :class:`BadHparams` (also ``TypeError``), :class:`PromptTooLong`, :class:`BadStatistics`.
* :class:`CorruptFile` (``ValueError``): a file of the user's that is not what it should be
  (not UTF-8, not gzip, not a kvlens delta, a record without a field); the file is left as is.
* :class:`CorruptCache` (``ValueError``): a file kvlens wrote to its own cache that cannot be
  trusted (truncated, altered, foreign); the message names the file and says to delete it.
* :class:`MissingFolder` (``FileNotFoundError``): a folder to save into does not exist.
* :class:`CacheLocationError` (``NotADirectoryError``): the cache root is not a folder.
* :class:`EditStateError` (``RuntimeError``): apply/revert asked of a delta in the wrong state.

One warning class, for a result that is computed but may mislead:
:class:`EditedNeighbours` (``UserWarning``): NS scored on neighbour prompts whose subject was edited.
"""

from __future__ import annotations


class KVLensError(Exception):
    """Base of every error kvlens raises on purpose."""


class BadInput(KVLensError, ValueError):
    """An argument, request or tensor that cannot be used as given."""


class BadHparams(BadInput, TypeError):
    """A hyperparameter that does not exist (typo) or has an impossible value."""


class PromptTooLong(BadInput):
    """A prompt (with its context prefix and target tokens) longer than the model's position limit."""


class BadStatistics(BadInput):
    """Key statistics C that cannot be a second-moment matrix E[kkᵀ] (or cannot be inverted)."""


class CorruptFile(KVLensError, ValueError):
    """A user's file that cannot be read as what it should be; the file is left untouched."""


class CorruptCache(KVLensError, ValueError):
    """A file in kvlens's cache that cannot be trusted: delete it and kvlens writes it again."""


class MissingFolder(KVLensError, FileNotFoundError):
    """A folder to write into does not exist."""


class CacheLocationError(KVLensError, NotADirectoryError):
    """kvlens's cache root (``$KVLENS_CACHE``) exists but is not a folder."""


class EditStateError(KVLensError, RuntimeError):
    """apply/revert asked of a delta in the wrong state (already applied, not applied, weights changed)."""


class EditedNeighbours(UserWarning):
    """Neighbourhood prompts that name a subject edited in the scored delta: their intended change
    counts as damage to NS. Filter with ``warnings.simplefilter("ignore", EditedNeighbours)``."""
