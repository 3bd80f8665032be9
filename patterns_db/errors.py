"""The store's own error: a database it cannot use."""

from __future__ import annotations

from autodropout.errors import BadInput


class StoreError(BadInput):
    """The database cannot serve as a pattern store: unreachable, a newer schema, or not ours.

    The message never holds the URL's credentials.
    """
