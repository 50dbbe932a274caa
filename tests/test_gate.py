"""The gate's fast formula against the reference ``lerp(z, relu(z), c)``: values and gradients."""

from __future__ import annotations

import pytest
import torch

from snl_fx import passes


def reference(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.lerp(z, torch.relu(z), c)


def fast(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return passes.gate._GateFunction.apply(z, c)  # what Gate.forward calls with its weight


def run(fn, z, c, g):
    z, c = z.clone().requires_grad_(), c.clone().requires_grad_()
    out = fn(z, c)
    out.backward(g)
    return out.detach(), z.grad, c.grad


def inputs(z_shape, c_shape, kind):
    torch.manual_seed(0)
    z = torch.randn(z_shape)
    z.view(-1)[::7] = 0.0  # exact zeros: the subgradient edge case
    c = {
        "binary": (torch.rand(c_shape) > 0.5).float(),
        "rand": torch.rand(c_shape),  # multiples of 2**-24: 1-c is exact
        "fine": torch.rand(c_shape) ** 3,  # 1-c rounds
    }[kind]
    return z, c, torch.randn(z_shape)


SHAPES = [((4, 3, 5, 5), (3, 5, 5)), ((4, 3, 5, 5), (3, 1, 1)), ((6, 10), (10,)), ((6,), ())]


@pytest.mark.parametrize("kind", ["binary", "rand", "fine"])
@pytest.mark.parametrize("z_shape, c_shape", SHAPES)
def test_gate_matches_lerp_reference(z_shape, c_shape, kind):
    z, c, g = inputs(z_shape, c_shape, kind)
    out, gz, gc = run(fast, z, c, g)
    ref_out, ref_gz, ref_gc = run(reference, z, c, g)
    neg = z <= 0
    assert torch.equal(gc, ref_gc)  # d/dc: bit-identical
    assert torch.equal(gz[neg], ref_gz[neg])  # d/dz where z <= 0 (z == 0 included): (1-c)*g, bit-identical
    assert torch.equal(gz[~neg], g[~neg])  # d/dz where z > 0: exactly g ...
    assert torch.allclose(ref_gz[~neg], g[~neg], rtol=1.2e-7, atol=0)  # ... where lerp's g*(1-c) + g*c is within 1 ulp
    if kind == "fine":
        assert torch.allclose(out, ref_out, rtol=1.2e-7, atol=0)  # within 1 ulp
    else:
        assert torch.equal(out, ref_out)
    if kind == "binary":
        assert torch.equal(gz, ref_gz)


def test_gate_zero_input_subgradient():
    z, c, g = torch.zeros(3, 4), torch.tensor([0.0, 0.25, 0.5, 1.0]), torch.ones(3, 4)
    out, gz, gc = run(fast, z, c, g)
    assert torch.equal(out, torch.zeros(3, 4))
    assert torch.equal(gz, (1 - c).expand(3, 4))  # the negative side, as lerp(z, relu(z), c)
    assert torch.equal(gc, torch.zeros(4))


def test_gate_frozen_or_input_without_grad():
    z, c, g = inputs((4, 3, 5, 5), (3, 5, 5), "rand")
    gate = passes.Gate(c.shape)
    gate.weight.data = c
    gate.weight.requires_grad_(False)  # after binarize
    zz = z.clone().requires_grad_()
    gate(zz).backward(g)
    assert torch.equal(zz.grad[z <= 0], (g * (1 - c))[z <= 0]) and torch.equal(zz.grad[z > 0], g[z > 0])
    gate.weight.requires_grad_(True)
    gate(z).backward(g)  # input needs no grad
    assert torch.equal(gate.weight.grad, run(reference, z, c, g)[2])
    with torch.no_grad():
        assert torch.equal(gate(z), reference(z, c))
