"""Heads: the generic MLP against a naive reference, its subclasses' structure, and the DINO head."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ssl_core.heads import MLP, DINOHead, PredictionHead, ProjectionHead


def linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def naive_two_layer(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """Linear -> batch norm (training statistics) -> ReLU -> Linear, written element by element."""
    first, norm, second = mlp.layers[0][0], mlp.layers[0][1], mlp.layers[1][0]
    hidden = torch.zeros(x.shape[0], first.out_features)
    for b in range(x.shape[0]):
        for j in range(first.out_features):
            hidden[b, j] = sum(x[b, i] * first.weight[j, i] for i in range(first.in_features))
    for j in range(first.out_features):
        column = hidden[:, j].clone()
        mean = column.mean()
        variance = ((column - mean) ** 2).mean()
        hidden[:, j] = (column - mean) / torch.sqrt(variance + norm.eps) * norm.weight[j] + norm.bias[j]
    hidden = hidden.clamp(min=0)
    out = torch.zeros(x.shape[0], second.out_features)
    for b in range(x.shape[0]):
        for k in range(second.out_features):
            out[b, k] = second.bias[k] + sum(hidden[b, j] * second.weight[k, j] for j in range(second.in_features))
    return out


def test_mlp_matches_naive_reference() -> None:
    torch.manual_seed(0)
    mlp = MLP(5, 6, 3, 2)
    x = torch.randn(4, 5)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), naive_two_layer(mlp, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_mlp_forward_layers_consistent(num_layers: int) -> None:
    torch.manual_seed(0)
    mlp = MLP(8, 16, 4, num_layers)
    x = torch.randn(6, 8)
    outputs = mlp.forward_layers(x)
    assert len(outputs) == num_layers == len(linears(mlp))
    assert [o.shape[1] for o in outputs] == [16] * (num_layers - 1) + [4]
    torch.testing.assert_close(outputs[-1], mlp(x))
    for hidden in outputs[:-1]:
        assert (hidden >= 0).all()  # after ReLU


def test_mlp_norm_and_bias_placement() -> None:
    mlp = MLP(8, 16, 4, 3)
    assert [type(layer[-1]) for layer in mlp.layers] == [nn.ReLU, nn.ReLU, nn.Linear]
    assert [lin.bias is not None for lin in linears(mlp)] == [False, False, True]  # no bias before a norm
    v2 = MLP(8, 16, 4, 3, last_norm=True)
    assert isinstance(v2.layers[-1][-1], nn.BatchNorm1d) and v2.layers[-1][0].bias is None
    plain = MLP(8, 16, 4, 2, norm_layer=None, activation=nn.GELU, bias=False)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in plain.modules())
    assert isinstance(plain.layers[0][-1], nn.GELU)
    assert all(lin.bias is None for lin in linears(plain))


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"in_dim": 0}, "in_dim"),
        ({"hidden_dim": -1}, "hidden_dim"),
        ({"out_dim": 0}, "out_dim"),
        ({"num_layers": 0}, "num_layers"),
    ],
)
def test_mlp_rejects_bad_sizes(kwargs: dict, argument: str) -> None:
    sizes = {"in_dim": 8, "hidden_dim": 16, "out_dim": 4, "num_layers": 2} | kwargs
    with pytest.raises(ValueError, match=argument):
        MLP(**sizes)
    with pytest.raises(ValueError, match="last_norm"):
        MLP(8, 16, 4, 2, norm_layer=None, last_norm=True)


def test_projection_and_prediction_heads() -> None:
    simclr = ProjectionHead(32)
    assert len(linears(simclr)) == 2 and simclr(torch.randn(4, 32)).shape == (4, 128)
    simclr_v2 = ProjectionHead(32, 64, 16, num_layers=3, last_norm=True)
    assert len(linears(simclr_v2)) == 3 and isinstance(simclr_v2.layers[-1][-1], nn.BatchNorm1d)
    first_layer = simclr_v2.layers[:1]
    assert first_layer(torch.randn(4, 32)).shape == (4, 64)
    byol = PredictionHead(16, 32, 16)
    assert len(linears(byol)) == 2 and byol(torch.randn(4, 16)).shape == (4, 16)
    assert isinstance(byol.layers[0][1], nn.BatchNorm1d) and isinstance(byol.layers[0][2], nn.ReLU)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head(norm_last_layer: bool) -> None:
    torch.manual_seed(0)
    head = DINOHead(16, out_dim=50, hidden_dim=32, bottleneck_dim=8, norm_last_layer=norm_last_layer)
    x = torch.randn(4, 16)
    out = head(x)
    assert out.shape == (4, 50) and torch.isfinite(out).all()
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.modules())
    assert sum(isinstance(m, nn.GELU) for m in head.modules()) == 2
    weight = head.last_layer.weight
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(50))
    magnitude = head.last_layer.parametrizations.weight.original0
    assert magnitude.requires_grad is (not norm_last_layer)
    outputs = head.forward_layers(x)
    assert len(outputs) == 4 and outputs[-2].shape == (4, 8)
    torch.testing.assert_close(outputs[-1], out)
    # unit rows and unit inputs: every logit is a cosine similarity
    assert out.abs().max() <= 1 + 1e-5
    out.sum().backward()
    for name, param in head.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name


def test_dino_head_copies_through_deepcopy_and_state_dict() -> None:
    head = DINOHead(16, out_dim=20, hidden_dim=32, bottleneck_dim=8)
    x = torch.randn(3, 16)
    torch.testing.assert_close(copy.deepcopy(head)(x), head(x))
    fresh = DINOHead(16, out_dim=20, hidden_dim=32, bottleneck_dim=8)
    fresh.load_state_dict(head.state_dict())
    torch.testing.assert_close(fresh(x), head(x))


def test_dino_head_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="out_dim"):
        DINOHead(16, out_dim=0)
    with pytest.raises(ValueError, match="num_layers"):
        DINOHead(16, num_layers=0)
