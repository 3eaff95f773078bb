"""The export's user errors: the build CLI prints them as one line, exit status 1."""
from __future__ import annotations

from sparsezip_deploy.runtime.errors import UserError


class ExportError(UserError):
    """A bad model folder, bad option, unsupported layout."""


class ParityError(ExportError):
    """An exported graph disagrees with its PyTorch source."""
