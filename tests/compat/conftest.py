import os

import pytest

BASE = os.environ.get("DS4_BASE", "http://127.0.0.1:8000")
KEY = os.environ.get("DS4_KEY", "compat-key")


@pytest.fixture(scope="session")
def base():
    return BASE


@pytest.fixture(scope="session")
def key():
    return KEY
