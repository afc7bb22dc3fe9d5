"""Allocators, one file each. Every module in this package is imported here, so a new file
that uses ``@register("name")`` is found by name with no other edit."""

import importlib
import pkgutil
from typing import Any

from .base import ALLOCATORS, Allocator, AllocatorConfig, CalibrationSet, Mode, register

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")


def get_allocator_class(name: Any) -> type[Allocator]:
    from ..errors import require_choice

    require_choice("variant.allocator", name, sorted(ALLOCATORS))
    return ALLOCATORS[name]


__all__ = ["ALLOCATORS", "Allocator", "AllocatorConfig", "CalibrationSet", "Mode", "register", "get_allocator_class"]
