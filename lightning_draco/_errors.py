"""An error in one line, for the warnings and log lines that report a failure as it happens."""

__all__ = ["described", "one_line"]


def one_line(error: BaseException) -> str:
    """``error``'s first non-empty line ("" where it has none), at most 500 characters."""
    line = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return line if len(line) <= 500 else line[:497] + "..."


def described(error: BaseException) -> str:
    """``error``'s type and its first line: ``RuntimeError: no PTX ...`` (the type alone where it says nothing)."""
    said = one_line(error)
    return f"{type(error).__name__}: {said}" if said else type(error).__name__
