"""The one exception type the CLI turns into a clear message and exit code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad grid, missing data, unreachable store): no traceback."""
