"""The exception types the CLI turns into a clear message and exit code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad grid, missing data, unreachable store): no traceback."""


class GridError(UserError):
    """A mistake in a grid file or an override: the message is meant for the user as it is."""
