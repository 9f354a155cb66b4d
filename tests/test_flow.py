"""The flow: the official numbers, exact inversion, log-determinant, permutations, the loss, checkpoints."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import GOLDEN_DIR, REPO_ROOT
from freia_funcs import DifferNetFlow, GlowCouplingLayer, fixed_permutation, nll_loss
from base.hardware import onednn_linear, plain_layout


def load_golden_case(case):
    cfg = case['config']
    flow = DifferNetFlow(cfg['dim'], cfg['n_blocks'], cfg['internal'], cfg['clamp'])
    for k, coupling in enumerate(case['couplings']):
        layer = flow.module_list[2 * k + 2]
        for subnet in ('s1', 's2'):
            for fc in ('fc1', 'fc2', 'fc2b', 'fc3'):
                linear = getattr(getattr(layer, subnet), fc)
                linear.weight.data.copy_(coupling[subnet][fc]['weight'])
                linear.bias.data.copy_(coupling[subnet][fc]['bias'])
    return flow.eval()


@pytest.fixture(scope='module')
def golden_flow():
    path = os.path.join(GOLDEN_DIR, 'flow_reference.pt')
    return torch.load(path, weights_only=True)


def test_reproduces_official_flow(golden_flow):
    assert len(golden_flow['cases']) == 3
    for case in golden_flow['cases']:
        flow = load_golden_case(case)
        for k, perm in enumerate(case['permutations']):
            assert np.array_equal(flow.module_list[2 * k + 1].perm.numpy(), np.asarray(perm))
        with torch.no_grad():
            z, log_jac_det = flow(case['x'])
            x_back, _ = flow(z, rev=True)
        scale = case['z'].abs().max()
        assert torch.allclose(z, case['z'], rtol=1e-5, atol=1e-5 * scale)
        assert torch.allclose(log_jac_det, case['log_jac_det'], rtol=1e-5, atol=1e-5 * case['log_jac_det'].abs().max())
        assert torch.allclose(nll_loss(z, log_jac_det), case['loss'], rtol=1e-5)
        assert torch.allclose(x_back, case['x_reconstructed'], rtol=1e-4, atol=1e-4)


def test_permutation_matches_numpy_seed_without_touching_global_state():
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    perm = fixed_permutation(768, 5)
    assert np.random.rand() == expected_next
    np.random.seed(5)
    assert np.array_equal(perm, np.random.permutation(768))


def test_inverts_exactly_and_negates_log_det():
    torch.manual_seed(0)
    flow = DifferNetFlow(10, n_blocks=3, internal_size=16, clamp=3.0)
    x = torch.randn(5, 10, dtype=torch.float64)
    flow = flow.double()
    z, log_det = flow(x)
    x_back, log_det_rev = flow(z, rev=True)
    assert torch.allclose(x_back, x, atol=1e-10)
    assert torch.allclose(log_det_rev, -log_det, atol=1e-10)


@pytest.mark.parametrize('n_dims', [6, 7])
def test_log_det_matches_autograd_jacobian(n_dims):
    torch.manual_seed(1)
    flow = DifferNetFlow(n_dims, n_blocks=2, internal_size=8, clamp=2.0).double()
    for parameter in flow.parameters():  # large weights push the soft clamp into its non-linear part
        parameter.data.mul_(3)
    x = torch.randn(4, n_dims, dtype=torch.float64)
    _, log_det = flow(x)
    for i in range(x.shape[0]):
        jacobian = torch.autograd.functional.jacobian(lambda v: flow(v.unsqueeze(0))[0][0], x[i])
        assert torch.allclose(log_det[i], torch.linalg.slogdet(jacobian)[1], atol=1e-8)


def test_soft_clamp_bounds_log_scale():
    layer = GlowCouplingLayer(4, 8, clamp=3.0)
    s = torch.tensor([-1e6, -3.0, 0.0, 3.0, 1e6])
    log_e = layer.log_e(s)
    assert torch.all(log_e.abs() < 3.0 * 0.636 * np.pi / 2 + 1e-6)
    assert log_e[2] == 0 and torch.isclose(log_e[3], torch.tensor(3.0 * 0.636 * np.pi / 4))


def test_loss_is_official_formula():
    z = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    log_det = torch.tensor([0.5, -0.5])
    expected = ((0.5 * 5 - 0.5) + (0.5 * 1 + 0.5)) / 2 / 2
    assert nll_loss(z, log_det).item() == pytest.approx(expected)


def official_style_state_dict(flow, index_offset=0):
    """A state dict as the official save_weights writes it for the flow: `nf.` prefix, BatchNorm entries."""
    state = {}
    for key, value in flow.state_dict().items():
        parts = key.split('.')
        parts[1] = str(int(parts[1]) + index_offset)
        state['nf.' + '.'.join(parts)] = value.clone()
        if key.endswith('fc1.weight'):
            bn_prefix = 'nf.' + '.'.join(parts[:3]) + '.bn.'
            n_in = value.shape[1]
            state.update({bn_prefix + 'weight': torch.ones(n_in), bn_prefix + 'bias': torch.zeros(n_in),
                          bn_prefix + 'running_mean': torch.zeros(n_in), bn_prefix + 'running_var': torch.ones(n_in),
                          bn_prefix + 'num_batches_tracked': torch.tensor(0)})
    return state


@pytest.mark.parametrize('index_offset', [0, -1])
def test_loads_official_state_dict_and_gives_same_z(index_offset):
    torch.manual_seed(2)
    source = DifferNetFlow(12, n_blocks=3, internal_size=16)
    assert 'module_list.2.s1.fc1.weight' in source.state_dict()
    official = official_style_state_dict(source, index_offset)
    target = DifferNetFlow(12, n_blocks=3, internal_size=16)
    target.load_official_state_dict({k[3:]: v for k, v in official.items()})
    x = torch.randn(3, 12)
    assert torch.equal(source(x)[0], target(x)[0])


def test_onednn_linear_matches_pytorchs_products_and_gradients():
    torch.manual_seed(0)
    inputs = torch.randn(7, 5, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(3, 5, requires_grad=True)
    bias = torch.randn(3, requires_grad=True)
    grad = torch.randn(7, 3)
    expected = torch.nn.functional.linear(inputs, weight, bias)
    expected_grads = torch.autograd.grad(expected, (inputs, weight, bias), grad)
    got = onednn_linear(inputs, weight, bias)
    got_grads = torch.autograd.grad(got, (inputs, weight, bias), grad)
    assert torch.allclose(got, expected, atol=1e-6)
    for a, b in zip(got_grads, expected_grads):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def test_onednn_operands_are_handed_over_in_layouts_its_fast_kernels_read():
    matrix = torch.randn(6, 8)
    assert plain_layout(matrix) is matrix
    assert plain_layout(matrix.t()).data_ptr() == matrix.data_ptr()  # a transposed view is read as it is
    half = matrix[:, :4]  # the coupling's half of a batch: neither row- nor column-major
    copied = plain_layout(half.t())
    assert copied.is_contiguous() and torch.equal(copied, half.t())


ONEDNN_TRACE = """
import torch
from freia_funcs import DifferNetFlow
from base.hardware import onednn_linear, onednn_product
onednn_product(torch.randn(8, 16), torch.randn(12, 16))  # a plain product: the kernel this CPU has
flow = DifferNetFlow(12, n_blocks=2, internal_size=16)
flow.use_linear(onednn_linear)
z, log_det = flow(torch.randn(9, 12))
(z.square().sum() - log_det.sum()).backward()
"""


def test_the_flows_onednn_products_run_the_kernel_a_plain_product_gets():
    # strides oneDNN's fast kernels do not read send it to its reference kernel, about 1000x slower
    trace = subprocess.run([sys.executable, '-c', ONEDNN_TRACE], capture_output=True, text=True, cwd=REPO_ROOT,
                           env={**os.environ, 'ONEDNN_VERBOSE': '1'}, check=True).stdout
    marker = ',primitive,exec,cpu,inner_product,'
    kernels = [line.split(marker)[1].split(',')[0] for line in trace.splitlines() if marker in line]
    plain, flow = kernels[0], kernels[1:]
    assert len(flow) > 2 * 2 * 2 * 4, trace[-2000:]  # 2 blocks x 2 subnets x 4 layers, forward and backward
    assert plain.startswith('ref') or not any(kernel.startswith('ref') for kernel in flow), kernels


def test_flow_with_onednn_products_gives_the_same_z_and_log_det():
    torch.manual_seed(0)
    flow = DifferNetFlow(12, n_blocks=2, internal_size=16)
    x = torch.randn(9, 12)
    z, log_det = flow(x)
    flow.use_linear(onednn_linear)
    z_onednn, log_det_onednn = flow(x)
    assert torch.allclose(z, z_onednn, atol=1e-5) and torch.allclose(log_det, log_det_onednn, atol=1e-5)
    flow.use_linear(torch.nn.functional.linear)
    assert torch.equal(flow(x)[0], z)  # switched back: PyTorch's own products, bit for bit
