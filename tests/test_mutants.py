"""`make mutants` itself: the table of targets names files that exist, and the copy of the
project each target runs in holds everything the tests import (a copy that cannot import
tests/conftest.py scores every mutant as a failure to collect, not as a test result)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mutants import ROOT, TARGETS, _copied_paths


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_a_target_names_modules_and_tests_that_exist(name: str) -> None:
    target = TARGETS[name]
    copied = _copied_paths()
    for source in target.sources:
        assert (ROOT / source).is_file(), source
        assert Path(source).parts[0] in copied, source
    test_files = [t for t in target.tests if t.endswith(".py")]
    assert test_files, "a target without test files collects the whole suite"
    for test in test_files:
        assert (ROOT / test).is_file(), test


def test_the_copy_a_target_runs_in_imports_the_tests(tmp_path: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for path in _copied_paths():
        if (ROOT / path).is_dir():
            shutil.copytree(ROOT / path, tmp_path / path, ignore=ignore)
        else:
            shutil.copy2(ROOT / path, tmp_path / path)
    # An installed checkout on sys.path (an editable install's .pth) would quietly provide
    # what the copy lacks: every project module must come from the copy itself.
    roots = sorted(
        p.stem for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()
    )
    probe = (
        "import json, sys, tests.conftest, tests.test_tool_gateway\n"
        f"roots = {roots!r}\n"
        "print(json.dumps({n: getattr(m, '__file__', None) for n, m in sys.modules.items()"
        " if n.partition('.')[0] in roots}))"
    )
    imported = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert imported.returncode == 0, imported.stderr[-2000:]
    files = json.loads(imported.stdout)
    assert {"worker", "activities.support_desk", "stead.gateway.tools"} <= set(files)
    outside = {n: f for n, f in files.items() if f and not Path(f).is_relative_to(tmp_path)}
    assert outside == {}
