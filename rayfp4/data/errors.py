"""The one exception type a user of the data layer can cause.

Every problem that comes from the user's inputs (a path, a corpus, a tokenizer file, a shard
directory, a stream configuration that does not fit the shards) raises :class:`DataError` with a
message that names the file and says what is wrong, so that it can be shown as one line by a CLI
and is raised before any training step. It subclasses ``ValueError`` so callers that already catch
bad-value errors keep working.
"""

from __future__ import annotations


class DataError(ValueError):
    """A user-caused problem with data inputs; the message names the file and the problem."""

    retry_cannot_help = True  # deterministic: the same input fails the same way again
