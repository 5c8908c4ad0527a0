"""Webhooks: a tenant's backend hears when its runs finish or wait for someone.

Events come from the audit log (a trigger enqueues one per subscribed entry, in the entry's own
transaction: `stead/store/migrations/0011_webhooks.sql`); `dispatch` starts one Temporal
workflow per delivery (`stead.builtin.webhooks`), whose activity (`delivery`) signs the event
with the Standard Webhooks scheme (`signing`), checks where it goes (`urls`) and posts it,
retried with back-off. `payloads` says what each event carries.
"""

EVENT_TYPES = ("run.completed", "run.failed", "approval.requested", "approval.decided")
