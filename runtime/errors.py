"""The one user-error type of the runtime.

The CLI turns an `EngineError` (and preprocess's `PreprocessError`) into a single
`error: ...` line on stderr and exit status 1; anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations


class EngineError(Exception):
    """A user-facing error: bad engine folder, bad prompt, unavailable provider, ..."""

    def __init__(self, message: str):
        # Messages may quote other libraries' text; one line is the contract.
        super().__init__(" ".join(str(message).split()))
