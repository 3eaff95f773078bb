"""The one user-error type of calib/: the build CLI prints it as one line, exit status 1."""
from __future__ import annotations


class CalibError(Exception):
    """A user-facing calibration error: bad image folder, bad count, missing package, failed fidelity check."""

    def __init__(self, message: str):
        # Messages may quote other libraries' text; one line is the contract.
        super().__init__(" ".join(str(message).split()))
