"""The test harness itself: poisoned allocations, and device contexts that still see torch.empty."""
import torch


def test_floating_allocations_are_nan_poisoned():
    assert torch.isnan(torch.empty(4, 3)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(2, dtype=torch.float16))).all()
    assert torch.empty(3, dtype=torch.int64).dtype == torch.int64  # integers are left alone


def test_meta_device_context_reaches_the_real_factories():
    with torch.device("meta"):
        assert torch.empty(1000, 1000).device.type == "meta"
        assert torch.nn.Linear(4096, 4096).weight.device.type == "meta"
