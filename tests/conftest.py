"""Fixtures shared by every test: a tiny demo model built once per session on the shipped corpus."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """Tiny models gain nothing from more threads, and on a busy 2-core machine extra threads crawl."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_demo_model(tmp_path_factory: pytest.TempPathFactory):
    """A real, tiny Llama-style model that has memorised the shipped records (built in seconds)."""
    from worker.demo_model import build_demo_model

    out: Path = tmp_path_factory.mktemp("tiny-demo-model")
    return build_demo_model(out, size="tiny", seed=0)
