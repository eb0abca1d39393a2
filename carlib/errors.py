"""User-facing errors: one clear line, no traceback (see `carlib.cli.guard`)."""


class CarlibError(Exception):
    """Bad input or missing file. The message says what was wrong and what to do."""
