"""What an approval's proposal shows to whom, in the inbox and in run views.

The tenant's redaction (policies/redaction.yaml plus its own fields) applies as in the audit
views:

- Drop rules (secrets, card numbers, credential fields) apply for everyone: nobody, approver
  or admin, reads a secret through the API.
- Masked fields and text (customer content, emails) read "[masked]", except to a viewer who
  holds `audit:read_sensitive`, and to the approval's own deciders: a principal its policy
  names, or one holding a role it is waiting for. A decider sees every field of the proposal,
  because the proposal is exactly what the decision applies to: the summary to publish, the
  email's recipient, subject and body, the refund's customer, amount, currency and reason, a
  tool call's arguments, a budget's amounts. Approving what one may not read is not a review.

Only the view changes. The workflow and the approvals table keep the proposal as proposed,
and a decision (with or without edits) applies to that.
"""

from __future__ import annotations

from dataclasses import dataclass

from stead.policy.redaction import Redactor, tenant_redactor
from stead.service.access import Services
from stead.service.schemas import ApprovalOut
from stead.store import redaction
from stead.store.db import Conn
from stead.store.principals import Principal


@dataclass(frozen=True)
class ProposalViewer:
    redactor: Redactor
    principal: Principal
    sensitive: bool

    def decides(self, approval: ApprovalOut) -> bool:
        return self.principal.id in approval.eligible_principals or self.principal.has_role(
            *approval.eligible_roles
        )

    def show(self, approval: ApprovalOut) -> ApprovalOut:
        reveal = self.sensitive or self.decides(approval)
        return approval.model_copy(
            update={
                "title": self.redactor.drop_text(approval.title),
                "proposal": self.redactor.view(approval.proposal, reveal_masked=reveal),
            }
        )


async def proposal_viewer(svc: Services, conn: Conn, principal: Principal) -> ProposalViewer:
    """The viewer for this caller, with the tenant's redaction as it stands now."""
    own = await redaction.load(conn, principal.tenant)
    return ProposalViewer(
        redactor=tenant_redactor(svc.audit.policy, own.drop, own.mask),
        principal=principal,
        sensitive=svc.permissions.has_right(principal.roles, "audit:read_sensitive"),
    )
