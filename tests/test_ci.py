"""The README's test command is CI's entry point, and it sets up everything the tests need."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_test_command_is_the_ci_entry_point_which_installs_what_the_tests_need() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "```bash\nbash .ci/run\n```" in readme
    assert "apt-get install -y -q chromium" in ci  # the MLflow UI test drives it
    assert 'pytest -q -ra --durations=15 "$@"' in ci
