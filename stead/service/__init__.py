"""The operations behind every front: the HTTP API, the reviewers' pages, schedules.

Each operation takes the `Services` and the acting `Principal`, checks the caller's rights and
limits itself, and raises a `stead.service.errors.ServiceError` with a reason when it refuses,
so no front can show or do what another would refuse.
"""
