"""Callbacks of minigpt.callbacks on their own (in training runs: tests/test_train.py)."""

import time
from types import SimpleNamespace

import pytest
import torch

from minigpt.callbacks import SampleText, StartupTimer
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


def test_startup_timer_logs_once_at_the_end_of_the_first_optimizer_step(caplog):
    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, metrics)))
    trainer = SimpleNamespace(loggers=[logger], global_step=0)
    module = SimpleNamespace(device=torch.device("cpu"))
    timer = StartupTimer()
    timer.on_fit_start(trainer, module)
    timer.on_train_start(trainer, module)
    timer.on_sanity_check_start(trainer, module)
    time.sleep(0.05)
    timer.on_sanity_check_end(trainer, module)
    timer.on_train_batch_end(trainer, module, None, None, 0)  # a micro-batch: no optimizer step yet
    assert logged == []
    for step in (1, 2):
        trainer.global_step = step
        timer.on_train_batch_end(trainer, module, None, None, step)
    assert [step for step, _ in logged] == [0], "once, at the first step's row"
    metrics = logged[0][1]
    assert metrics.keys() == {"time/fit_start_s", "time/sanity_check_s", "time/first_step_s"}
    assert 0.05 <= metrics["time/sanity_check_s"] < 5
    assert 0 < metrics["time/fit_start_s"] < metrics["time/first_step_s"]
    assert sum("first step done" in r.getMessage() for r in caplog.records) == 1


def test_startup_timer_on_a_resumed_run_waits_for_its_first_optimizer_step():
    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append(step))
    trainer = SimpleNamespace(loggers=[logger], global_step=50)  # resumed at step 50
    module = SimpleNamespace(device=torch.device("cpu"))
    timer = StartupTimer()
    timer.on_fit_start(trainer, module)
    timer.on_train_start(trainer, module)
    timer.on_train_batch_end(trainer, module, None, None, 0)  # a micro-batch of step 51's gradient
    assert logged == []
    trainer.global_step = 51
    timer.on_train_batch_end(trainer, module, None, None, 1)
    assert logged == [50]
