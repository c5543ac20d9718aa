"""The conftest helpers that make a test needing .venv-hf4 / .venv-llama or a test extra fail
(never skip) when it is missing, with a message naming what and how to get it."""

import pytest

from conftest import extra_python, required_module


def test_missing_extra_python_fails_naming_the_make_target(monkeypatch):
    monkeypatch.setenv("ULTRATHINK_HF4_PYTHON", "/no/such/python")
    with pytest.raises(pytest.fail.Exception, match=r"`make test` builds \.venv-hf4 \(or set ULTRATHINK_HF4_PYTHON"):
        extra_python(".venv-hf4", "ULTRATHINK_HF4_PYTHON")


def test_missing_test_extra_fails_naming_the_module():
    with pytest.raises(pytest.fail.Exception, match=r"module no_such_module_xyz is missing .*\[test\]"):
        required_module("no_such_module_xyz")
