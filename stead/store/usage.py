"""Usage ledger, per-call memo and the exact-match response cache."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from stead.store.db import Conn

# The ledger's token counts by kind (writes: both TTLs, and the 1-hour part; output: thinking
# included, and the thinking part).
TOKEN_COLUMNS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "thinking_tokens",
)
GroupBy = Literal["model", "pipeline", "pipeline_model", "day", "user", "run"]
_GROUP_SQL: dict[str, str] = {
    "model": "model",
    "pipeline": "pipeline",
    "pipeline_model": "pipeline || '/' || model",
    "day": "to_char(date_trunc('day', at AT TIME ZONE 'UTC'), 'YYYY-MM-DD')",
    "user": "principal_id",
    "run": "run_id",
}


def request_hash(model_input: dict[str, Any]) -> bytes:
    """Hash of the request as the model sees it. Keys sorted, text stripped at the ends:
    the same question asked with a trailing newline is the same request."""

    def normalize(value: Any) -> Any:
        if isinstance(value, str):
            return value.strip()
        if isinstance(value, dict):
            return {k: normalize(v) for k, v in value.items() if k != "cache_control"}
        if isinstance(value, list):
            return [normalize(v) for v in value]
        return value

    canonical = json.dumps(normalize(model_input), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).digest()


@dataclass(frozen=True)
class Prepared:
    """What a model call needs to know before it may call a provider, in one round trip."""

    memo: dict[str, Any] | None
    cached: tuple[str, dict[str, Any]] | None
    budgeted: bool


async def prepare(
    conn: Conn,
    *,
    tenant: str,
    principal: str,
    call_key: str,
    model: str,
    digest: bytes | None,
) -> Prepared:
    """The call's memo (an earlier attempt finished), a fresh cache hit (counted as a hit),
    and whether any customer or user budget applies.

    The cache answers only with an entry of `model`, the model the call asks for first: never
    with another model of the route, which would hand an escalation the weaker model's reply
    it was escalated from, or a healthy primary its fallback's."""
    row = await conn.fetchrow(
        """
        WITH hit AS (
            UPDATE response_cache SET hits = hits + 1
            WHERE $5::bytea IS NOT NULL AND tenant_id = $2 AND model = $4
              AND request_hash = $5 AND expires_at > now()
            RETURNING reply
        )
        SELECT (SELECT reply FROM model_calls WHERE call_key = $1) AS memo,
               (SELECT reply FROM hit) AS hit,
               EXISTS (SELECT 1 FROM budgets WHERE tenant_id = $2 AND (
                   (scope = 'customer' AND subject = '') OR (scope = 'user' AND subject = $3)
               )) AS budgeted
        """,
        call_key,
        tenant,
        principal,
        model,
        digest,
    )
    assert row is not None
    cached = (model, dict(row["hit"])) if row["hit"] is not None else None
    memo = dict(row["memo"]) if row["memo"] is not None else None
    return Prepared(memo=memo, cached=cached, budgeted=bool(row["budgeted"]))


_USAGE_COLUMNS = (
    "call_key",
    "attempt",
    "tenant_id",
    "principal_id",
    "pipeline",
    "run_id",
    "step",
    "model",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_nusd",
    "cache_hit",
    "fallbacks",
    "latency_ms",
    "cache_write_1h_tokens",
    "thinking_tokens",
    "cache_saved_nusd",
    "batch",
)
_RECORD_USAGE = f"""
    INSERT INTO model_usage ({", ".join(_USAGE_COLUMNS)})
    VALUES ({", ".join(f"${i}" for i in range(1, len(_USAGE_COLUMNS) + 1))})
    ON CONFLICT (call_key, attempt) DO NOTHING
"""  # noqa: S608  # column names and placeholders are ours

