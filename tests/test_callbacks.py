"""Callbacks of minigpt.callbacks whose checks run before training (the rest run in tests/test_train.py)."""

from types import SimpleNamespace

import pytest

from minigpt.callbacks import SampleText
from minigpt.tokenizer import load_tokenizer


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": ""}, "prompt must be a non-empty string"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_k": 0}, "top_k must be None or an integer >= 1"),
    ],
)
def test_sample_text_refuses_bad_settings_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SampleText(**kwargs)


def test_sample_text_refuses_a_prompt_that_fills_the_context_before_training():
    tokenizer = load_tokenizer("byte")
    trainer = SimpleNamespace(datamodule=SimpleNamespace(tokenizer=tokenizer, setup=lambda: None))
    module = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(block_size=8)))
    SampleText(prompt="ROMEO:").on_fit_start(trainer, module)  # 6 tokens: room for 2
    with pytest.raises(ValueError, match="the prompt is 8 tokens"):
        SampleText(prompt="ROMEO: O").on_fit_start(trainer, module)
