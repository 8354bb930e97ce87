"""Fixtures shared by every test: a tiny demo model built once per session on the shipped corpus."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` are skipped where no GPU is present."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


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
