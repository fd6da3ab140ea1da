"""Layer selection, batch splitting, activation reduction and the hook manager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_interp.batches import split_batch
from lightning_interp.errors import LightningInterpError
from lightning_interp.hooks import ActivationCapture, HookManager, count_hooks
from lightning_interp.layers import Layer, normalization_layers, select_layers
from lightning_interp.models import DigitsCNN
from lightning_interp.probes import ActivationReducer


class FunctionalMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class SharedReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc2(self.act(self.fc1(x))))


def test_default_selection_is_nonlinearities_plus_input():
    assert [layer.name for layer in select_layers(DigitsCNN())] == [
        "input", "net.relu1", "net.relu2", "net.relu3", "net.relu4"
    ]  # fmt: skip


def test_functional_model_falls_back_to_weight_layers_without_the_output():
    assert [layer.name for layer in select_layers(FunctionalMLP())] == ["input", "fc1", "fc2"]


def test_names_globs_types_and_predicates():
    model = DigitsCNN()
    assert [l.name for l in select_layers(model, "net.conv*")] == ["net.conv1", "net.conv2", "net.conv3"]
    assert [l.name for l in select_layers(model, [nn.Linear])] == ["net.fc1", "net.fc2"]
    assert [l.name for l in select_layers(model, [lambda n, m: n.endswith("relu4"), "input"])] == ["input", "net.relu4"]


def test_unknown_pattern_lists_valid_names():
    with pytest.raises(LightningInterpError, match=r"'encoder\.\*' matches nothing.*net\.relu1"):
        select_layers(DigitsCNN(), ["encoder.*"])


def test_normalization_layers_found():
    assert [l.name for l in normalization_layers(DigitsCNN(norm="layer"))] == [f"net.norm{i}" for i in range(1, 5)]
    assert normalization_layers(DigitsCNN(norm="none")) == []


@pytest.mark.parametrize(
    "batch",
    [
        (torch.zeros(2, 3), torch.tensor([0, 1])),
        [torch.zeros(2, 3), torch.tensor([0, 1]), "extra"],
        {"x": torch.zeros(2, 3), "labels": torch.tensor([0, 1])},
        {"inputs": torch.zeros(2, 3), "target": [0, 1]},
    ],
)
def test_split_batch_formats(batch):
    inputs, targets = split_batch(batch)
    assert inputs.shape == (2, 3) and targets.tolist() == [0, 1]


def test_split_batch_errors_name_batch_adapter():
    with pytest.raises(LightningInterpError, match="batch_adapter"):
        split_batch({"pixels": torch.zeros(2, 3)})
    with pytest.raises(LightningInterpError, match="batch_adapter"):
        split_batch((torch.zeros(2, 3),))
    inputs, targets = split_batch({"pixels": torch.zeros(2), "cls": torch.ones(2)}, lambda b: (b["pixels"], b["cls"]))
    assert targets.tolist() == [1.0, 1.0]


def test_reducer_pools_conv_maps_and_keeps_input_whole():
    reducer = ActivationReducer(pool_size=2, max_features=100)
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    pooled = reducer("conv", x)
    # independent computation: mean of each 2x2 quadrant
    expected = x.reshape(2, 3, 2, 2, 2, 2).mean(dim=(3, 5)).reshape(2, -1)
    assert torch.allclose(pooled, expected)
    assert reducer("input", torch.zeros(5, 1, 8, 8)).shape == (5, 64)


def test_reducer_subset_is_fixed_and_seeded():
    reducer = ActivationReducer(max_features=10, seed=3)
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    a, b = reducer("fc", x), reducer("fc", x)
    assert torch.equal(a, b) and a.shape == (4, 10)
    # the subset is a set of columns of x
    assert all(any(torch.equal(a[:, i], x[:, j]) for j in range(50)) for i in range(10))
    state = torch.random.get_rng_state()
    ActivationReducer(max_features=10, seed=4)("fc", x)
    assert torch.equal(state, torch.random.get_rng_state())


def test_capture_names_each_call_site_of_a_shared_module():
    model = SharedReLU()
    capture = ActivationCapture([Layer("act", model.act)])
    capture.attach()
    capture.active = True
    x = torch.randn(3, 4)
    model(x)
    first = torch.relu(model.fc1(x))
    assert set(capture.activations) == {"act", "act@1"}
    assert torch.allclose(capture.activations["act"], first)
    assert torch.allclose(capture.activations["act@1"], torch.relu(model.fc2(first)))
    capture.detach()
    assert count_hooks(model) == 0


def test_capture_non_tensor_output_is_skipped_with_one_warning():
    class Pair(nn.Module):
        def forward(self, x):
            return {"meta": "text", "value": x}

    class Odd(nn.Module):
        def forward(self, x):
            return "not a tensor"

    model = nn.Sequential(Pair(), nn.Identity())
    capture = ActivationCapture([Layer("0", model[0])])
    capture.attach()
    capture.active = True
    model(torch.ones(2, 2))
    assert torch.equal(capture.activations["0"], torch.ones(2, 2))  # first tensor of the dict
    odd = Odd()
    capture2 = ActivationCapture([Layer("odd", odd)])
    capture2.attach()
    capture2.active = True
    with pytest.warns(UserWarning, match="not a tensor"):
        odd(torch.ones(1))
    odd(torch.ones(1))  # second time: counted, not warned again
    assert capture2.problems.counts["non_tensor_output"] == 2
    capture.detach(), capture2.detach()


def test_hook_manager_context_removes_on_exception():
    model = nn.Linear(2, 2)
    with pytest.raises(RuntimeError):
        with HookManager() as hooks:
            hooks.forward(model, lambda *a: None)
            hooks.forward_pre(model, lambda *a: None)
            assert count_hooks(model) == 2
            raise RuntimeError("boom")
    assert count_hooks(model) == 0
