"""LayerCapture: per-example weight gradients from the captured inputs and output gradients equal
torch.func's per-example gradients; in-place safety; calls, activity and removal."""

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from skattr.capture import LayerCapture


def _net(inplace=False):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=inplace), nn.Linear(7, 3)).double()


def _per_example_grads(net, X, y):
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p, x, t):
        return nn.functional.cross_entropy(functional_call(net, p, (x[None],)), t[None])

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, X, y)


def _data(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_factors_give_per_example_gradients_with_in_place_activation():
    X, y = _data()
    for inplace in (False, True):
        net = _net(inplace)
        ref = _per_example_grads(net, X, y)
        cap = LayerCapture({"0": net[0], "2": net[2]}, clone_output=True).install()
        cap.begin()
        nn.functional.cross_entropy(net(X), y, reduction="sum").backward()
        calls = cap.end()
        for name in ("0", "2"):
            (c,) = calls[name]
            assert not c.input_modified
            torch.testing.assert_close(torch.einsum("bo,bi->boi", c.grad, c.input), ref[f"{name}.weight"],
                                       rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(c.grad, ref[f"{name}.bias"], rtol=1e-12, atol=1e-14)
        cap.remove()
        assert not net[0]._forward_hooks and not net[2]._forward_hooks


def test_in_place_change_of_an_input_is_reported():
    net = _net()
    X, _ = _data()
    cap = LayerCapture({"2": net[2]}).install()
    cap.begin()
    with torch.no_grad():
        z = net[1](net[0](X))
        net[2](z)
        (before,) = cap.calls["2"]
        assert not before.input_modified
        z.mul_(2.0)  # the saved input of layer "2" changes after the layer read it
    (c,) = cap.end()["2"]
    assert c.input_modified


def test_calls_in_order_only_while_active():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4).double()
    X = torch.randn(3, 4, dtype=torch.float64)
    cap = LayerCapture({"lin": lin}).install().install()  # installing twice hooks once
    assert len(lin._forward_hooks) == 1
    lin(X)  # not active: nothing kept
    cap.begin()
    z1 = lin(X)
    z2 = lin(z1)
    (z2 ** 2).sum().backward()
    calls = cap.end()["lin"]
    assert len(calls) == 2
    torch.testing.assert_close(calls[0].input, X)
    torch.testing.assert_close(calls[1].input, z1.detach())
    torch.testing.assert_close(calls[1].grad, 2 * z2.detach())
    torch.testing.assert_close(calls[0].grad, 2 * z2.detach() @ lin.weight.detach())
    lin(X)
    assert cap.end() == {}
    with torch.no_grad():  # an output without a gradient leaves grad None
        cap.begin()
        lin(X)
    assert cap.end()["lin"][0].grad is None