_REMEMBER = """
    WITH memo AS (
        INSERT INTO model_calls (call_key, tenant_id, reply) VALUES ($1, $2, $3)
        ON CONFLICT (call_key) DO NOTHING
    )
    INSERT INTO response_cache (tenant_id, model, request_hash, reply, expires_at)
    SELECT $2, $4, $5, $6, now() + $7::interval WHERE $5::bytea IS NOT NULL
    ON CONFLICT (tenant_id, model, request_hash) DO UPDATE SET reply = EXCLUDED.reply,
        created_at = now(), expires_at = EXCLUDED.expires_at
"""


async def record_usage(conn: Conn, row: dict[str, Any]) -> None:
    """The ledger row of one attempt (idempotent). Numbers and identifiers only: whatever the
    reply holds, this write cannot fail on it."""
    await conn.execute(_RECORD_USAGE, *(row[c] for c in _USAGE_COLUMNS))


async def remember(
    conn: Conn,
    call_key: str,
    tenant: str,
    reply: dict[str, Any],
    cache: tuple[bytes, dict[str, Any], timedelta] | None,
) -> None:
    """The memo of a finished call and (when cacheable) its cache entry, under the model that
    answered, in one statement."""
    digest, stored, ttl = cache if cache is not None else (None, None, timedelta(0))
    await conn.execute(_REMEMBER, call_key, tenant, reply, reply["model"], digest, stored, ttl)


async def cache_purge_expired(conn: Conn) -> int:
    done = await conn.execute("DELETE FROM response_cache WHERE expires_at <= now()")
    return int(done.split()[-1])


async def summary(
    conn: Conn,
    tenant: str,
    group_by: GroupBy,
    start: datetime,
    end: datetime,
    run_id: str | None = None,
) -> list[dict[str, Any]]:
    group = _GROUP_SQL[group_by]
    rows = await conn.fetch(
        f"SELECT {group} AS key, count(*) AS calls,"  # noqa: S608  # group is from a fixed map
        " sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,"
        " sum(cache_read_tokens) AS cache_read_tokens,"
        " sum(cache_write_tokens) AS cache_write_tokens,"
        " sum(cache_write_1h_tokens) AS cache_write_1h_tokens,"
        " sum(thinking_tokens) AS thinking_tokens, sum(cost_nusd) AS cost_nusd,"
        " sum(cache_saved_nusd) AS cache_saved_nusd,"
        " count(*) FILTER (WHERE batch) AS batch_calls,"
        " count(*) FILTER (WHERE cache_hit) AS cache_hits, sum(fallbacks) AS fallbacks"
        " FROM model_usage WHERE tenant_id = $1 AND at >= $2 AND at < $3"
        " AND ($4::text IS NULL OR run_id = $4)"
        f" GROUP BY {group} ORDER BY {group}",
        tenant,
        start,
        end,
        run_id,
    )
    return [dict(r) for r in rows]


async def for_run(conn: Conn, tenant: str, run_id: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT * FROM model_usage WHERE tenant_id = $1 AND run_id = $2 ORDER BY at",
        tenant,
        run_id,
    )
    return [dict(r) for r in rows]


async def daily(
    conn: Conn, tenant: str, by: Literal["model", "pipeline"], start: datetime, end: datetime
) -> list[dict[str, Any]]:
    """Calls, tokens and cost per UTC day and model (or pipeline), oldest day first."""
    day, group = _GROUP_SQL["day"], _GROUP_SQL[by]
    rows = await conn.fetch(
        f"SELECT {day} AS day, {group} AS key, count(*) AS calls,"  # noqa: S608  # fixed map
        " sum(input_tokens + output_tokens + cache_read_tokens + cache_write_tokens) AS tokens,"
        " sum(cost_nusd) AS cost_nusd"
        " FROM model_usage WHERE tenant_id = $1 AND at >= $2 AND at < $3"
        " GROUP BY 1, 2 ORDER BY 1, 2",
        tenant,
        start,
        end,
    )
    return [dict(r) for r in rows]
