"""The one error type for what the user can fix (click's `ClickException`, as EDM2's scripts use it).

Every check of input, settings, files and machine raises `UserError` with a message that explains the problem in
full (what was given, what was expected, what to do). The command lines (`sit_atconv.cli.run_cli`) print it as one
line and exit with status 2, and so for the I/O errors that name their file; every other exception is a bug and
keeps its traceback (a CUDA out-of-memory error included).
"""


class UserError(ValueError):
    """A problem the message explains in full. A ValueError, so code that caught the ValueErrors of sit-atconv
    0.4 still catches it. `exit_code` (default 2) is the status the command lines exit with."""

    exit_code = 2


def renamed_keyword(extra: dict, old: str, new: str, value, default, where: str):
    """The value of keyword `new` where a caller may still use its old name `old` (left in `extra`, a **kwargs
    dict): the old name works with a DeprecationWarning; both at once with different values is a UserError
    naming both; any other leftover keyword is a TypeError, as Python would raise."""
    import warnings

    unknown = sorted(set(extra) - {old})
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {unknown}")
    if old not in extra:
        return value
    warnings.warn(f"{where}: {old} is now called {new}", DeprecationWarning, stacklevel=3)
    if value != default and value != extra[old]:
        raise UserError(f"{where}: {old}={extra[old]!r} and {new}={value!r} are the same setting; give it once")
    return extra[old]
