"""Masked modules, sparsify, torch.nn.utils.prune round trips, torch.compile."""
import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import fastmask
from fastmask import masks
from fastmask.nn import MaskedConv2d, MaskedLinear
from helpers import assert_close


def small_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, bias=False),
                         nn.Flatten(), nn.Linear(4 * 2 * 2, 3))


def test_sparsify_keeps_parameters_and_function():
    net = small_net()
    x = torch.randn(2, 3, 5, 5)
    before = net(x)
    params = list(net.parameters())
    fastmask.sparsify(net)
    assert isinstance(net[0], MaskedConv2d) and isinstance(net[4], MaskedLinear)
    assert all(a is b for a, b in zip(params, net.parameters()))
    assert_close(net(x), before.double())
    assert set(masks.of(net)) == {"0.weight", "2.weight", "4.weight"}


def test_mask_is_saved_in_state_dict_and_zeroes_weights():
    net = fastmask.sparsify(small_net())
    mask = torch.rand_like(net[0].weight) > 0.5
    net[0].set_mask(mask)
    assert (net[0].weight[~mask] == 0).all()
    state = net.state_dict()
    assert torch.equal(state["0.mask"], mask)
    other = fastmask.sparsify(small_net())
    other.load_state_dict(state)
    assert torch.equal(other[0].mask, mask)
    assert masks.density(net) < 1.0


def test_masked_module_gradient_is_zero_at_pruned_weights():
    conv = MaskedConv2d(3, 5, 3, padding=1)
    conv.set_mask(torch.rand_like(conv.weight) > 0.5)
    conv(torch.randn(2, 3, 6, 6)).sum().backward()
    assert (conv.weight.grad[~conv.mask] == 0).all()


def test_masks_move_between_fastmask_and_torch_prune():
    net = small_net()
    torch_prune.global_unstructured([(net[0], "weight"), (net[4], "weight")], torch_prune.L1Unstructured, amount=0.5)
    x = torch.randn(2, 3, 5, 5)
    expected = net(x)
    kept = net[0].weight_mask.bool().clone()
    fastmask.sparsify(net)
    assert torch.equal(net[0].mask, kept)
    assert_close(net(x), expected.double())
    fastmask.nn.to_torch_prune(net)
    assert type(net[0]) is nn.Conv2d and torch.equal(net[0].weight_mask.bool(), kept)
    assert_close(net(x), expected.double())


def test_set_masks_rejects_unknown_names_and_bad_masks():
    net = fastmask.sparsify(small_net())
    with pytest.raises(ValueError, match="not masked modules"):
        masks.apply(net, {"9.weight": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="mask has shape"):
        net[0].set_mask(torch.ones(3, dtype=torch.bool))


def test_padding_modes_other_than_zeros():
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
    x = torch.randn(1, 2, 5, 5)
    expected = conv(x)
    fastmask.sparsify(conv)
    assert_close(conv(x), expected.double())


def test_torch_compile_fullgraph_agrees_with_eager(triton_backend):
    torch.manual_seed(0)
    net = fastmask.sparsify(small_net())
    for module in (net[0], net[2], net[4]):
        module.set_mask(torch.rand_like(module.weight) > 0.5)
    x = torch.randn(2, 3, 5, 5)
    compiled = torch.compile(net, fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    eager = net(x)
    eager.square().sum().backward()
    assert_close(y, eager.double())
    for got, want in zip(grads, (p.grad for p in net.parameters())):
        assert_close(got, want.double(), what="compiled gradient")
