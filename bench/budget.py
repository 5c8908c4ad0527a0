"""Budget overshoot: one customer's daily budget under many concurrent runs.

Per trial, a fresh tenant gets a customer budget of `fit + 0.5` reservations, then `runs`
`summarize` runs (`review: false`) start at once over HTTP, more than the budget can pay for;
the runs it refuses fail. A reservation is one call's worst case (counted input tokens plus
`max_tokens` at the route's dearest model), measured by a calibration run first. The runs ask
for 5-word summaries (`max_tokens` 20, which the simulator always fills), so a call's actual
cost is close to its reservation (reported): the budget has little slack to hide a race in.
Texts are distinct and of one length (no cache hits, equal reservations).

When all runs have ended, the customer's counter gives the overshoot `(spent - limit) /
reservation`; a budget that holds never exceeds 0. The worst of `trials` trials is reported,
with the budget left unused and any reservation still outstanding (there should be none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.env import BenchEnv, EnvSpec, RunOptions, SteadSpec, Tenant, bench_env
from bench.load import BenchError, SteadApi, bounded, wait_closed
from bench.report import Comparison, Result, Table, at_most, say
from stead.store import budgets


@dataclass(frozen=True)
class Sizes:
    runs: int
    trials: int
    fit: int


SIZES = {False: Sizes(50, 20, 20), True: Sizes(10, 2, 4)}
SUMMARY = {"review": False, "max_words": 5}


def text(tenant: Tenant, index: int) -> str:
    return f"Note {index:04d} for {tenant.id}: revenue grew 12% in Q3; costs fell 3%."


async def _start_all(api: SteadApi, tenant: Tenant, runs: int) -> None:
    await bounded(
        runs,
        runs,
        lambda i: api.start(tenant, "summarize", {"text": text(tenant, i), **SUMMARY}),
    )


async def _wait(env: BenchEnv, tenant: Tenant, runs: int) -> dict[str, int]:
    query = f"WorkflowType = 'summarize' AND CustomerId = '{tenant.id}'"
    closed = await wait_closed(env.client, query, runs, within=max(120.0, runs), allow_failed=True)
    statuses: dict[str, int] = {}
    for execution in closed:
        name = execution.status.name.lower() if execution.status else "unknown"
        statuses[name] = statuses.get(name, 0) + 1
    return statuses


async def calibrate(env: BenchEnv, api: SteadApi) -> int:
    """One reservation's worst case, in nano-USD, from a run under a budget too large to bind
    (a call reserves only when some budget applies to it)."""
    tenant = await env.tenant()
    async with env.pool.acquire() as conn:
        await budgets.set_budget(conn, tenant.id, "customer", "", "day", 1_000_000.0)
    await _start_all(api, tenant, 1)
    await _wait(env, tenant, 1)
    async with env.pool.acquire() as conn:
        amount = await conn.fetchval(
            "SELECT max(amount_nusd) FROM budget_reservations WHERE tenant_id = $1", tenant.id
        )
    if not amount:
        raise BenchError("the calibration run reserved nothing")
    return int(amount)


async def trial(env: BenchEnv, api: SteadApi, sizes: Sizes, reservation: int) -> dict[str, Any]:
    tenant = await env.tenant()
    limit = round((sizes.fit + 0.5) * reservation)
    async with env.pool.acquire() as conn:
        await budgets.set_budget(conn, tenant.id, "customer", "", "day", limit / 1e9)
    await _start_all(api, tenant, sizes.runs)
    statuses = await _wait(env, tenant, sizes.runs)
    async with env.pool.acquire() as conn:
        counter = await conn.fetchrow(
            "SELECT spent_nusd, reserved_nusd, limit_nusd FROM budget_counters"
            " WHERE tenant_id = $1 AND scope = 'customer'",
            tenant.id,
        )
        largest = await conn.fetchval(
            "SELECT max(amount_nusd) FROM budget_reservations WHERE tenant_id = $1", tenant.id
        )
    if counter is None or not largest:
        raise BenchError(f"no customer budget counter for {tenant.id}")
    spent, unit = int(counter["spent_nusd"]), int(largest)
    return {
        "limit_nusd": int(counter["limit_nusd"]),
        "spent_nusd": spent,
        "reserved_after_nusd": int(counter["reserved_nusd"]),
        "reservation_nusd": unit,
        "overshoot": (spent - int(counter["limit_nusd"])) / unit,
        "unused": (int(counter["limit_nusd"]) - spent) / unit,
        "actual_over_reserved": spent / max(statuses.get("completed", 0), 1) / unit,
        **statuses,
    }


def _result(sizes: Sizes, quick: bool, reservation: int, trials: list[dict[str, Any]]) -> Result:
    worst = max(t["overshoot"] for t in trials)
    outstanding = max(t["reserved_after_nusd"] for t in trials)
    rows = [
        [
            i + 1,
            t.get("completed", 0),
            t.get("failed", 0),
            t["spent_nusd"] / 1e9,
            t["limit_nusd"] / 1e9,
            t["overshoot"],
            t["unused"],
            t["actual_over_reserved"],
            t["reserved_after_nusd"],
        ]
        for i, t in enumerate(trials)
    ]
    headers = [
        "trial",
        "completed",
        "failed",
        "spent USD",
        "limit USD",
        "overshoot (res.)",
        "unused (res.)",
        "actual / reserved per call",
        "reserved after (nUSD)",
    ]
    return Result(
        name="budget",
        title=f"Budget overshoot: {sizes.runs} concurrent runs of one customer,"
        f" {sizes.trials} trials",
        quick=quick,
        params={**vars(sizes), "reservation_nusd": reservation},
        comparisons=[
            Comparison(
                f"overshoot, worst of {len(trials)} trials",
                "reservations",
                worst,
                None,
                None,
                "<= 0",
                at_most(worst, 0),
            ),
            Comparison(
                "reservations outstanding after all runs ended",
                "nUSD",
                outstanding,
                None,
                None,
                "= 0",
                outstanding == 0,
            ),
        ],
        tables=[Table("Trials", headers, rows)],
        data={"trials": trials},
        notes=[
            "A reservation is the call's worst case (input tokens counted, plus max_tokens, at"
            " the dearest model of the route); settlement charges the actual cost.",
            "`unused` is budget left too small for one more call's worst case (a call that"
            " finds room taken only by reservations in flight waits for them to settle): the"
            " price of never overshooting.",
        ],
    )


async def measure(env: BenchEnv, sizes: Sizes) -> tuple[int, list[dict[str, Any]]]:
    results: list[dict[str, Any]] = []
    async with SteadApi.client(env.stack().api_url, connections=sizes.runs) as http:
        api = SteadApi(http)
        reservation = await calibrate(env, api)
        for index in range(sizes.trials):
            results.append(await trial(env, api, sizes, reservation))
            say(f"trial {index + 1}/{sizes.trials}: overshoot {results[-1]['overshoot']:.3f}")
    return reservation, results


async def run(options: RunOptions) -> Result:
    sizes = SIZES[options.quick]
    async with bench_env(EnvSpec(stead=(SteadSpec(),), bare=False), options) as env:
        reservation, results = await measure(env, sizes)
    return _result(sizes, options.quick, reservation, results)
