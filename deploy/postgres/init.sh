#!/bin/sh
# Runs once, when the postgres container initialises an empty data volume (the image's
# /docker-entrypoint-initdb.d hook); later starts skip it, so it never touches existing data.
#
# One server, two owners that cannot read each other's data:
#   temporal  owns `temporal` and `temporal_visibility`; temporal-schema fills them.
#   stead     owns `stead` and may create roles, because `stead migrate` creates `stead_app`,
#             the role the API and workers log in as (read and append only on the audit log,
#             no way to switch to another role), and sets its password from DATABASE_URL.
# Passwords arrive as psql variables, so they are quoted by psql, never pasted into SQL text.
set -eu

: "${TEMPORAL_DB_PASSWORD:?}" "${STEAD_DB_PASSWORD:?}"

psql --no-psqlrc -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v temporal_pw="$TEMPORAL_DB_PASSWORD" -v stead_pw="$STEAD_DB_PASSWORD" <<'SQL'
CREATE ROLE temporal LOGIN PASSWORD :'temporal_pw';
CREATE DATABASE temporal OWNER temporal;
CREATE DATABASE temporal_visibility OWNER temporal;
CREATE ROLE stead LOGIN CREATEROLE PASSWORD :'stead_pw';
CREATE DATABASE stead OWNER stead;
SQL
