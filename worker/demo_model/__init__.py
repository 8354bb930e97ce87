"""A small Llama-style model, built locally, that has memorised fictitious people's contact records."""

from worker.demo_model.build import DemoModel, build_demo_model

__all__ = ["DemoModel", "build_demo_model"]
