-- Webhooks: endpoints a tenant registers, the events they receive, each delivery and attempt.
--
-- Events come from the audit log. A trigger on audit_log turns each entry of a subscribed
-- action into one event and one delivery per subscribed, enabled endpoint, in the transaction
-- that appends the entry: whichever activity or API process writes it, and however often a
-- retried write repeats (audit entries are keyed, so a repeat inserts no row and fires
-- nothing), every run event is enqueued exactly once, or not at all if the write rolls back.
-- A worker that dies mid-flush leaves neither the entry nor its deliveries.
--
-- Workers' dispatchers LISTEN on `stead_webhooks` and start one Temporal workflow per delivery
-- (workflow id `<tenant>:<delivery id>`, so a second start of the same delivery is refused);
-- a delivery not yet marked dispatched is started again after a crash, harmlessly.

CREATE TABLE webhook_endpoints (
    tenant_id           text NOT NULL REFERENCES tenants (id),
    id                  text NOT NULL,
    url                 text NOT NULL,
    description         text NOT NULL DEFAULT '',
    event_types         text[] NOT NULL,
    -- The signing secret, AES-GCM sealed with the payload keys (associated data: tenant and
    -- endpoint). After a rotation the previous one signs too, until it expires.
    secret              bytea NOT NULL,
    previous_secret     bytea,
    previous_expires_at timestamptz,
    enabled             boolean NOT NULL DEFAULT true,
    disabled_reason     text,
    disabled_at         timestamptz,
    -- The first failed attempt since the last success: an endpoint failing for a whole retry
    -- schedule, with no success meanwhile, is disabled.
    failing_since       timestamptz,
    last_success_at     timestamptz,
    created_by          text NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);

-- `audit_seq` names the entry the event came from. Not a foreign key: only the trigger below
-- writes events, from the entry being inserted, and a key would make audit_log a referenced
-- table (its append-only trigger must be what refuses a TRUNCATE, and retention must not
-- depend on the webhook tables).
CREATE TABLE webhook_events (
    tenant_id  text NOT NULL,
    id         text NOT NULL,
    audit_seq  bigint NOT NULL,
    type       text NOT NULL,
    run_id     text,
    at         timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, audit_seq)
);

CREATE TABLE webhook_deliveries (
    tenant_id      text NOT NULL,
    id             text NOT NULL,
    endpoint_id    text NOT NULL,
    event_id       text NOT NULL,
    -- A re-delivery repeats an earlier delivery of the same event (same webhook-id).
    redelivery_of  text,
    requested_by   text,
    status         text NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'succeeded', 'failed', 'skipped')),
    attempts       integer NOT NULL DEFAULT 0,
    last_status    integer,
    last_error     text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    dispatched_at  timestamptz,
    first_attempt_at timestamptz,
    last_attempt_at timestamptz,
    finished_at    timestamptz,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, endpoint_id) REFERENCES webhook_endpoints (tenant_id, id)
        ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, event_id) REFERENCES webhook_events (tenant_id, id)
);
-- One first delivery per event and endpoint, whatever inserts it.
CREATE UNIQUE INDEX webhook_deliveries_once ON webhook_deliveries (tenant_id, event_id, endpoint_id)
    WHERE redelivery_of IS NULL;
CREATE INDEX webhook_deliveries_undispatched ON webhook_deliveries (created_at)
    WHERE dispatched_at IS NULL;
CREATE INDEX webhook_deliveries_log ON webhook_deliveries (tenant_id, endpoint_id, created_at, id);

CREATE TABLE webhook_attempts (
    tenant_id    text NOT NULL,
    delivery_id  text NOT NULL,
    attempt      integer NOT NULL,
    at           timestamptz NOT NULL,
    status_code  integer,
    error        text,
    duration_ms  integer NOT NULL,
    -- The start of the receiver's answer (capped), for the delivery log.
    response     text NOT NULL DEFAULT '',
    PRIMARY KEY (tenant_id, delivery_id, attempt),
    FOREIGN KEY (tenant_id, delivery_id) REFERENCES webhook_deliveries (tenant_id, id)
        ON DELETE CASCADE
);

CREATE FUNCTION webhook_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_event text := 'evt_' || replace(gen_random_uuid()::text, '-', '');
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM webhook_endpoints
        WHERE tenant_id = NEW.tenant_id AND enabled AND NEW.action = ANY (event_types)
    ) THEN
        RETURN NULL;
    END IF;
    INSERT INTO webhook_events (tenant_id, id, audit_seq, type, run_id, at)
    VALUES (NEW.tenant_id, v_event, NEW.seq, NEW.action, NEW.run_id, NEW.at);
    INSERT INTO webhook_deliveries (tenant_id, id, endpoint_id, event_id)
    SELECT NEW.tenant_id, 'whd_' || replace(gen_random_uuid()::text, '-', ''), e.id, v_event
    FROM webhook_endpoints AS e
    WHERE e.tenant_id = NEW.tenant_id AND e.enabled AND NEW.action = ANY (e.event_types);
    RETURN NULL;
END
$$;
CREATE TRIGGER audit_log_webhooks AFTER INSERT ON audit_log FOR EACH ROW
    WHEN (NEW.action IN ('run.completed', 'run.failed', 'approval.requested', 'approval.decided'))
    EXECUTE FUNCTION webhook_enqueue();

-- Wake the dispatchers when the transaction commits (NOTIFY is transactional, and repeated
-- notifications of one transaction are delivered once).
CREATE FUNCTION webhook_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('stead_webhooks', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER webhook_deliveries_notify AFTER INSERT ON webhook_deliveries
    FOR EACH STATEMENT EXECUTE FUNCTION webhook_notify();

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'stead_app') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON webhook_endpoints TO stead_app;
        GRANT SELECT, INSERT ON webhook_events TO stead_app;
        GRANT SELECT, INSERT, UPDATE ON webhook_deliveries, webhook_attempts TO stead_app;
    END IF;
END
$$;
