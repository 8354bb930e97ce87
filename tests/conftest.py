"""Fixtures shared by every test: a tiny demo model built once per session on the shipped corpus."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_demo_model(tmp_path_factory: pytest.TempPathFactory):
    """A real, tiny Llama-style model that has memorised the shipped records (built in seconds)."""
    from worker.demo_model import build_demo_model

    out: Path = tmp_path_factory.mktemp("tiny-demo-model")
    return build_demo_model(out, size="tiny", seed=0)
