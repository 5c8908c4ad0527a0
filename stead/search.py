"""Stead's custom search attributes: the run facts operators filter on.

`temporal workflow list --query 'Stage="review" AND CustomerId="acme"'` and the Web UI's filters
read these. `stead dev` and the test fixtures register exactly `SEARCH_ATTRIBUTES`; a cluster
you bring registers them with `temporal operator search-attribute create` (see the README).
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

STAGE = SearchAttributeKey.for_keyword("Stage")
PIPELINE = SearchAttributeKey.for_keyword("Pipeline")
CUSTOMER = SearchAttributeKey.for_keyword("CustomerId")
REQUESTED_BY = SearchAttributeKey.for_keyword("RequestedBy")
PENDING_APPROVAL = SearchAttributeKey.for_bool("PendingApproval")
# Roles that may decide a pending approval right now (after escalation, the wider set).
APPROVAL_ROLES = SearchAttributeKey.for_keyword_list("ApprovalRoles")
ERROR_TYPE = SearchAttributeKey.for_keyword("ErrorType")
COST_USD = SearchAttributeKey.for_float("CostUsd")
# Temporal's own: set on a run whose workflow tasks keep failing (Stead calls it stuck).
REPORTED_PROBLEMS = "TemporalReportedProblems"

SEARCH_ATTRIBUTES: dict[str, str] = {
    "Stage": "Keyword",
    "Pipeline": "Keyword",
    "CustomerId": "Keyword",
    "RequestedBy": "Keyword",
    "PendingApproval": "Bool",
    "ApprovalRoles": "KeywordList",
    "ErrorType": "Keyword",
    "CostUsd": "Double",
}

KEYS = (
    STAGE,
    PIPELINE,
    CUSTOMER,
    REQUESTED_BY,
    PENDING_APPROVAL,
    APPROVAL_ROLES,
    ERROR_TYPE,
    COST_USD,
)
