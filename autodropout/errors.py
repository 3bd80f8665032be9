"""Errors the CLI maps to exit codes: bad input -> 2, not found -> 1."""


class BadInput(ValueError):
    """Malformed user input (file, field, argument). The message names what is wrong."""

    exit_code = 2


class NotFound(LookupError):
    """A reference (pattern, tag, search) that does not exist."""

    exit_code = 1

    def __str__(self) -> str:  # LookupError quotes a single argument; keep the message plain
        return str(self.args[0]) if self.args else ""
