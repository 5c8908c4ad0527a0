"""The run's own record: stages, state query, progress and the audit outbox.

`RunCore` is the bottom of every pipeline workflow (see `stead.pipeline.base`). It owns what the
`state` query shows and how the run's audit events are buffered: events wait in workflow
state and the next ledger write stores them, keyed by run and sequence number, so replays and
retries never duplicate them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ValidationError
from temporalio import workflow
from temporalio.common import SearchAttributeUpdate
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from temporalio.contrib.workflow_streams import WorkflowStream

    from stead import retries, search
    from stead.calls import (
        FlushAudit,
    )
    from stead.contract import (
        WORKFLOW_REVISION,
        ActorKind,
        ApprovalState,
        AuditEvent,
        CancelInput,
        ErrorInfo,
        RunInput,
        RunStatus,
        RunView,
        Stage,
        StageEntry,
        Usage,
    )
    from stead.errors import ErrorType
    from stead.gateway.ledger import LedgerActivities
    from stead.pipeline.events import EVENTS_PATCH, RunEvents


_AGENT_LOOP = frozenset({Stage.MODEL_CALL, Stage.TOOL_EXECUTION})


class RunCore:
    """Explicit run state. Subclasses add approvals (`stead.pipeline.approvals`) and steps."""

    pipeline: ClassVar[str]
    input_model: ClassVar[type[BaseModel]]
    stages: ClassVar[tuple[str, ...]] = ()
    # What a model call refused by a budget does: fail the run (non-retryable), or park for an
    # approval to raise the budget and then try again.
    on_budget_exhausted: ClassVar[Literal["fail", "approval"]] = "fail"

    # Every pipeline inherits this initializer: the SDK finds `@workflow.init` on inherited
    # members (unlike `@workflow.run`, which each workflow class must define itself), so the
    # state query answers from the run's input before the run method starts.
    @workflow.init
    def __init__(self, run: RunInput) -> None:
        if run.context.revision > WORKFLOW_REVISION:
            # Started by a newer Stead than this worker: running it down this worker's paths
            # would record a history the newer code cannot replay. Fail the workflow task (it is
            # retried) until a worker of that revision picks the run up.
            raise RuntimeError(
                f"run started at workflow revision {run.context.revision}; this worker knows"
                f" up to {WORKFLOW_REVISION}: upgrade the workers"
            )
        self._ctx = run.context
        # What activities get: the context without the approval policies, which only the
        # workflow reads (smaller payloads on every step, for the server and the history).
        self._lean_ctx = run.context.model_copy(update={"approvals": {}})
        self._raw_input = run.input
        now = workflow.now()
        self._stage: str = Stage.INTAKE
        self._indexed_stage: str = Stage.INTAKE
        self._stages = [StageEntry(stage=Stage.INTAKE, entered_at=now)]
        self._approvals: dict[str, ApprovalState] = {}
        self._attempts: dict[str, int] = {}
        self._usage = Usage()
        self._error: ErrorInfo | None = None
        self._result: dict[str, Any] | None = None
        self._status = RunStatus.RUNNING
        self._outbox: list[AuditEvent] = []
        # Approvals decided through the API, whose inbox row the API already updated; the
        # workflow's own version rides along with the next ledger write.
        self._unpublished: dict[str, ApprovalState] = {}
        self._seq = 0
        self._model_calls = 0
        # Links of messages the gateway has stored for this run (stead.store.conversations).
        self._stored_links: set[bytes] = set()
        self._tool_calls = 0
        self._actions: list[dict[str, Any]] = []
        self._run_budget_nusd = (
            round(run.context.budget_usd * 1e9) if run.context.budget_usd is not None else None
        )
        self._started_at = now
        self._progress: dict[str, int] = {}
        # Who asked to cancel through the API (attested); None until then, and for a cancel
        # sent to Temporal directly, which the audit log records as such.
        self._cancel_request: CancelInput | None = None
        # Deferred model calls whose batch has ended (by custom_id): their results are in.
        self._batch_ready: set[str] = set()
        # The live events (stead.pipeline.events); the stream registers its handlers here,
        # before any subscriber's poll can arrive.
        self._events = RunEvents(WorkflowStream() if self._since(1, EVENTS_PATCH) else None)
        self.audit(
            "run.started",
            {"pipeline": run.context.pipeline, "input_sha256": _digest(run.input)},
            actor=run.context.requested_by,
        )

    # --- queries and updates ---------------------------------------------------------------

    @workflow.update
    def request_cancel(self, request: CancelInput) -> None:
        """Record who asks the run to stop; the API then cancels it through Temporal."""
        self._cancel_request = request

    @request_cancel.validator
    def _validate_request_cancel(self, request: CancelInput) -> None:
        if self._status is not RunStatus.RUNNING:
            raise ApplicationError(
                f"the run is already {self._status.value}", type=ErrorType.RUN_NOT_RUNNING
            )

    @workflow.signal(name="stead.batch_result")
    def batch_result(self, custom_id: str) -> None:
        """A deferred call's batch has ended and its result is recorded: look now rather than
        at the next periodic check. Anyone may send it; it only makes the run look early."""
        self._batch_ready.add(custom_id)

    @workflow.query
    def state(self) -> RunView:
        return RunView(
            run_id=self._ctx.run_id,
            pipeline=self._ctx.pipeline,
            tenant=self._ctx.tenant,
            requested_by=self._ctx.requested_by,
            status=self._status,
            stage=self._stage,
            stages=list(self._stages),
            approvals=list(self._approvals.values()),
            attempts=dict(self._attempts),
            usage=self._usage.model_copy(),
            last_error=self._error,
            result=self._result,
            started_at=self._started_at,
            progress=dict(self._progress),
        )

    def parse_input(self) -> Any:
        try:
            return self.input_model.model_validate(self._raw_input)
        except ValidationError as exc:
            raise ApplicationError(
                f"invalid input: {exc.errors()[0]['msg']}",
                type=ErrorType.INVALID_INPUT,
                non_retryable=True,
            ) from None

    def set_progress(self, **counters: int) -> None:
        if any(self._progress.get(name) != value for name, value in counters.items()):
            self._events.publish("run.progress", dict(counters), actor=self._system_actor)
        self._progress.update(counters)

    @property
    def _system_actor(self) -> str:
        return f"workflow:{self._ctx.pipeline}"

    def enter(self, stage: str) -> None:
        """Move the run to `stage`: stage history, search attribute, audit event."""
        self._enter(stage)

    def _enter(self, stage: str, index: Sequence[SearchAttributeUpdate[Any]] = ()) -> None:
        """`enter`, with other search-attribute updates made with the stage's."""
        if stage == self._stage:
            self._upsert(index)
            return
        now = workflow.now()
        self._stages[-1].left_at = now
        self._stages.append(StageEntry(stage=stage, entered_at=now))
        previous, self._stage = self._stage, stage
        updates = list(index)
        if (
            self._indexed_stage in _AGENT_LOOP
            and stage in _AGENT_LOOP
            and self._since(1, "agent-loop-stage-index")
        ):
            # An agent alternates model_call and tool_execution every turn; the index keeps the
            # first of them for the whole loop (the state query has the exact stage). Two
            # search-attribute updates per turn were a tenth of each turn's history.
            pass
        else:
            updates.insert(0, search.STAGE.value_set(str(stage)))
            self._indexed_stage = stage
        self._upsert(updates)
        seconds = (now - self._stages[-2].entered_at).total_seconds()
        self.audit(
            "stage.entered",
            {"stage": str(stage), "previous": str(previous), "previous_seconds": seconds},
        )

    def _since(self, revision: int, patch_id: str) -> bool:
        """Whether this run takes the path a change of the platform's workflow code brought:
        yes for runs started at `revision` or later (see `WORKFLOW_REVISION`), and for older
        runs as `workflow.patched(patch_id)` decided when the change was made."""
        return self._ctx.revision >= revision or workflow.patched(patch_id)

    def _upsert(self, updates: Sequence[SearchAttributeUpdate[Any]]) -> None:
        """One upsert command for all of `updates` (revision 2); one each before, in order,
        as runs of earlier revisions recorded them."""
        if not updates:
            return
        if self._ctx.revision >= 2:
            workflow.upsert_search_attributes(list(updates))
            return
        for update in updates:
            workflow.upsert_search_attributes([update])

    def audit(
        self,
        action: str,
        data: dict[str, Any],
        *,
        actor: str | None = None,
        actor_kind: ActorKind | None = None,
    ) -> None:
        """Buffer an audit event; the next ledger write stores it (exactly once)."""
        self._seq += 1
        info = workflow.info()
        kind: ActorKind
        if actor is None:
            actor, kind = self._system_actor, "system"
        else:
            kind = actor_kind or "user"
        self._events.publish(action, data, actor=actor)
        self._outbox.append(
            AuditEvent(
                # Replays rebuild the same key (same sequence, same run), so an event is stored
                # once; after a re-drive (a reset: a new run) the sequence repeats but the run id
                # does not, so what the run does after the reset is recorded rather than taken
                # for a duplicate. Not the workflow time: a workflow task whose ledger write
                # (a local activity) ran but whose worker died before completing it runs again
                # at a later time, and its events were stored twice (found by the
                # kill-during-approval-wait drill in tests/test_drills.py).
                key=f"{info.workflow_id}:{info.first_execution_run_id}:{self._seq}:{info.run_id}",
                tenant=self._ctx.tenant,
                actor=actor,
                actor_kind=kind,
                action=action,
                run_id=self._ctx.run_id,
                at=workflow.now(),
                data=data,
                pipeline=self._ctx.pipeline,
            )
        )

    @contextmanager
    def carried_outbox(self) -> Iterator[list[AuditEvent]]:
        """The buffered audit events, for the activity about to run to store: they leave the
        outbox now, and come back to its front if the activity fails (the next write takes
        them), so every event is stored once, in order, however the activity ends."""
        events, self._outbox = self._outbox, []
        try:
            yield events
        except BaseException:
            self._outbox = events + self._outbox
            raise

    async def flush_audit(self) -> None:
        """Store buffered audit events, and approvals whose projection is behind."""
        if not self._outbox and not self._unpublished:
            return
        behind, self._unpublished = self._unpublished, {}
        try:
            with self.carried_outbox() as events:
                await workflow.execute_local_activity_method(
                    LedgerActivities.flush,
                    FlushAudit(
                        events=events,
                        approvals=[a.model_copy(deep=True) for a in behind.values()],
                        context=self._lean_ctx if behind else None,
                        workflow_id=workflow.info().workflow_id,
                    ),
                    start_to_close_timeout=retries.LEDGER.start_to_close,
                    retry_policy=retries.LEDGER.retry,
                )
        except BaseException:
            self._unpublished = {**behind, **self._unpublished}
            raise


def _digest(value: Any) -> str:
    """Input fingerprint for the audit log: the input itself may be sensitive."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
