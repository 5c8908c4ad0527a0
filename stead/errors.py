"""Error types that cross the activity/workflow boundary, by name.

Activities raise `ApplicationError(type=...)` with these names; retry policies list the
non-retryable ones; the API maps them to HTTP statuses. One enum keeps the three in step.
"""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum
from typing import Any

from temporalio.exceptions import ApplicationError


class ErrorType(StrEnum):
    BAD_REQUEST = "BadRequest"  # the provider refused the request itself (400, 404, 413, 422)
    AUTHENTICATION = "AuthenticationFailed"  # 401/403 from a provider: retrying cannot help
    PERMISSION_DENIED = "PermissionDenied"
    BUDGET_EXHAUSTED = "BudgetExhausted"
    # No room only beside calls in flight, for longer than the gateway waits: retried.
    BUDGET_BUSY = "BudgetBusy"
    PROVIDER_UNAVAILABLE = "ProviderUnavailable"  # 429/529/5xx/timeout on every route model
    TOOL_FAILED = "ToolFailed"
    INTEGRATION_MISSING = "IntegrationNotConfigured"
    INVALID_INPUT = "InvalidInput"
    # Update-validator rejections (never written to history).
    APPROVAL_NOT_FOUND = "ApprovalNotFound"
    APPROVAL_NOT_PENDING = "ApprovalNotPending"
    ALREADY_DECIDED = "AlreadyDecided"
    SELF_APPROVAL = "SelfApproval"
    NOT_ELIGIBLE = "NotEligible"
    INVALID_EDITS = "InvalidEdits"
    NOT_ATTESTED = "NotAttested"  # a decision or cancel that did not come through the API
    RUN_NOT_RUNNING = "RunNotRunning"
    UNKNOWN_OUTCOME = "UnknownOutcome"  # a pipeline ended in a way the platform cannot record
    UNDECLARED_STAGE = "UndeclaredStage"  # a step the pipeline's declaration does not allow
    STRUCTURED_OUTPUT_INVALID = "StructuredOutputInvalid"  # twice an answer off its schema
    # A long conversation's stored messages are gone or altered (stead.store.conversations).
    CONVERSATION_MISSING = "ConversationMissing"
    # ... sealed under a payload key this worker lacks: retried (another worker, or a fix).
    CONVERSATION_UNREADABLE = "ConversationUnreadable"


NON_RETRYABLE = (
    ErrorType.BAD_REQUEST,
    ErrorType.AUTHENTICATION,
    ErrorType.PERMISSION_DENIED,
    ErrorType.BUDGET_EXHAUSTED,
    ErrorType.INVALID_INPUT,
    ErrorType.INTEGRATION_MISSING,
    ErrorType.CONVERSATION_MISSING,
)


def failure(
    kind: ErrorType, message: str, *details: Any, next_retry_delay: timedelta | None = None
) -> ApplicationError:
    """The error an activity raises: non-retryable exactly when its kind is. Retry policies
    need not list these types (each listing costs every scheduled step history bytes)."""
    return ApplicationError(
        message,
        *details,
        type=kind,
        non_retryable=kind in NON_RETRYABLE,
        next_retry_delay=next_retry_delay,
    )
