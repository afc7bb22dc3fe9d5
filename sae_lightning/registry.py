"""Named registries (allocators, data kinds, loss terms): a dict that refuses a name twice."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Registry(dict[str, Any]):
    """``{name: class}``, filled by the :meth:`register` decorator at import. A second class
    under a name already taken is a programming error (two files claiming ``topk``), so it
    raises instead of silently replacing the first."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, name: str, attribute: str | None = "name") -> Callable[[type], type]:
        """Register the decorated class as ``name`` (and set ``cls.<attribute> = name``)."""

        def deco(cls: type) -> type:
            if name in self and self[name] is not cls:
                first = self[name]
                raise TypeError(
                    f"{self.what} {name!r} registered twice: {first.__module__}.{first.__qualname__} "
                    f"and {cls.__module__}.{cls.__qualname__}"
                )
            if attribute is not None:
                setattr(cls, attribute, name)
            self[name] = cls
            return cls

        return deco
