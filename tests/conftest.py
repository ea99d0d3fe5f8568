"""
pytest only: run each test in its own temporary directory, as trial runs
tests inside _trial_temp, so that TestCase.mktemp() never writes into the
repository.
"""

import pytest


@pytest.fixture(autouse=True)
def _inside_a_temporary_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
