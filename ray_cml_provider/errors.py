"""The project's errors: library code raises them; the command line (``cli.py``) and Ray's
entry points (the provider's hooks, the command runner) turn each into one ``ray-cml:``
sentence and an exit status. Never a traceback where a sentence will do.

CML's own errors are ``ray_cml_provider.cml.CMLError`` (they name the call and the server's
message); these are the ones above it.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import NoReturn, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class RayCMLError(Exception):
    """A problem the user must act on; ``str()`` is the sentence, ``exit_code`` the status."""

    exit_code = 1


class ConfigError(RayCMLError, ValueError):
    """The cluster YAML cannot work; the message names the field. Raised before any call."""


class WorkspaceError(RayCMLError):
    """The workspace a cluster YAML names cannot be used (key, project, runtime)."""


class HeadDidNotStart(RayCMLError):
    """``ray up`` could not get a head application RUNNING."""


class NodeNotReady(RayCMLError):
    """A node cannot run commands: its environment failed, its Ray differs from this one,
    or its autoscaler could not load the provider. Exit status 86, as before any command."""

    exit_code = 86


class NodeGone(RayCMLError):
    """The node a command was waiting on went away."""

    exit_code = 255


class Unsupported(RayCMLError):
    """Something CML cannot do (``ray attach``: applications have no SSH)."""

    exit_code = 2


class CommandTimedOut(RayCMLError):
    exit_code = 124


def one_line(exc: RayCMLError) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if text.startswith("ray-cml:") else f"ray-cml: {text}"


def exit_with(exc: RayCMLError) -> NoReturn:
    """End the process with the error's sentence (on stderr) and exit status. Status 1 is
    ``SystemExit(sentence)``, so a caller that catches it (Ray's CLI, a test) has both."""
    if exc.exit_code == 1:
        raise SystemExit(one_line(exc))
    print(one_line(exc), file=sys.stderr, flush=True)
    raise SystemExit(exc.exit_code)


def ends_command(entry_point: Callable[P, R]) -> Callable[P, R]:
    """For Ray's entry points (a provider hook, the command runner): Ray prints a traceback,
    or only a warning, for an exception raised there, so a ``RayCMLError`` ends the command
    with its sentence instead."""

    @functools.wraps(entry_point)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return entry_point(*args, **kwargs)
        except RayCMLError as exc:
            exit_with(exc)

    return wrapper
