"""in_inference_mode: the mode is on inside the call whether or not the caller was in it, and a
caller's own mode is left as it was."""

import torch

from balcony_runtime.inference_mode import in_inference_mode


@in_inference_mode
def _made_inside(x: torch.Tensor) -> tuple[bool, torch.Tensor]:
    return torch.is_inference_mode_enabled(), x * 2


def test_enters_the_mode_for_a_caller_outside_it_and_leaves_it_after():
    assert not torch.is_inference_mode_enabled()
    enabled, y = _made_inside(torch.ones(3))
    assert enabled and y.is_inference()
    assert not torch.is_inference_mode_enabled()


def test_a_caller_already_in_the_mode_stays_in_it():
    with torch.inference_mode():
        enabled, y = _made_inside(torch.ones(3))
        assert enabled and y.is_inference()
        assert torch.is_inference_mode_enabled()
    assert not torch.is_inference_mode_enabled()


def test_keeps_the_function_name_and_returns_its_value():
    assert _made_inside.__name__ == "_made_inside"
    assert _made_inside(torch.tensor([1.5]))[1].item() == 3.0


def test_the_mode_is_left_when_the_call_raises():
    @in_inference_mode
    def fails():
        raise ValueError("bad")

    try:
        fails()
    except ValueError:
        pass
    assert not torch.is_inference_mode_enabled()
