"""The public base of every pipeline: declare it once, write its steps, Stead does the rest.

    class Summarize(stead.Pipeline[SummarizeInput, Summary], name="summarize",
                    stages=(Stage.MODEL_CALL, Stage.REVIEW), approvals=("review",),
                    tasks=("draft",), proposals={"summary": SummaryProposal}):
        async def steps(self, params: SummarizeInput) -> stead.Outcome[Summary]:
            reply = await self.call_model(step="summarize", task="draft", messages=params.text)
            decided = await self.request_approval(stead.Proposal(...), step="review")
            return stead.Completed(Summary(...)) if decided.approved else stead.Rejected(...)

The class keywords are the whole declaration: `name` (the pipeline's name, and its Temporal
workflow name unless `temporal_name` keeps an older one), the stages it may enter (enforced:
entering an undeclared one fails the run), the approval steps it asks for, the task classes it
routes model calls by (checked against the routing policy at start), the tools it offers, the
schemas of its proposals, and the model steps whose replies stream to the run's live events
as they are written (`stream_steps`, see `stead.pipeline.events`). The typed input is validated
before `steps` runs; the typed output is what the run returns. No `run` method, no duplicated
name.

Steps use these methods (each durable: a step that finished is never run again):

- `call_model`: one model call through the gateway (routing, budget, cache, usage, audit);
  with `output=Model` the model must answer with that structure, validated, and one repair on
  the route's stronger model if it does not;
- `use_tool`: an agent's tool call through the tool gateway (permissions, trusted facts,
  approval, idempotent execution, audit), returning the `tool_result` block for the model;
- `call_tool`: the pipeline calls a tool itself and gets its structured result;
- `request_approval`: ask people, wait through deadlines, get their decision;
- `retrieve`: passages from the tenant's documents;
- `enter`, `set_progress`, `audit`: the run's stage, progress counters and audit entries.

Under it are `stead.pipeline.core` (run state, the `state` query, the audit outbox) and
`stead.pipeline.approvals` (the `decide` update, deadlines, escalation, quorum).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar, Generic, Literal, TypeVar, get_args, overload

from pydantic import BaseModel, ValidationError
from temporalio import workflow
from temporalio.common import Priority, SearchAttributeUpdate
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from stead import retries, search, transcript
    from stead.calls import (
        ApprovalGrant,
        BatchCheck,
        DeferCall,
        DeferTicket,
        FoundPassages,
        ModelCall,
        ModelReply,
        Passage,
        RaiseBudget,
        SearchPassages,
        ToolInvocation,
        ToolOutcome,
    )
    from stead.contract import (
        MAX_BUDGET_USD,
        ApprovalOutcome,
        ErrorInfo,
        Proposal,
        RunInput,
        RunResult,
        RunStatus,
        Stage,
    )
    from stead.errors import ErrorType
    from stead.gateway.batches import BatchingModelActivities
    from stead.gateway.ledger import LedgerActivities
    from stead.gateway.model import ModelActivities
    from stead.gateway.retrieval import RetrievalActivities
    from stead.gateway.tools import ToolActivities
    from stead.pipeline.events import bounded
    from stead.pipeline.proposals import BudgetProposal
    from stead.tools import Tool

from stead.pipeline.approvals import ApprovalSteps

InputT = TypeVar("InputT", bound=BaseModel)
OutputT = TypeVar("OutputT", bound=BaseModel)
ParsedT = TypeVar("ParsedT", bound=BaseModel)
T = TypeVar("T")
# The stages every run may enter whatever it declares.
_ALWAYS = frozenset({Stage.INTAKE, Stage.COMPLETED, Stage.FAILED, Stage.CANCELLED})
_RESPOND = "respond"


@dataclass(frozen=True)
class Completed(Generic[OutputT]):
    """The run did what it was asked: its result is `output`."""

    output: OutputT


@dataclass(frozen=True)
class Rejected(Generic[OutputT]):
    """People decided against what the run proposed: it ends `rejected`, with `output`."""

    output: OutputT


Outcome = Completed[OutputT] | Rejected[OutputT]


@dataclass(frozen=True)
class Parsed(Generic[ParsedT]):
    """A model reply forced to a structure: the validated `value`, and the `reply` itself."""

    value: ParsedT
    reply: ModelReply


class Pipeline(ApprovalSteps, Generic[InputT, OutputT]):
    """The base of every pipeline. Subclass it with the class keywords above and write
    `steps`; an intermediate subclass without `name` is abstract."""

    declared: ClassVar[bool] = False
    output_model: ClassVar[type[BaseModel]]
    description: ClassVar[str] = ""
    tools: ClassVar[tuple[Tool[Any], ...]] = ()
    tasks: ClassVar[tuple[str, ...]] = ()
    approval_steps: ClassVar[tuple[str, ...]] = ()
    proposals: ClassVar[Mapping[str, type[BaseModel]]] = {}
    stream_steps: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(
        cls,
        *,
        name: str | None = None,
        temporal_name: str | None = None,
        stages: Sequence[str] = (),
        approvals: Sequence[str] = (),
        tasks: Sequence[str] = (),
        tools: Sequence[Tool[Any]] = (),
        proposals: Mapping[str, type[BaseModel]] | None = None,
        on_budget_exhausted: Literal["fail", "approval"] = "fail",
        description: str | None = None,
        sandboxed: bool = True,
        stream_steps: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if name is None:
            return
        input_model, output_model = _io_models(cls)
        declared_stages = tuple(dict.fromkeys(str(s) for s in stages))
        _check_declaration(cls, name, declared_stages, tools, on_budget_exhausted)
        cls.pipeline = name
        cls.input_model = input_model
        cls.output_model = output_model
        cls.stages = declared_stages
        cls.approval_steps = tuple(approvals)
        cls.tasks = tuple(tasks)
        cls.tools = tuple(tools)
        cls.proposals = dict(proposals or {})
        cls.on_budget_exhausted = on_budget_exhausted
        cls.description = description or (cls.__doc__ or "").strip().split("\n\n")[0]
        cls.stream_steps = frozenset(stream_steps)
        cls.declared = True

        # Temporal wants the run method on the workflow class itself, decorated: made here.
        async def run(self, run: RunInput) -> RunResult:  # type: ignore[no-untyped-def]  # its parameters must match @workflow.init's exactly
            return await self._drive()  # type: ignore[no-any-return]

        # ...and recognizes it as the class's own by its module and qualified name.
        run.__module__ = cls.__module__
        run.__qualname__ = f"{cls.__name__}.run"
        cls.run = workflow.run(run)  # type: ignore[method-assign]  # once per declared class
        workflow.defn(name=temporal_name or name, sandboxed=sandboxed)(cls)

    async def run(self, run: RunInput) -> RunResult:
        """The workflow's entry point (`client.start_workflow(Pipeline.run, ...)`); each
        declared pipeline gets its own, which validates the input and runs `steps`."""
        return await self._drive()

    async def steps(self, params: InputT) -> Outcome[OutputT]:
        """The pipeline's work, from its validated input to its outcome."""
        raise NotImplementedError(f"{type(self).__name__} must define steps()")

    @classmethod
    def proposal_schema(cls, name: str) -> type[BaseModel] | None:
        """The model validating a proposal's data (and an approver's edits): one the pipeline
        declared, a tool's input model (`tool:<name>`), or the budget raise."""
        if name.startswith("tool:"):
            tool = next((t for t in cls.tools if t.name == name.removeprefix("tool:")), None)
            return tool.input_model if tool else None
        if name == "budget":
            return BudgetProposal
        return cls.proposals.get(name)

    @classmethod
    def tool(cls, name: str) -> Tool[Any] | None:
        return next((t for t in cls.tools if t.name == name), None)

    @property
    def actions(self) -> list[dict[str, Any]]:
        """Every tool call of the run so far: tool, status, rule and arguments."""
        return list(self._actions)

    def _enter(self, stage: str, index: Sequence[SearchAttributeUpdate[Any]] = ()) -> None:
        if stage not in _ALWAYS and stage not in self.stages:
            raise ApplicationError(
                f"pipeline {self.pipeline} entered stage {stage!r}, which it does not declare"
                f" (stages={self.stages!r})",
                type=ErrorType.UNDECLARED_STAGE,
                non_retryable=True,
            )
        super()._enter(stage, index)

    # --- model calls -------------------------------------------------------------------------

    @overload
    async def call_model(
        self,
        *,
        step: str,
        task: str,
        messages: str | Sequence[Mapping[str, Any]],
        system: str | None = ...,
        tools: Sequence[Tool[Any] | Mapping[str, Any]] = ...,
        max_tokens: int = ...,
        escalate: bool = ...,
        cache: bool = ...,
        prompt_cache: bool = ...,
        defer: bool | None = ...,
        output: None = ...,
    ) -> ModelReply: ...

    @overload
    async def call_model(
        self,
        *,
        step: str,
        task: str,
        messages: str | Sequence[Mapping[str, Any]],
        system: str | None = ...,
        tools: Sequence[Tool[Any] | Mapping[str, Any]] = ...,
        max_tokens: int = ...,
        escalate: bool = ...,
        cache: bool = ...,
        prompt_cache: bool = ...,
        defer: bool | None = ...,
        output: type[ParsedT],
    ) -> Parsed[ParsedT]: ...

    async def call_model(
        self,
        *,
        step: str,
        task: str,
        messages: str | Sequence[Mapping[str, Any]],
        system: str | None = None,
        tools: Sequence[Tool[Any] | Mapping[str, Any]] = (),
        max_tokens: int = 1024,
        escalate: bool = False,
        cache: bool = True,
        prompt_cache: bool = True,
        defer: bool | None = None,
        output: type[ParsedT] | None = None,
    ) -> ModelReply | Parsed[ParsedT]:
        """One model step through the gateway (routing by `task` and the tenant's plan,
        fallbacks, budget, cache, usage, audit). `messages` may be one user turn's text.
        `cache=False` skips Stead's exact-match response cache; `prompt_cache=False` places no
        provider prompt-cache breakpoints (otherwise the route's TTL decides: 5m, 1h or off).
        `defer=True` sends the call through the Message Batches API (half price; the run waits
        durably, then falls back to a direct call at its deadline); None follows the run's
        `defer` flag at start, False keeps this step direct whatever the run says.
        With `output`, the model is made to answer in that structure (a forced tool call),
        which is validated; an invalid answer is repaired once by the route's stronger model,
        and a second invalid one fails the run (`StructuredOutputInvalid`)."""
        turns = (
            [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        )
        call = ModelCall(
            context=self._ctx,
            step=step,
            task=task,
            system=system,
            messages=[dict(m) for m in turns],
            tools=[t.schema() if isinstance(t, Tool) else dict(t) for t in tools],
            max_tokens=max_tokens,
            escalate=escalate,
            cache=cache,
            prompt_cache=prompt_cache,
            defer=defer,
        )
        if output is None:
            return await self._model_step(call)
        return await self._structured(call, output)

    async def _structured(self, call: ModelCall, output: type[ParsedT]) -> Parsed[ParsedT]:
        forced = call.model_copy(
            update={
                "tools": [*call.tools, _respond_tool(output)],
                "tool_choice": {"type": "tool", "name": _RESPOND},
            }
        )
        reply = await self._model_step(forced)
        value, problem = _parse(reply, output)
        if value is not None:
            return Parsed(value, reply)
        self.audit("model.repaired", {"step": call.step, "problem": problem})
        answer = next((b for b in reply.tool_uses if b.get("name") == _RESPOND), None)
        repair = [
            *forced.messages,
            {"role": "assistant", "content": reply.content},
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": str(answer.get("id", "")) if answer else "",
                        "content": f"Invalid: {problem}. Answer again, following the schema.",
                        "is_error": True,
                    }
                ]
                if answer
                else f"Answer with the {_RESPOND} tool, following its schema ({problem}).",
            },
        ]
        again = await self._model_step(
            forced.model_copy(
                update={"step": f"{call.step}-repair", "messages": repair, "escalate": True}
            )
        )
        value, problem = _parse(again, output)
        if value is None:
            raise ApplicationError(
                f"step {call.step}: the model's answer does not fit {output.__name__}: {problem}",
                type=ErrorType.STRUCTURED_OUTPUT_INVALID,
                non_retryable=True,
            )
        return Parsed(value, again)

    async def _model_step(self, call: ModelCall) -> ModelReply:
        while True:
            try:
                return await self._call_model_once(call)
            except ActivityError as exc:
                if (
                    self.on_budget_exhausted != "approval"
                    or _error_type(exc) != ErrorType.BUDGET_EXHAUSTED
                ):
                    raise
                if not await self._raise_budget(exc):
                    raise

    # --- retrieval ---------------------------------------------------------------------------

    async def retrieve(self, query: str, *, top_k: int = 5) -> list[Passage]:
        """Passages from the tenant's own documents, best first (PostgreSQL full text)."""
        self.enter(Stage.RETRIEVAL)
        policy = retries.RETRIEVAL
        found: FoundPassages = await workflow.execute_activity_method(
            RetrievalActivities.search,
            SearchPassages(tenant=self._ctx.tenant, query=query, limit=top_k),
            start_to_close_timeout=policy.start_to_close,
            retry_policy=policy.retry,
        )
        self.set_progress(passages=len(found.passages))
        return found.passages

    # --- approvals -----------------------------------------------------------------------------

    async def request_approval(self, proposal: Proposal, *, step: str) -> ApprovalOutcome:
        """Ask people to decide `proposal` under the approval policy of `step` (one the
        pipeline declares in `approvals=`), and wait for their decision."""
        if step not in self.approval_steps:
            raise ApplicationError(
                f"pipeline {self.pipeline} asks for approval step {step!r}, which it does not"
                f" declare (approvals={self.approval_steps!r})",
                type=ErrorType.UNDECLARED_STAGE,
                non_retryable=True,
            )
        return await self._ask_approval(proposal, self.approval_policy(step))

    async def _raise_budget(self, exc: ActivityError) -> bool:
        """Ask for a bigger budget; True when approved and applied."""
        detail = _error_detail(exc)
        scope, limit = str(detail.get("scope", "run")), int(detail.get("limit_nusd", 0))
        current = limit / 1e9
        outcome = await self._ask_approval(
            Proposal(
                kind="budget",
                title=f"Raise the {scope} budget",
                schema_name="budget",
                data={
                    "scope": scope,
                    "current_usd": current,
                    "requested_usd": min(max(current * 2, 0.01), MAX_BUDGET_USD),
                },
                editable=("requested_usd",),
                context={"period": detail.get("period", "run")},
            ),
            self.approval_policy("budget"),
        )
        if not outcome.approved:
            return False
        new_limit = round(float(outcome.data["requested_usd"]) * 1e9)
        if scope == "run":
            self._run_budget_nusd = new_limit
        else:
            await workflow.execute_local_activity_method(
                LedgerActivities.raise_budget,
                RaiseBudget(
                    tenant=self._ctx.tenant,
                    scope=scope,
                    subject=self._ctx.requested_by if scope == "user" else "",
                    period=str(detail.get("period", "day")),
                    limit_nusd=new_limit,
                    approval_id=outcome.approval_id,
                    approved_by=outcome.decided_by,
                ),
                start_to_close_timeout=retries.LEDGER.start_to_close,
                retry_policy=retries.LEDGER.retry,
            )
        self.audit(
            "budget.raised",
            {"scope": scope, "limit_nusd": new_limit, "approval_id": outcome.approval_id},
        )
        return True

    async def use_tool(
        self, tool_use: Mapping[str, Any], facts: Mapping[str, Any]
    ) -> dict[str, Any]:
        """An agent's tool call through the gateway; returns the `tool_result` block for the
        model. `facts` are what the run itself knows and trusts (the ticket's customer id),
        against which the call's arguments are checked, never the model's words.

        A call that needs approval waits for it here (several may wait at once), then goes
        through the gateway again: permissions are re-checked after the wait.
        """
        invocation = self._invocation(
            str(tool_use.get("name", "")),
            dict(tool_use.get("input") or {}),
            facts,
            call_id=str(tool_use.get("id", "")),
        )
        outcome = await self._tool_step(invocation)
        return {
            "type": "tool_result",
            "tool_use_id": invocation.call_id,
            "content": outcome.content,
            "is_error": outcome.is_error,
        }

    async def call_tool(
        self, tool: Tool[Any], arguments: Mapping[str, Any], *, facts: Mapping[str, Any]
    ) -> ToolOutcome:
        """The pipeline calls a tool itself, through the same gateway as an agent's calls
        (permissions for the run's requester, trusted facts, approval, audit); the outcome's
        `status` says whether it ran (`executed`) and `data` holds its structured result."""
        invocation = self._invocation(tool.name, dict(arguments), facts, call_id="")
        return await self._tool_step(invocation)

    def _invocation(
        self, tool: str, arguments: dict[str, Any], facts: Mapping[str, Any], *, call_id: str
    ) -> ToolInvocation:
        self.enter(Stage.TOOL_EXECUTION)
        self._tool_calls += 1
        info = workflow.info()
        return ToolInvocation(
            context=self._lean_ctx,
            agent=self.pipeline,
            call_id=call_id,
            tool=tool,
            arguments=arguments,
            # The Temporal run id: stable across this run's retries and replays, new after a
            # re-drive (a reset starts a new run), so a re-driven step is a new operation.
            op_key=f"{info.workflow_id}:{info.run_id}:tool:{self._tool_calls}",
            facts=dict(facts),
            offered=tuple(t.name for t in self.tools),
        )

    async def _tool_step(self, invocation: ToolInvocation) -> ToolOutcome:
        outcome = await self._invoke_tool(invocation)
        if outcome.status == "needs_approval":
            outcome = await self._approve_tool(invocation, outcome)
        self._actions.append(
            {
                "tool": invocation.tool,
                "status": outcome.status,
                "rule": outcome.rule,
                "arguments": outcome.arguments,
            }
        )
        return outcome

    async def _approve_tool(self, invocation: ToolInvocation, pending: ToolOutcome) -> ToolOutcome:
        spec = self.tool(invocation.tool)
        step = self.approval_policy("tool_call")
        policy = step.model_copy(update={"roles": pending.approver_roles or step.roles})
        decision = await self._ask_approval(
            Proposal(
                kind="tool_call",
                title=f"{invocation.tool} for {self._ctx.requested_by}",
                schema_name=f"tool:{invocation.tool}",
                data=pending.arguments,
                editable=spec.editable if spec else (),
                context={**pending.facts, "rule": pending.rule},
            ),
            policy,
        )
        if not decision.approved:
            why = f"a reviewer {decision.status.value} this call" + (
                f": {decision.comment}" if decision.comment else ""
            )
            return pending.model_copy(update={"status": "denied", "content": why, "is_error": True})
        grant = ApprovalGrant(
            approval_id=decision.approval_id,
            decided_by=decision.decided_by,
            arguments=decision.data,
        )
        self.enter(Stage.TOOL_EXECUTION)
        return await self._invoke_tool(invocation.model_copy(update={"approval": grant}))

    async def _invoke_tool(self, invocation: ToolInvocation) -> ToolOutcome:
        outcome = await self._tool_activity(invocation)
        content, cut = bounded(outcome.content)
        self._events.publish(
            "tool.called",
            {
                "tool": invocation.tool,
                "call_id": invocation.call_id,
                "status": outcome.status,
                "rule": outcome.rule,
                "reason": outcome.reason,
                "is_error": outcome.is_error,
                "approver_roles": list(outcome.approver_roles),
                "arguments": outcome.arguments or invocation.arguments,
                "content": content,
                "truncated": cut,
            },
            actor=self._system_actor,
        )
        return outcome

    async def _tool_activity(self, invocation: ToolInvocation) -> ToolOutcome:
        policy = retries.TOOL
        try:
            with self.carried_outbox() as events:
                return await workflow.execute_activity_method(
                    ToolActivities.invoke,
                    invocation.model_copy(update={"events": events}),
                    start_to_close_timeout=policy.start_to_close,
                    heartbeat_timeout=policy.heartbeat,
                    retry_policy=policy.retry,
                    priority=Priority(fairness_key=self._ctx.tenant[:64]),
                    cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                )
        except ActivityError as exc:
            # The tool is broken, not the run: tell the model and let it carry on.
            return ToolOutcome(
                status="failed", content=f"the tool failed: {_message(exc)}", is_error=True
            )

    async def _call_model_once(self, call: ModelCall) -> ModelReply:
        if self._defers(call):
            return await self._call_deferred(call)
        return await self._call_direct(call)

    def _defers(self, call: ModelCall) -> bool:
        wanted = self._ctx.defer if call.defer is None else call.defer
        return wanted and self._since(1, "model-batches")

    async def _call_deferred(self, call: ModelCall) -> ModelReply:
        """The call through the tenant's batcher (see stead.gateway.batches); a direct call
        once the batch failed it or its deadline passed."""
        self.enter(Stage.MODEL_CALL)
        self._model_calls += 1
        info = workflow.info()
        carried, links = self._transcript(call)
        prepared = call.model_copy(
            update={
                "context": self._lean_ctx,
                "call_key": f"{info.workflow_id}:{info.run_id}:model:{self._model_calls}",
                "run_budget_nusd": self._run_budget_nusd,
                **carried,
            }
        )
        policy = retries.MODEL
        with self.carried_outbox() as events:
            ticket = await workflow.execute_activity_method(
                BatchingModelActivities.defer,
                DeferCall(
                    call=prepared.model_copy(update={"events": events}),
                    workflow_id=info.workflow_id,
                    task_queue=info.task_queue,
                    deadline_seconds=self._ctx.defer_deadline_seconds,
                ),
                start_to_close_timeout=policy.start_to_close,
                heartbeat_timeout=policy.heartbeat,
                retry_policy=policy.retry,
                priority=Priority(fairness_key=self._ctx.tenant[:64]),
            )
        self._stored_links.update(links)
        reply = ticket.reply or await self._wait_for_batch(ticket)
        if reply is None:
            return await self._call_direct(call)
        self._attempts[call.step] = reply.attempt
        self._usage.add(reply.usage)
        return reply

    async def _wait_for_batch(self, ticket: DeferTicket) -> ModelReply | None:
        """Wait for the batcher's signal or the next periodic check, up to the deadline;
        the reply, or None (the batch failed the call, or the deadline passed: given up)."""
        deadline = workflow.now() + timedelta(seconds=ticket.deadline_seconds)
        custom_id = ticket.custom_id
        try:
            while (left := (deadline - workflow.now()).total_seconds()) > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await workflow.wait_condition(
                        lambda: custom_id in self._batch_ready,
                        timeout=min(ticket.check_seconds, left),
                    )
                self._batch_ready.discard(custom_id)
                outcome = await self._batch_step(BatchingModelActivities.collect_batch, custom_id)
                if outcome.status != "pending":
                    return outcome.reply
        except BaseException as exc:
            if is_cancelled_exception(exc):
                # Cancelling the run cancels its request (or its batch, if it is the only one).
                await self._batch_step(BatchingModelActivities.abandon_batch, custom_id)
            raise
        self.audit("model.batch_deadline", {"custom_id": custom_id, "then": "direct call"})
        await self._batch_step(BatchingModelActivities.abandon_batch, custom_id)
        return None

    async def _batch_step(
        self, method: Callable[[Any, BatchCheck], Awaitable[T]], custom_id: str
    ) -> T:
        policy = retries.LEDGER
        with self.carried_outbox() as events:
            return await workflow.execute_activity_method(
                method,
                BatchCheck(custom_id=custom_id, events=events),
                start_to_close_timeout=policy.start_to_close,
                retry_policy=policy.retry,
            )

    async def _call_direct(self, call: ModelCall) -> ModelReply:
        self.enter(Stage.MODEL_CALL)
        self._model_calls += 1
        info = workflow.info()
        # Stable across retries and replays of this run; new after a re-drive, so the re-driven
        # call is reserved, charged and recorded as the new attempt it is.
        call_key = f"{info.workflow_id}:{info.run_id}:model:{self._model_calls}"
        streamed = call.step in self.stream_steps and self._events.enabled
        carried, links = self._transcript(call)
        policy = retries.MODEL
        try:
            with self.carried_outbox() as events:
                reply = await workflow.execute_activity_method(
                    ModelActivities.call_model,
                    call.model_copy(
                        update={
                            "context": self._lean_ctx,
                            "events": events,
                            "call_key": call_key,
                            "run_budget_nusd": self._run_budget_nusd,
                            "stream_call": self._model_calls if streamed else None,
                            **carried,
                        }
                    ),
                    task_queue=self.model_task_queue,
                    start_to_close_timeout=policy.start_to_close,
                    heartbeat_timeout=policy.heartbeat,
                    retry_policy=policy.retry,
                    priority=Priority(fairness_key=self._ctx.tenant[:64]),
                    # A cancelled run waits for the call to stop and settle its reservation.
                    cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                )
        except BaseException as exc:
            self._attempts[call.step] = _attempt_of(exc)
            raise
        self._stored_links.update(links)
        self._attempts[call.step] = reply.attempt
        self._usage.add(reply.usage)
        self._publish_reply(call, reply)
        return reply

    def _transcript(self, call: ModelCall) -> tuple[dict[str, Any], list[bytes]]:
        """What of the conversation the gateway's input carries, and the links the gateway
        stores by carrying it. For a run of revision 3 on whose preamble (system prompt and
        tools) and messages reach `INLINE_BYTES`: the link of the longest prefix stored
        before and the items after it (stead.store.conversations). Otherwise (no update)
        all of it, as before."""
        if self._ctx.revision < 3:
            return {}, []
        try:
            encoded = [
                transcript.canonical(item)
                for item in (transcript.preamble(call.system, call.tools), *call.messages)
            ]
        except (TypeError, ValueError):
            return {}, []  # what JSON cannot hold as it is the payload converter carries
        if sum(len(e) for e in encoded) < transcript.INLINE_BYTES:
            return {}, []
        links = transcript.links(encoded)
        known = next((i for i in range(len(links), 0, -1) if links[i - 1] in self._stored_links), 0)
        if not known:
            return {"prefix": "", "prefix_length": 0}, links
        update = {
            "prefix": transcript.text_of(links[known - 1]),
            "prefix_length": known,
            "system": None,
            "tools": [],
            "messages": call.messages[known - 1 :],
        }
        return update, links

    def _publish_reply(self, call: ModelCall, reply: ModelReply) -> None:
        """The call's live event: what it cost, and (for viewers who may read it) what it
        said; a step that streamed its tokens ends with this event as the final text."""
        used = reply.usage
        content, cut = bounded(reply.text)
        self._events.publish(
            "model.called",
            {
                "call": self._model_calls,
                "step": call.step,
                "model": reply.model,
                "attempt": reply.attempt,
                **used.model_dump(
                    include={
                        "input_tokens",
                        "output_tokens",
                        "cache_read_tokens",
                        "cache_write_tokens",
                        "cost_nusd",
                    }
                ),
                "cost_usd": used.cost_usd,
                "cache_hit": reply.cache_hit,
                "fallbacks": reply.fallbacks,
                "latency_ms": reply.latency_ms,
                "stop_reason": reply.stop_reason,
                "tool_calls": [str(b.get("name", "")) for b in reply.tool_uses],
                "content": content,
                "truncated": cut,
            },
            actor=self._system_actor,
        )

    @property
    def model_task_queue(self) -> str:
        # The rate-limited `<workflow queue>-model` when the run was started with a model-call
        # rate; otherwise the workflow's own queue, where the server dispatches eagerly.
        queue = workflow.info().task_queue
        return f"{queue}-model" if self._ctx.limited_model_queue else queue

    # --- the run's lifecycle -------------------------------------------------------------

    async def _drive(self) -> RunResult:
        """Run the pipeline's steps and end the run in exactly one recorded way."""
        try:
            outcome, output = _result_of(await self.steps(self.parse_input()), self.output_model)
        except BaseException as exc:
            if is_cancelled_exception(exc):
                await self._end_cancelled()
                raise
            if not isinstance(exc, ActivityError | ApplicationError):
                raise  # a bug: fail the workflow task, fix the code, the run continues
            await self._end_failed(exc)
            raise _failure(exc) from None
        self._result = output
        self._finish(RunStatus.COMPLETED, Stage.COMPLETED)
        self.audit("run.completed", {"outcome": outcome, "output": output, **self._cost()})
        self._events.detach()
        await self.flush_audit()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return RunResult(outcome=outcome, output=output, usage=self._usage)

    def _cost(self) -> dict[str, Any]:
        return {"cost_nusd": self._usage.cost_nusd, "model_calls": self._usage.model_calls}

    def _finish(self, status: RunStatus, stage: Stage, *index: SearchAttributeUpdate[Any]) -> None:
        self._enter(stage, [search.COST_USD.value_set(self._usage.cost_usd), *index])
        self._status = status

    async def _end_failed(self, exc: ActivityError | ApplicationError) -> None:
        cause = exc.cause if isinstance(exc, ActivityError) else exc
        error_type = cause.type if isinstance(cause, ApplicationError) and cause.type else "Error"
        message = cause.message if isinstance(cause, ApplicationError) else str(cause or exc)
        retryable = not (isinstance(cause, ApplicationError) and cause.non_retryable)
        self._error = ErrorInfo(
            type=error_type, message=message, stage=self._stage, retryable=retryable
        )
        failed_in = self._stage
        self._cancel_pending_approvals()
        self._finish(RunStatus.FAILED, Stage.FAILED, search.ERROR_TYPE.value_set(error_type))
        self.audit(
            "run.failed",
            {"error_type": error_type, "message": message, "stage": failed_in, **self._cost()},
        )
        self._events.detach()
        await self.flush_audit()
        await self._events.close()

    async def _end_cancelled(self) -> None:
        cancelled = self._cancel_pending_approvals()
        self._finish(RunStatus.CANCELLED, Stage.CANCELLED)
        request = self._cancel_request
        data: dict[str, Any] = {"approvals_cancelled": [a.approval_id for a in cancelled]}
        if request is None:
            # Cancelled through Temporal itself, not through Stead: nobody to attribute it to.
            self.audit("run.cancelled", {**data, "requested_through": "temporal"})
        else:
            self.audit(
                "run.cancelled",
                {**data, "requested_through": "api", "reason": request.reason},
                actor=request.principal,
            )
        self._events.detach()
        for approval in cancelled:
            await self._publish(approval)
        await self.flush_audit()
        await self._events.close()


