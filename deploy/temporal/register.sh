#!/bin/sh
# One-shot in temporalio/admin-tools, once the frontend answers: make the namespace Stead uses
# and register Stead's search attributes on it. Safe to re-run: each step first looks for what
# it would create.
#
# The attribute list mirrors SEARCH_ATTRIBUTES in workflows/search.py; tests/test_deploy.py
# fails when the two drift. Without them, every workflow task that upserts one fails.
set -eu

: "${TEMPORAL_ADDRESS:?}"
ns="${TEMPORAL_NAMESPACE:-default}"

# A new namespace takes a few seconds to reach every frontend cache, so each step retries
# for up to a minute instead of failing the whole stack on the first "not found".
retry() {
  n=0
  until "$@"; do
    n=$((n + 1))
    if [ "$n" -ge 30 ]; then
      echo "gave up after $n tries: $*" >&2
      return 1
    fi
    sleep 2
  done
}

retry temporal operator cluster health > /dev/null

if ! temporal operator namespace describe --namespace "$ns" > /dev/null 2>&1; then
  temporal operator namespace create --namespace "$ns" --retention 720h
fi

for spec in \
  Stage:Keyword \
  Pipeline:Keyword \
  CustomerId:Keyword \
  RequestedBy:Keyword \
  PendingApproval:Bool \
  ApprovalRoles:KeywordList \
  ErrorType:Keyword \
  CostUsd:Double; do
  name="${spec%%:*}"
  kind="${spec#*:}"
  if retry temporal operator search-attribute list --namespace "$ns" | grep -qw "$name"; then
    continue
  fi
  retry temporal operator search-attribute create --namespace "$ns" --name "$name" --type "$kind"
done
echo "namespace $ns has Stead's search attributes"
