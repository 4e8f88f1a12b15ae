"""A stand-in accelerator for CPU-only tests: catch tensors left on the host by code meant to run on a device.

On a GPU, an op that mixes a ``cuda:0`` tensor with a CPU tensor fails ("Expected all tensors
to be on the same device"). On a CPU-only machine every tensor is on the CPU, so such bugs pass
unnoticed. :class:`DeviceGuard` simulates a second device: the pipeline is built and run with
``device=VIRTUAL_DEVICE`` (``cpu:0``, which torch accepts and computes on the CPU), and a
``TorchFunctionMode`` tracks which tensors were put on that device:

- a tensor moved there (``.to(VIRTUAL_DEVICE)``, ``.to(t)`` for such a ``t``, ``.cuda()``, a factory
  with ``device=VIRTUAL_DEVICE``) or computed only from such tensors is *on the device*;
- a tensor made by a factory without ``device=`` or with the plain ``"cpu"``, read from disk or
  numpy, or moved with ``.cpu()`` / ``.to("cpu")`` is *on the host*;
- ``t.device`` answers ``cpu:0`` for tensors on the device, so ``device=x.device`` follows ``x``.

An op that mixes the two (0-dim host tensors excepted, as CUDA allows them) or calls ``.numpy()``
on a device tensor raises :class:`DeviceMismatch` naming the op, as CUDA would. Usage::

    with DeviceGuard() as guard:
        pipe = build(options_with(device=VIRTUAL_DEVICE))
        out = pipe(guard.put(lr))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

#: The simulated accelerator: a CPU device with an index, distinguishable from the plain ``cpu``.
VIRTUAL_DEVICE = torch.device("cpu", 0)

_DEVICE_PROPERTY = torch._C.TensorBase.device
_DATA_PROPERTY = torch._C.TensorBase.data
# Ops that may legitimately take host and device tensors together (copies and indexing).
_MIXING_ALLOWED = frozenset(
    {"copy_", "__setitem__", "__getitem__", "set_", "_has_compatible_shallow_copy_type", "__deepcopy__"}
)


class DeviceMismatch(RuntimeError):
    """An op mixed tensors on the simulated device with host tensors (a CUDA run would fail here)."""


def _target(value: Any, tags: WeakTensorKeyDictionary) -> bool | None:
    """True: the simulated device; False: the host; None: ``value`` names no device."""
    if isinstance(value, torch.Tensor):
        return value in tags
    if isinstance(value, (str, torch.device)):
        dev = torch.device(value)
        if dev.type == "cuda" or dev == VIRTUAL_DEVICE:
            return True
        return False if dev.type == "cpu" else None
    return None


class DeviceGuard(TorchFunctionMode):
    """See the module docstring. ``put(t)`` moves ``t`` to the simulated device; ``on_device(t)`` tells."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self._depth = 0

    def __enter__(self) -> DeviceGuard:
        self._depth += 1
        if self._depth > 1:  # put() inside the guard's own block
            super().__enter__()
            return self
        # nn.Parameter(data) (e.g. in Parameter.__deepcopy__) wraps data without a torch function: keep its tag
        self._parameter_new = torch.nn.Parameter.__new__
        original, tags = self._parameter_new, self.tags

        def parameter_new(cls: type, data: torch.Tensor | None = None, requires_grad: bool = True) -> Any:
            param = original(cls, data, requires_grad)
            if data is not None and data in tags:
                tags[param] = True
            return param

        torch.nn.Parameter.__new__ = staticmethod(parameter_new)  # type: ignore[method-assign]
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._depth -= 1
        if self._depth == 0:
            torch.nn.Parameter.__new__ = staticmethod(self._parameter_new)  # type: ignore[method-assign]

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the simulated device (as an input moved there by a caller)."""
        with self:
            return tensor.to(VIRTUAL_DEVICE)

    def on_device(self, tensor: torch.Tensor) -> bool:
        return tensor in self.tags

    def _explicit(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool | None:
        if "device" in kwargs and kwargs["device"] is not None:
            return _target(kwargs["device"], self.tags)
        if name == "cpu":
            return False
        if name == "cuda":
            return True
        if name in ("to", "type_as") or name.endswith("_like"):
            for value in (*args[1:], kwargs.get("other")):
                found = _target(value, self.tags)
                if found is not None:
                    return found
        return None

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        owner = getattr(func, "__self__", None)
        if name == "__get__" and owner is _DEVICE_PROPERTY:
            return VIRTUAL_DEVICE if args[0] in self.tags else func(*args, **kwargs)
        if name == "__set__" and owner is _DATA_PROPERTY:
            out = func(*args, **kwargs)
            self._tag(args[0], args[1] in self.tags)
            return out
        if name == "numpy" and args and args[0] in self.tags:
            raise DeviceMismatch("numpy() of a tensor on the device (move it to the CPU first)")
        explicit = self._explicit(name, args, kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on = [t in self.tags for t in tensors]
        if explicit is None and name not in _MIXING_ALLOWED and any(on):
            host = [t for t, o in zip(tensors, on) if not o and t.dim() > 0 and t.device.type != "meta"]
            if host:
                shape = tuple(next(t for t, o in zip(tensors, on) if o).shape)
                raise DeviceMismatch(
                    f"{name or func}: mixes a tensor on the device {shape} with host tensors "
                    f"({', '.join(str(tuple(t.shape)) for t in host[:3])}); on a GPU this fails"
                )
        out = func(*args, **kwargs)
        if explicit is not None and args and out is args[0] and (args[0] in self.tags) != explicit:
            out = out.view_as(out)  # a move between the host and the device gives a new tensor, as on a GPU
        if name in _MIXING_ALLOWED:
            if args and isinstance(args[0], torch.Tensor) and out is args[0]:
                return out
            result = bool(on and on[0])
        else:
            result = explicit if explicit is not None else any(on)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._tag(t, result)
        return out

    def _tag(self, tensor: torch.Tensor, on_device: bool) -> None:
        if on_device:
            self.tags[tensor] = True
        elif tensor in self.tags:
            del self.tags[tensor]