def _result_of(outcome: object, output_model: type[BaseModel]) -> tuple[str, dict[str, Any]]:
    """The run's outcome and output as its result records them. Anything but `Completed` or
    `Rejected` with the declared output model used to fail every workflow task of the run (it
    stayed `running` with no error anywhere): it fails the run, clearly, instead."""
    if not isinstance(outcome, Completed | Rejected):
        raise ApplicationError(
            f"the pipeline ended with an unknown outcome {outcome!r}"
            " (steps() returns Completed(...) or Rejected(...))",
            type=ErrorType.UNKNOWN_OUTCOME,
            non_retryable=True,
        )
    if not isinstance(outcome.output, output_model):
        raise ApplicationError(
            f"the pipeline's output must be a {output_model.__name__},"
            f" not {type(outcome.output).__name__}",
            type=ErrorType.UNKNOWN_OUTCOME,
            non_retryable=True,
        )
    kind = "completed" if isinstance(outcome, Completed) else "rejected"
    return kind, outcome.output.model_dump(mode="json", exclude_none=True)


def _io_models(cls: type[Any]) -> tuple[type[BaseModel], type[BaseModel]]:
    """The input and output models of `Pipeline[In, Out]` in the class's bases (or inherited
    from a declared parent)."""
    for base in getattr(cls, "__orig_bases__", ()):
        args = get_args(base)
        if len(args) == 2 and all(isinstance(a, type) and issubclass(a, BaseModel) for a in args):
            return args[0], args[1]
    inherited = getattr(cls, "output_model", None)
    if getattr(cls, "declared", False) and inherited is not None:
        return cls.input_model, inherited
    raise TypeError(f"{cls.__qualname__}: subclass Pipeline[InputModel, OutputModel]")


