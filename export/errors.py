"""The one exception type the export CLI turns into a one-line error and exit status 1."""


class ExportError(Exception):
    """A user-facing error: bad model folder, bad option, unsupported layout."""
