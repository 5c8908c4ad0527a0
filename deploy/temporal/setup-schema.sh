#!/bin/sh
# One-shot in temporalio/admin-tools: create or upgrade Temporal's schema in the two databases
# deploy/postgres/init.sh made. Safe on every `docker compose up`: setup-schema leaves a
# database that already has a version alone, and update-schema applies only the versions it
# lacks, which is also how a newer Temporal image upgrades an existing volume.
#
# Connection settings come from temporal-sql-tool's own variables (SQL_PLUGIN, SQL_HOST,
# SQL_PORT, SQL_USER, SQL_PASSWORD), set by docker-compose.yml, so no password is on a command line.
set -eu

: "${SQL_HOST:?}" "${SQL_USER:?}" "${SQL_PASSWORD:?}"
schemas=/etc/temporal/schema/postgresql/v12

for pair in temporal:temporal visibility:temporal_visibility; do
  kind="${pair%%:*}"
  db="${pair#*:}"
  temporal-sql-tool --db "$db" setup-schema -v 0.0
  temporal-sql-tool --db "$db" update-schema -d "$schemas/$kind/versioned"
done
echo "temporal schema is up to date"
