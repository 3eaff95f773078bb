"""The one user-error base of the project, and the runtime's kinds of it.

A `UserError` is something the user can fix (a bad engine folder, image, prompt,
option, model folder, calibration set): both CLIs turn it into a single
`error: ...` line on stderr and exit status 1, and library users catch this one
type. Anything else is a bug and keeps its traceback.

    UserError
    |-- EngineError       engine folder, manifest, prompt, provider, generation options (runtime)
    |-- PreprocessError   images and their preprocessing config (runtime)
    |-- ExportError       model folders, build options (export); ParityError: a failed parity check
    `-- CalibError        calibration images, quantisation, budget fit (calib)
"""
from __future__ import annotations


class UserError(Exception):
    """A user-facing error; its message is one line."""

    def __init__(self, message: str):
        # Messages may quote other libraries' text; one line is the contract.
        super().__init__(" ".join(str(message).split()))


class EngineError(UserError):
    """A bad engine folder, prompt, provider or option."""


class PreprocessError(UserError):
    """A bad image or image config."""
