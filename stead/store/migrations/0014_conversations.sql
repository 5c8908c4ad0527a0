-- Agent conversations, each message stored once per run (stead/store/conversations.py).
-- A row is one message of a workflow's conversation, linked to the message before it:
-- `row_key` is the message's link (a hash chaining it onto everything before it; an HMAC of
-- that hash when payload keys are set), `parent` the previous message's row key, `depth` its
-- place (1 for a first message). `data` is the message's JSON, sealed when payload keys are
-- set. `stead payloads gc` deletes a workflow's rows once none of its histories is replayable.
CREATE TABLE conversation_messages (
    workflow_id text NOT NULL,
    row_key     bytea NOT NULL,
    parent      bytea,
    depth       integer NOT NULL CHECK (depth > 0),
    data        bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, row_key),
    CHECK ((depth = 1) = (parent IS NULL))
);
CREATE INDEX conversation_messages_age ON conversation_messages (created_at);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'stead_app') THEN
        GRANT SELECT, INSERT, DELETE ON conversation_messages TO stead_app;
    END IF;
END
$$;
