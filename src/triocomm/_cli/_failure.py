"""Exit codes and the one-line failure every command reports through ``main``."""

from __future__ import annotations

import errno
import os
import ssl

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class CliFailure(Exception):
    """A run that could not do its job, described in one line for the user.

    ``main`` prints the message after the command's name and exits with
    status 1; no traceback, since the cause is in the environment (a busy
    port, an unreachable peer, a service speaking another codec), not a bug.
    """


def leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups, or ``exc``."""
    # Duck-typed: on Python 3.10 the groups come from the exceptiongroup
    # backport, which this package need not import for one isinstance check.
    while True:
        inner = getattr(exc, "exceptions", None)
        if not isinstance(inner, tuple) or len(inner) != 1:
            return exc
        exc = inner[0]


def cause(exc: BaseException) -> str:
    """The most specific reason behind ``exc``: the innermost OS error message
    along its causes and inside exception groups ("Connection refused" rather
    than "all attempts to connect to ... failed"), else ``exc``'s own message."""
    return os_cause(exc) or str(exc.__cause__ or exc)


def os_cause(exc: BaseException) -> str | None:
    """The innermost OS or TLS error message behind ``exc``, or None if there is none."""
    reason = None
    stack = [exc]
    for _ in range(100):  # bounded, whatever shape the chain has
        if not stack:
            break
        current = stack.pop()
        if isinstance(current, ssl.SSLError):
            reason = str(current)
        elif isinstance(current, OSError) and (current.errno or 0) in errno.errorcode:
            # Trio words it "Error connecting to (...): Connection refused";
            # the address is in our own message already.
            reason = os.strerror(current.errno or 0)
        elif isinstance(current, OSError) and current.strerror:
            reason = current.strerror  # e.g. a resolver error, whose errno is not an errno
        inner = getattr(current, "exceptions", None)
        if isinstance(inner, tuple):
            stack.extend(reversed(inner))
        if current.__cause__ is not None:
            stack.append(current.__cause__)
    return reason
