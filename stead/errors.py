"""Error types that cross the activity/workflow boundary, by name.

Activities raise `ApplicationError(type=...)` with these names; retry policies list the
non-retryable ones; the API maps them to HTTP statuses. One enum keeps the three in step.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorType(StrEnum):
    BAD_REQUEST = "BadRequest"  # the provider refused the request itself (400, 404, 413, 422)
    AUTHENTICATION = "AuthenticationFailed"  # 401/403 from a provider: retrying cannot help
    PERMISSION_DENIED = "PermissionDenied"
    BUDGET_EXHAUSTED = "BudgetExhausted"
    PROVIDER_UNAVAILABLE = "ProviderUnavailable"  # 429/529/5xx/timeout on every route model
    TOOL_FAILED = "ToolFailed"
    INVALID_INPUT = "InvalidInput"
    # Update-validator rejections (never written to history).
    APPROVAL_NOT_FOUND = "ApprovalNotFound"
    APPROVAL_NOT_PENDING = "ApprovalNotPending"
    ALREADY_DECIDED = "AlreadyDecided"
    SELF_APPROVAL = "SelfApproval"
    NOT_ELIGIBLE = "NotEligible"
    INVALID_EDITS = "InvalidEdits"


NON_RETRYABLE = (
    ErrorType.BAD_REQUEST,
    ErrorType.AUTHENTICATION,
    ErrorType.PERMISSION_DENIED,
    ErrorType.BUDGET_EXHAUSTED,
    ErrorType.INVALID_INPUT,
)
