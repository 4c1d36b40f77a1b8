"""Registries of estimators and tasks, plugins and entry points.

``@register_estimator("name")`` and ``@register_task("name")`` add a class; a duplicate name is
an error; an unknown name lists the known ones with the closest match. Built-ins live in the
top-level ``estimators`` and ``tasks`` packages; third-party code arrives through
:func:`load_plugin` (``--plugin module`` or a ``.py`` path) or the entry-point groups
``estbench.estimators`` and ``estbench.tasks``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

from estbench.errors import EstbenchError, did_you_mean

__all__ = [
    "Registry",
    "ESTIMATORS",
    "TASKS",
    "register_estimator",
    "register_task",
    "load_plugin",
    "load_builtins",
]

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """A name -> class mapping with helpful errors."""

    def __init__(self, kind: str, builtin_package: str, entry_point_group: str) -> None:
        self.kind = kind
        self._builtin_package = builtin_package
        self._group = entry_point_group
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator registering ``cls`` under ``name`` (and setting ``cls.name``)."""
        if not isinstance(name, str) or not name:
            raise EstbenchError(f"{self.kind} names must be non-empty strings, got {name!r}")

        def decorator(cls: T) -> T:
            if name in self._items and self._items[name] is not cls:
                other = self._items[name]
                raise EstbenchError(
                    f"duplicate {self.kind} name '{name}': already registered by "
                    f"{other.__module__}.{other.__qualname__}; choose another name"
                )
            cls.name = name
            self._items[name] = cls
            return cls

        return decorator

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        importlib.import_module(self._builtin_package)
        for entry in importlib.metadata.entry_points(group=self._group):
            obj = entry.load()
            if isinstance(obj, type) and obj not in self._items.values():
                self.register(entry.name)(obj)

    def get(self, name: str) -> T:
        self._ensure_loaded()
        if name not in self._items:
            known = sorted(self._items)
            raise EstbenchError(
                f"Unknown {self.kind} '{name}'.{did_you_mean(name, known)} "
                f"Available: {', '.join(known)}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests that register throwaway classes)."""
        self._items.pop(name, None)


ESTIMATORS: Registry = Registry("estimator", "estimators", "estbench.estimators")
TASKS: Registry = Registry("task", "tasks", "estbench.tasks")
register_estimator = ESTIMATORS.register
register_task = TASKS.register


def load_builtins() -> None:
    """Import the built-in estimators and tasks (and entry-point plugins)."""
    ESTIMATORS._ensure_loaded()
    TASKS._ensure_loaded()


def load_plugin(spec: str) -> None:
    """Import a plugin given as a module name (``my_pkg.my_estimators``) or a ``.py`` path, so
    that its ``@register_*`` decorators run."""
    load_builtins()
    path = Path(spec)
    if spec.endswith(".py"):
        if not path.is_file():
            raise EstbenchError(f"plugin file '{spec}' does not exist; pass a .py path or a module")
        module_name = f"estbench_plugin_{path.stem}"
        if module_name in sys.modules:
            return
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        loader_spec.loader.exec_module(module)
        return
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        importlib.import_module(spec)
    except ModuleNotFoundError as err:
        if err.name and spec.startswith(err.name):
            raise EstbenchError(
                f"plugin module '{spec}' was not found; install it, run from its directory, "
                f"or pass a path to its .py file"
            ) from None
        raise
