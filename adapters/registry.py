"""Adapters by name: built-ins register with ``@register("image")``; third parties through the entry point
group ``pathway.adapters`` (``name = "package.module:AdapterClass"``). Both are imported only when first
asked for, so reading a recipe or building a parser never imports an adapter's file libraries.

``pathway.adapters`` is a namespace package (the repo-root folder ``adapters/`` has no ``__init__.py``, so it
never shadows AdapterHub's ``adapters`` for code started in the repo root): import the registry module, as in
``from pathway.adapters import registry; registry.get("image")``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, TypeVar

from pathway.errors import OptionError

if TYPE_CHECKING:
    from .base import Adapter

ENTRY_POINT_GROUP = "pathway.adapters"
# Built-in adapter name -> the module of this package that registers it.
BUILTIN = {"audio": "audio", "image": "image", "point": "point", "point_part": "point", "timeseries": "timeseries",
           "video": "video"}
_REGISTRY: dict[str, type[Adapter]] = {}
A = TypeVar("A", bound="type[Adapter]")


def register(name: str) -> Callable[[A], A]:
    """Class decorator: make ``cls`` available as ``get(name)`` and set ``cls.name``."""

    def decorator(cls: A) -> A:
        known = _REGISTRY.get(name)
        if known is not None and known is not cls:
            raise OptionError(f"adapter name {name!r} is already taken by {known.__module__}.{known.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def get(name: str) -> type[Adapter]:
    """The adapter class registered as ``name``; unknown names raise an error listing the known ones."""
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(f"{__package__}.{BUILTIN[name]}")
    if name in _REGISTRY:
        return _REGISTRY[name]
    ep = _entry_points().get(name)
    if ep is None:
        raise OptionError(
            f"no adapter named {name!r}; available: {available()}. Third-party adapters register through the "
            f"entry point group {ENTRY_POINT_GROUP!r} (see docs/new-modality.md)"
        )
    cls = ep.load()
    if name not in _REGISTRY:  # a plugin need not use the decorator: its entry point names it
        register(name)(cls)
    return _REGISTRY[name]


def available() -> list[str]:
    """Registered names, built-in and installed through entry points."""
    return sorted(set(_REGISTRY) | set(BUILTIN) | set(_entry_points()))
