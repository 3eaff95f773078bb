"""The calibration's user error: the build CLI prints it as one line, exit status 1."""
from __future__ import annotations

from sparsezip_deploy.runtime.errors import UserError


class CalibError(UserError):
    """A bad image folder or count, a missing package, a failed fidelity check."""
