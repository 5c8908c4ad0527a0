-- Documents for retrieval (the doc-qa pipeline): the uploaded source, its chunks and their
-- full-text index. Every table is keyed by tenant first: a query without the tenant in its
-- WHERE clause cannot use the keys, and every query in store/documents.py has it.

CREATE TABLE documents (
    tenant_id      text NOT NULL REFERENCES tenants (id),
    id             text NOT NULL,
    title          text NOT NULL,
    content_sha256 bytea NOT NULL,
    status         text NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'indexing', 'ready', 'failed')),
    chunk_count    integer NOT NULL DEFAULT 0,
    -- The ingest run that indexes it.
    run_id         text NOT NULL,
    created_by     text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX documents_listing ON documents (tenant_id, created_at DESC);

-- The uploaded text, kept apart from `documents` so listings never read it. The ingest
-- workflow receives only the document id: the text never enters Temporal history.
CREATE TABLE document_sources (
    tenant_id   text NOT NULL,
    document_id text NOT NULL,
    text        text NOT NULL,
    PRIMARY KEY (tenant_id, document_id),
    FOREIGN KEY (tenant_id, document_id) REFERENCES documents (tenant_id, id) ON DELETE CASCADE
);

-- Passages of a document. The key makes chunk writes idempotent (ON CONFLICT DO NOTHING), so
-- a retried or re-run ingest step stores nothing twice.
CREATE TABLE document_chunks (
    tenant_id   text NOT NULL,
    document_id text NOT NULL,
    chunk_no    integer NOT NULL CHECK (chunk_no >= 0),
    text        text NOT NULL,
    tsv         tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED,
    PRIMARY KEY (tenant_id, document_id, chunk_no),
    FOREIGN KEY (tenant_id, document_id) REFERENCES documents (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX document_chunks_tsv ON document_chunks USING gin (tsv);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'stead_app') THEN
        GRANT SELECT, INSERT, UPDATE ON documents TO stead_app;
        GRANT SELECT, INSERT ON document_sources, document_chunks TO stead_app;
    END IF;
END
$$;
