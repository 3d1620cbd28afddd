"""Reading pickles written by torch without torch and without running any of their code.

`torch.save`'s `data.pkl` and `torch.distributed.checkpoint`'s `.metadata` are pickles that name
classes and functions (`torch._utils._rebuild_tensor_v2`, `torch.FloatStorage`,
`torch.distributed.checkpoint.metadata.Metadata`, ...). Unpickling normally imports and calls
them: arbitrary code. Here `find_class` never imports anything: every global becomes a *stand-in*
class of ckptd's own, named after it, whose instances only remember the arguments and state
they were given. Calling, building and filling a stand-in runs no code but this module's, so a
hostile pickle can at worst fail to parse. `persistent_load` (how torch refers to its tensor
storages) records each reference instead of loading anything.

The C unpickler does the work, so a multi-megabyte `data.pkl` takes milliseconds.
"""

from __future__ import annotations

import contextlib
import io
import pickle
from typing import Any, ClassVar


class StandIn:
    """An instance of a global the pickle named; it remembers what it was given."""

    module: ClassVar[str] = ""
    qualname: ClassVar[str] = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None
        self.items: dict[Any, Any] = {}
        self.listed: list[Any] = []

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        instance = super().__new__(cls)
        instance.args = args
        instance.kwargs = kwargs
        instance.state = None
        instance.items = {}
        instance.listed = []
        return instance

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        with contextlib.suppress(TypeError):  # an unhashable key: remember nothing, fail nothing
            self.items[key] = value

    def append(self, value: Any) -> None:
        self.listed.append(value)

    def extend(self, values: Any) -> None:
        self.listed.extend(values)

    def __reduce__(self) -> Any:  # never pickled again; here only to keep copy/pickle inert
        raise TypeError("stand-ins are not picklable")

    def field(self, name: str) -> Any:
        """Given a field name, return it from the object's state (dict, or (dict, slots)), or
        from its keyword arguments; None when absent."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2:
            merged: dict[Any, Any] = {}
            for part in state:
                if isinstance(part, dict):
                    merged.update(part)
            state = merged
        if isinstance(state, dict) and name in state:
            return state[name]
        return self.kwargs.get(name)

    @classmethod
    def full_name(cls) -> str:
        return f"{cls.module}.{cls.qualname}"


class PickleError(Exception):
    """The bytes are not a well-formed pickle (cut short, zeroed, garbled)."""


class StandInUnpickler(pickle.Unpickler):
    """Given a binary stream of one or more pickles: unpickle with stand-ins for every global
    and record torch's persistent storage references in `references`."""

    def __init__(self, stream: io.BufferedIOBase | io.BytesIO) -> None:
        super().__init__(stream)
        self.classes: dict[tuple[str, str], type[StandIn]] = {}
        self.references: list[tuple[Any, ...]] = []

    def find_class(self, module: str, name: str) -> type[StandIn]:
        key = (module, name)
        found = self.classes.get(key)
        if found is None:
            found = type(name.replace(".", "_") or "_", (StandIn,), {})
            found.module = module
            found.qualname = name
            self.classes[key] = found
        return found

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple):
            self.references.append(pid)
        return None


def load_one(unpickler: StandInUnpickler) -> Any:
    """Given an unpickler positioned at a pickle, return the next object, or raise PickleError."""
    try:
        return unpickler.load()
    except RecursionError:
        raise PickleError("nested too deeply") from None
    except MemoryError:
        raise PickleError("asks for more memory than it could hold") from None
    except Exception as failure:  # any malformed input: EOFError, UnpicklingError, ValueError...
        raise PickleError(f"{type(failure).__name__}: {failure}") from None


def loads(data: bytes) -> tuple[Any, StandInUnpickler]:
    """Given the bytes of one pickle, return (object, the unpickler that read it)."""
    unpickler = StandInUnpickler(io.BytesIO(data))
    return load_one(unpickler), unpickler


def class_name(value: Any) -> str:
    """Given a value from a stand-in unpickle, return `module.name` of its stand-in class (an
    instance or the class itself), or the Python type name for anything else."""
    if isinstance(value, type) and issubclass(value, StandIn):
        return value.full_name()
    if isinstance(value, StandIn):
        return type(value).full_name()
    return type(value).__name__
