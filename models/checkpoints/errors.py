"""The one error every checkpoint problem becomes."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded exactly; the message names file, format and keys."""
