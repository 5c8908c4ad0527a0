"""Pages from Jinja2 templates (package data under stead/web/templates), autoescaped."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse

_ENV = Environment(
    loader=PackageLoader("stead.web", "templates"),
    autoescape=select_autoescape(default=True),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _when(value: datetime | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        try:
            return _when(datetime.fromisoformat(value))
        except ValueError:
            return value
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _usd(value: float | None) -> str:
    return "" if value is None else f"${value:,.6f}".rstrip("0").rstrip(".")


def _pretty(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


_ENV.filters.update(when=_when, usd=_usd, pretty=_pretty)


def render(template: str, **context: Any) -> str:
    return _ENV.get_template(template).render(context)


def page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    """`template` for this request: the signed-in viewer (if any) and the path go with it."""
    viewer = getattr(request.state, "viewer", None)
    html = render(template, viewer=viewer, path=request.url.path, **context)
    return HTMLResponse(html, status_code=status)
