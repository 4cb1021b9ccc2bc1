"""One exception hierarchy for evd; policy lives in class attributes."""

from __future__ import annotations

import re

import msgspec


class EvdError(Exception):
    """Root of every error evd raises on purpose."""

    #: True when the same operation may succeed if tried again later.
    retriable = False


class ConfigError(EvdError):
    """The configuration file, an environment override or a flag is invalid."""


class LogError(EvdError):
    """The durable log could not complete an operation."""


class LogUnavailable(LogError):
    """The log refuses appends (it turned read-only after an I/O error, or is closed).

    Clients are told 503 and should retry against a healthy instance.
    """

    retriable = True


class LogOverloaded(LogError):
    """Appends pending a flush exceed the bound; the request is shed with 503."""

    retriable = True


_PATH_RE = re.compile(r" - at `\$\.?(.*)`$")
_UNKNOWN_RE = re.compile(r"Object contains unknown field `(.*)`$")
_MISSING_RE = re.compile(r"Object missing required field `(.*)`$")


def explain_validation(exc: msgspec.ValidationError) -> str:
    """Turn msgspec's "Expected `int`, got `str` - at `$.server.port`" into
    "server.port: Expected `int`, got `str`"; unknown fields name their own key."""
    msg = str(exc)
    m = _PATH_RE.search(msg)
    path, reason = ("", msg) if m is None else (m.group(1), msg[: m.start()])
    path = path.replace("[", ".").replace("]", "")
    unknown = _UNKNOWN_RE.match(reason)
    if unknown is not None:
        path = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
        reason = "unknown key"
    missing = _MISSING_RE.match(reason)
    if missing is not None:
        path = f"{path}.{missing.group(1)}" if path else missing.group(1)
        reason = "missing required field"
    if not path:
        return reason
    if ": " in reason and reason.split(": ", 1)[0].replace(".", "").isidentifier():
        # A reason that starts with a key path (a nested Struct's own check) is
        # relative to ``path``: join them with a dot.
        return f"{path}.{reason}"
    return f"{path}: {reason}"
