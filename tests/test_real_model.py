"""The default model, offline from PyPI: loads, has the expected size, and the engine is exact on it."""

import pytest
import torch

from gradientspace.config import ModelConfig
from gradientspace.data.loading import load_records
from gradientspace.data.tokens import tokenize
from gradientspace.models.loading import load_lora_model

pytestmark = pytest.mark.slow


def test_smollm2_loads_offline_and_per_sample_gradients_are_exact():
    from test_gradients import hooked_gradients, naive_gradients, relative_error

    loaded = load_lora_model(ModelConfig(name="smollm2-135m"), seed=0)
    base_parameters = sum(p.numel() for n, p in loaded.model.named_parameters() if "lora_" not in n)
    assert abs(base_parameters - 134.5e6) < 0.1e6
    with torch.no_grad():
        for name, parameter in loaded.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.01)
    records, _ = load_records("mix4-packaged", per_source=1)
    examples = tokenize(records[:3], loaded.tokenizer, max_length=96)
    naive = naive_gradients(loaded.model, examples, loaded.tokenizer.pad_token_id)
    hooked = hooked_gradients(loaded.model, examples, loaded.tokenizer.pad_token_id, batch_size=3)
    assert naive.shape[1] == 921_600
    assert relative_error(hooked, naive) < 1e-4
