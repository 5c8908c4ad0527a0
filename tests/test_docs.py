"""/docs and /redoc work offline: every asset they reference is served by the API itself."""

from __future__ import annotations

import re

import httpx
import pytest

URL = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url\s*:\s*['"]([^'"]+)['"]""")


def referenced(html: str) -> list[str]:
    return [a or b for a, b in URL.findall(html)]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_docs_reference_no_external_host_and_their_assets_load(
    api: httpx.AsyncClient, page: str
) -> None:
    answer = await api.get(page)
    assert answer.status_code == 200
    assert not re.search(r"https?://", answer.text), answer.text
    urls = referenced(answer.text)
    assert any(u.endswith(".js") for u in urls), urls
    for url in urls:
        assert url.startswith("/"), url
        asset = await api.get(url)
        assert asset.status_code == 200, url
        assert asset.content, url
    spec = await api.get("/openapi.json")
    assert spec.status_code == 200
    assert "/v1/runs" in spec.json()["paths"]
