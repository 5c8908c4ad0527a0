"""Stead's HTTP API, and what an application's own routes build on.

An application adds routes beside Stead's with `App(routers=[...])`. Its handlers take the
authenticated caller (`Caller`) and run operations in the caller's name (`Runs`), which check
the same rights and limits as Stead's own routes:

    router = APIRouter(prefix="/v1/support")

    @router.post("/intake")
    async def intake(ticket: HelpdeskTicket, runs: stead.api.Runs) -> stead.api.RunStarted:
        return await runs.start("support-agent", to_input(ticket), idempotency_key=ticket.id)
"""

from stead.api.extend import Caller, RunOps, Runs
from stead.service.schemas import RunOut, RunStarted, RunSummary

__all__ = ["Caller", "RunOps", "RunOut", "RunStarted", "RunSummary", "Runs"]
