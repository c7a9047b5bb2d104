"""Kernel dispatch: one registry per op, backends tried CUDA -> Triton -> reference.

Each backend implementation declares the devices and dtypes it accepts, an
``available()`` probe (is the library built, is triton importable?) and an
optional problem ``check(*args, **kwargs)`` (head_dim, shapes...). Each returns
``None`` when fine or a one-line reason when it refuses.

Selection happens at call time, inside vopt's opaque ``torch.library`` custom
ops, never in traced code. ``VOPT_BACKEND=auto|cuda|triton|reference`` is read
on every call (no import-time state); an explicit choice that refuses raises
:class:`~vopt.errors.BackendUnavailableError` listing every backend and why it
was refused. ``auto`` falls back down the order; a fallback from a backend that
serves the device but refused this call is logged once per reason.
"""
from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

from .errors import BackendUnavailableError, ConfigError, UnknownNameError

log = logging.getLogger(__name__)

ENV_VAR = "VOPT_BACKEND"


class Backend(str, enum.Enum):
    """Kernel backends, in dispatch priority order."""

    CUDA = "cuda"
    TRITON = "triton"
    REFERENCE = "reference"


class BackendPreference(str, enum.Enum):
    """What the caller asks for: ``auto`` or one forced backend."""

    AUTO = "auto"
    CUDA = "cuda"
    TRITON = "triton"
    REFERENCE = "reference"

    @classmethod
    def parse(cls, value: "str | BackendPreference | None", *, source: str = "backend") -> "BackendPreference":
        if value is None or value == "":
            return cls.AUTO
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise ConfigError(
                f"{source}={value!r} is not a backend; accepted: {', '.join(p.value for p in cls)}"
            ) from None


def preference_from_env() -> BackendPreference:
    """The preference set by ``VOPT_BACKEND`` (``auto`` when unset)."""
    return BackendPreference.parse(os.environ.get(ENV_VAR), source=ENV_VAR)


Reason = Optional[str]


@dataclass(frozen=True)
class BackendImpl:
    """One backend's implementation of an op and what it accepts."""

    backend: Backend
    fn: Callable
    devices: frozenset
    dtypes: Optional[frozenset] = None
    available: Callable[[], Reason] = lambda: None
    check: Optional[Callable[..., Reason]] = None

    def refusal(self, args: tuple, kwargs: dict) -> Reason:
        """Why this backend cannot run the call, or ``None`` if it can."""
        why = self.available()
        if why:
            return why
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        if tensors:
            dev = tensors[0].device.type
            if dev not in self.devices:
                return f"device {dev!r} not supported (supports: {', '.join(sorted(self.devices))})"
            if self.dtypes is not None and tensors[0].dtype not in self.dtypes:
                names = ", ".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
                return f"dtype {str(tensors[0].dtype).removeprefix('torch.')} not supported (supports: {names})"
        if self.check is not None:
            return self.check(*args, **kwargs)
        return None


@dataclass
class KernelOp:
    """The registry of backends for one op (e.g. ``vopt::attention``)."""

    name: str
    impls: dict = field(default_factory=dict)
    _warned: set = field(default_factory=set, repr=False)

    def register(
        self,
        backend: "Backend | str",
        *,
        devices: Iterable[str],
        dtypes: Optional[Iterable[torch.dtype]] = None,
        available: Optional[Callable[[], Reason]] = None,
        check: Optional[Callable[..., Reason]] = None,
    ) -> Callable:
        """Decorator registering ``fn`` as ``backend``'s implementation."""
        backend = Backend(backend)

        def deco(fn: Callable) -> Callable:
            self.impls[backend] = BackendImpl(
                backend=backend,
                fn=fn,
                devices=frozenset(devices),
                dtypes=None if dtypes is None else frozenset(dtypes),
                available=available or (lambda: None),
                check=check,
            )
            return fn

        return deco

    def backend_status(self) -> list:
        """``[(backend, reason-or-None)]`` for every backend, ignoring the call's inputs."""
        out = []
        for b in Backend:
            impl = self.impls.get(b)
            out.append((b.value, "not implemented for this op" if impl is None else impl.available()))
        return out

    def select(self, *args, preference: "BackendPreference | str | None" = None, **kwargs) -> BackendImpl:
        """Pick the backend that runs this call (see module docstring)."""
        pref = preference_from_env() if preference is None else BackendPreference.parse(preference)
        refusals: list = []
        for b in Backend:
            impl = self.impls.get(b)
            why = "not implemented for this op" if impl is None else impl.refusal(args, kwargs)
            if pref is BackendPreference.AUTO:
                if why is None:
                    self._note_fallbacks(refusals, args, kwargs)
                    return impl
                refusals.append((b.value, why))
            elif pref.value == b.value:
                if why is None:
                    return impl
                refusals.append((b.value, why))
                # Say why the others would (not) have run too, so the error is complete.
                for other in Backend:
                    if other is b:
                        continue
                    oimpl = self.impls.get(other)
                    owhy = "not implemented for this op" if oimpl is None else oimpl.refusal(args, kwargs)
                    refusals.append((other.value, owhy or "would run (not selected)"))
                raise BackendUnavailableError(
                    self.name, refusals, hint=f"{ENV_VAR}={pref.value} forces this backend; unset it or use 'auto' to fall back."
                )
        raise BackendUnavailableError(self.name, refusals)

    def __call__(self, *args, **kwargs):
        return self.select(*args, **kwargs).fn(*args, **kwargs)

    def _note_fallbacks(self, refusals: list, args: tuple, kwargs: dict) -> None:
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        dev = tensors[0].device.type if tensors else None
        for backend, why in refusals:
            impl = self.impls.get(Backend(backend))
            # A backend that never serves this device is not a surprise; one that does but refused is.
            if impl is None or dev not in impl.devices:
                continue
            key = (backend, why)
            if key not in self._warned:
                self._warned.add(key)
                log.warning("vopt op %s: backend %s refused (%s); falling back", self.name, backend, why)


_OPS: dict = {}


def kernel_op(name: str) -> KernelOp:
    """The registry for op ``name``, created on first use."""
    if name not in _OPS:
        _OPS[name] = KernelOp(name)
    return _OPS[name]


def get_kernel_op(name: str) -> KernelOp:
    """Look up a registered op; unknown names raise listing the known ones."""
    try:
        return _OPS[name]
    except KeyError:
        raise UnknownNameError("kernel op", name, _OPS) from None


def registered_ops() -> dict:
    """All registered op registries by name."""
    return dict(_OPS)


# ---- helpers for Triton backends ----------------------------------------------------------------------------------


def triton_unavailable() -> Optional[str]:
    """The ``available`` probe of a Triton backend: None when triton imports, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    return None


def triton_device_reason(device: torch.device, kernel_module: str) -> Optional[str]:
    """Why the Triton kernels of ``kernel_module`` (e.g. ``"vopt.kernels.axpy"``) cannot run on ``device``, or None.

    CUDA: None. CPU: the kernels run only in Triton's interpreter, which must have been switched on
    (``TRITON_INTERPRET=1``) before the kernel module was imported."""
    if device.type != "cpu":
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 is not set)"
    import importlib

    if not importlib.import_module(kernel_module).is_interpreted():
        return f"{kernel_module} was imported before TRITON_INTERPRET=1 was set, so it cannot run on CPU"
    return None
