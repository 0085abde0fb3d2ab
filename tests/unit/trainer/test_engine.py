"""The DeepSpeed config derived from steerflow's knobs."""
import pytest
import torch

from trainer.config import DeepSpeedConfig
from trainer.engine import deepspeed_config


def test_batch_sizes_and_precision_follow_the_model():
    cfg = deepspeed_config(DeepSpeedConfig(zero_stage=2), micro_batch=4, grad_accum=10, world_size=8, max_grad_norm=1.0,
                           model_dtype=torch.bfloat16)
    assert cfg["train_batch_size"] == 4 * 10 * 8 and cfg["gradient_accumulation_steps"] == 10
    assert cfg["bf16"]["enabled"] and cfg["zero_optimization"]["stage"] == 2 and cfg["gradient_clipping"] == 1.0
    fp32 = deepspeed_config(DeepSpeedConfig(), 4, 1, 1, 1.0, torch.float32)
    assert not fp32["bf16"]["enabled"]


def test_precision_that_contradicts_the_model_dtype_is_an_error_naming_both_keys():
    with pytest.raises(ValueError, match="deepspeed.precision='bf16'.*model.dtype"):
        deepspeed_config(DeepSpeedConfig(precision="bf16"), 4, 1, 1, 1.0, torch.float32)
