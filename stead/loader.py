"""Finding the application a process runs, the way uvicorn and Celery find theirs.

In order: `--app module:attr` (or `STEAD_APP`); else the one entry point of the group
`stead.apps` among installed packages (`[project.entry-points."stead.apps"]` in the
application's pyproject.toml). The module is imported from the current directory first, as
`uvicorn main:app` does. Nothing is built here: `App.load(settings)` builds the registries.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import entry_points
from pathlib import Path

from stead.app import App, AppError

GROUP = "stead.apps"


# What runs without an application: Stead's own pipelines (document ingestion) alone.
PLATFORM_ONLY = App("stead")


def load_app(spec: str | None) -> App:
    """The application named by `spec` (`module:attr`), or by the one installed entry point,
    or, with neither, Stead alone (`PLATFORM_ONLY`). Raises AppError with one line saying
    what is wrong."""
    if spec:
        return _from_spec(spec)
    found = list(entry_points(group=GROUP))
    if len(found) == 1:
        return _checked(found[0].load(), f"entry point {found[0].name}")
    if not found:
        return PLATFORM_ONLY
    names = ", ".join(sorted(e.name for e in found))
    raise AppError(f"several applications are installed ({names}): choose one with --app")


def _from_spec(spec: str) -> App:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise AppError(f"--app {spec!r}: expected module:attr, e.g. worker:APP")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppError(f"--app {spec}: cannot import {module_name!r} ({exc})") from None
    value = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise AppError(f"--app {spec}: {module_name!r} has no {attr!r}") from None
    return _checked(value, f"--app {spec}")


def _checked(value: object, where: str) -> App:
    if not isinstance(value, App):
        raise AppError(f"{where} is a {type(value).__name__}, not a stead.App")
    return value
