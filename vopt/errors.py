"""Typed errors raised by vopt.

Every error says what was given, what is accepted and, where there is one, how
to fix it. They all derive from :class:`VoptError` so callers can catch vopt's
failures without catching unrelated ones.
"""
from __future__ import annotations

from typing import Iterable, Sequence


class VoptError(Exception):
    """Base class of every error vopt raises on purpose."""


class ConfigError(VoptError, ValueError):
    """A config field, key or value is invalid."""


class UnknownNameError(VoptError, KeyError):
    """A name (pass, model, backend, op) is not registered.

    Subclasses ``KeyError`` for registry look-ups but keeps a readable message
    (``KeyError`` would otherwise print the repr of its argument).
    """

    def __init__(self, kind: str, name: object, accepted: Iterable[str]):
        self.kind = kind
        self.name = name
        self.accepted = sorted(accepted)
        super().__init__(f"unknown {kind} {name!r}; accepted: {', '.join(self.accepted) or '(none registered)'}")

    def __str__(self) -> str:
        return str(self.args[0])


class PassOrderError(VoptError):
    """Passes were asked to run in an order that breaks their declared constraints."""


class StrictModeError(VoptError):
    """Strict mode: a pass skipped a match, or a stage could not be captured."""


class CaptureError(VoptError):
    """A model or stage could not be captured and no fallback was allowed."""


class BackendUnavailableError(VoptError, RuntimeError):
    """No kernel backend could run an op call.

    ``refusals`` lists every backend that was tried, in order, with the reason
    it refused.
    """

    def __init__(self, op: str, refusals: Sequence[tuple[str, str]], hint: str = ""):
        self.op = op
        self.refusals = list(refusals)
        lines = [f"no backend of op {op!r} can run this call:"]
        lines += [f"  - {backend}: {reason}" for backend, reason in self.refusals]
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class CudaLibraryError(VoptError, RuntimeError):
    """The vopt CUDA library is missing, failed to load, or a launcher returned an error."""


class EngineError(VoptError, RuntimeError):
    """An engine (``vopt-compile build --format``) cannot be built, loaded or run.

    Raised e.g. when a model's glue cannot be traced into one program, an op has
    no faithful lowering for the requested format, or the engine's files are missing.
    """


class ManifestError(EngineError):
    """An engine's ``manifest.json`` is missing, unreadable, or of another manifest version."""


class EngineInputError(EngineError, ValueError):
    """Inputs given to a loaded engine do not match its recorded input specs (names, dtypes, shapes)."""