def _check_declaration(
    cls: type[Any],
    name: str,
    stages: tuple[str, ...],
    tools: Sequence[Tool[Any]],
    on_budget_exhausted: str,
) -> None:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_" for c in name):
        raise TypeError(f"{cls.__qualname__}: pipeline name {name!r}: letters, digits, - and _")
    needed = {Stage.TOOL_EXECUTION, Stage.REVIEW} if tools else set()
    if on_budget_exhausted == "approval":
        needed.add(Stage.REVIEW)
    missing = sorted(needed - set(stages))
    if missing:
        raise TypeError(f"{cls.__qualname__}: declare stages {missing} (tools and approvals)")


def _respond_tool(output: type[BaseModel]) -> dict[str, Any]:
    return {
        "name": _RESPOND,
        "description": f"Give your answer as {output.__name__}.",
        "input_schema": output.model_json_schema(),
    }


def _parse(reply: ModelReply, output: type[ParsedT]) -> tuple[ParsedT | None, str]:
    answer = next((b for b in reply.tool_uses if b.get("name") == _RESPOND), None)
    if answer is None:
        return None, "no structured answer"
    try:
        return output.model_validate(answer.get("input") or {}), ""
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "answer"
        return None, f"{where}: {first['msg']}"[:500]


def _failure(exc: ActivityError | ApplicationError) -> ApplicationError:
    """The workflow's own failure: the cause's type and message, never retried as a whole."""
    cause = exc.cause if isinstance(exc, ActivityError) else exc
    if isinstance(cause, ApplicationError):
        return ApplicationError(cause.message, type=cause.type, non_retryable=True)
    return ApplicationError(str(exc), type="Error", non_retryable=True)


def _attempt_of(exc: BaseException) -> int:
    """The attempt an activity failed on: gateway errors carry it in their details."""
    cause = exc.cause if isinstance(exc, ActivityError) else None
    if isinstance(cause, ApplicationError) and cause.details:
        detail = cause.details[0]
        if isinstance(detail, dict) and isinstance(detail.get("attempt"), int):
            return int(detail["attempt"])
    return 0


def _error_type(exc: ActivityError) -> str | None:
    return exc.cause.type if isinstance(exc.cause, ApplicationError) else None


def _error_detail(exc: ActivityError) -> dict[str, Any]:
    cause = exc.cause
    if isinstance(cause, ApplicationError) and cause.details and isinstance(cause.details[0], dict):
        return dict(cause.details[0])
    return {}


def _message(exc: ActivityError) -> str:
    return exc.cause.message if isinstance(exc.cause, ApplicationError) else str(exc)
