"""Stead test suite: real Temporal, PostgreSQL and simulator; see conftest.py."""

import pytest

# Fixture modules that test modules load with `pytest_plugins` and also import helpers from:
# registered before any test module imports them, so their asserts are rewritten too.
pytest.register_assert_rewrite("tests.hooks_support")
