"""Stead test suite: real Temporal, PostgreSQL and simulator; see conftest.py."""
