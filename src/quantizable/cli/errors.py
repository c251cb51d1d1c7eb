"""User-facing errors: one clear line and a non-zero exit, no traceback unless ``--debug``."""


class UserError(Exception):
    """A problem with the user's input (path, value, preset) rather than a bug."""
