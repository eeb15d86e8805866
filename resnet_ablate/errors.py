"""The exception types the CLI turns into a clear message and exit code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad grid, missing data, unreachable store): no traceback."""


class TrackingError(UserError):
    """The tracking store cannot be used: the message says which and what to do."""


class StoreUnavailable(TrackingError):
    """The tracking store takes no write for now (held locked, or full): writing again at once
    would only wait and fail again."""


class GridError(UserError):
    """A mistake in a grid file or an override: the message is meant for the user as it is."""
