"""The `requires` mark (tests/conftest.py): a missing module or executable skips a test on a developer's
machine and fails it in CI (CI=true), so CI never passes by skipping the joint-data or multi-process tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def test_a_missing_piece_skips_here_and_fails_in_ci(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "@pytest.mark.requires(module='no_such_module_here', hint='pip install it')\n"
        "def test_module():\n    pass\n"
        "@pytest.mark.requires(executable='no-such-executable-here')\n"
        "def test_executable():\n    pass\n"
        "@pytest.mark.requires(module='json', executable='sh')\n"
        "def test_present():\n    pass\n")

    def run(ci: str | None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci else {})
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    here = run(None)
    assert here.returncode == 0 and "1 passed, 2 skipped" in here.stdout, here.stdout
    assert "module no_such_module_here missing: pip install it" in here.stdout
    ci = run("true")
    assert ci.returncode == 1 and "1 passed, 2 errors" in ci.stdout, ci.stdout
    assert "CI=true: a missing piece fails instead of skipping" in ci.stdout
