"""Fixtures shared by the backend tests."""

from __future__ import annotations

import os

import pytest

from server.engine.catalogue import Catalogue

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def catalogue(model_cache) -> Catalogue:
    """The catalogue over the session's model cache, where the tiny model is already built."""
    return Catalogue(model_cache)
