"""Model settings: validated with the job config, resolved per device; what the CPU path does with them."""

from __future__ import annotations

import pytest
import torch

from worker.engine import ModelSettings, UnlearnConfig, load_causal_lm
from worker.engine.loading import adamw


def test_model_settings_round_trip_in_the_job_config() -> None:
    config = UnlearnConfig.from_dict({"model": {"quantization": "nf4", "gradient_checkpointing": True}})
    assert config.model == ModelSettings(quantization="nf4", gradient_checkpointing=True)
    assert UnlearnConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "bad", [{"quantization": "int3"}, {"precision": "fp16"}, {"gradient_checkpointing": 1}, {"device_map": "balanced"}]
)
def test_invalid_model_settings_are_rejected(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        UnlearnConfig.from_dict({"model": bad})


def test_auto_precision_is_bf16_on_cuda_and_fp32_on_the_cpu_and_nf4_computes_in_bf16() -> None:
    assert ModelSettings().resolved_precision("cuda") == "bf16"
    assert ModelSettings().resolved_precision("cpu") == "fp32"
    assert ModelSettings(quantization="nf4").resolved_precision("cuda") == "bf16"


def test_nf4_on_the_cpu_is_refused_before_loading(tiny_demo_model) -> None:
    with pytest.raises(ValueError, match="needs a CUDA device"):
        load_causal_lm(tiny_demo_model.model_dir, device="cpu", settings=ModelSettings(quantization="nf4"))


def test_cpu_load_uses_sdpa_and_an_unfused_adamw(tiny_demo_model) -> None:
    model, _ = load_causal_lm(tiny_demo_model.model_dir, device="cpu")
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    assert not adamw(model.parameters(), 1e-3).defaults["fused"]
