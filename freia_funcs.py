"""The normalizing flow of DifferNet: a hand-port of the FrEIA pieces the official code uses.

Source of the design: FrEIA (https://github.com/VLL-HD/FrEIA, MIT), as assembled in the official
DifferNet `freia_funcs.py`. Every invertible module here returns `(output, log_jac_det)` from a single
call, so training needs one pass through the flow instead of the official two (forward, then
`jacobian(run_forward=False)` recomputing every subnet).
"""
import numpy as np
import torch
import torch.nn as nn


def fixed_permutation(n_dims, seed):
    """The permutation `np.random.seed(seed); np.random.permutation(n_dims)` gives, without touching
    numpy's global random state."""
    return np.random.RandomState(seed).permutation(n_dims)


class SubnetFC(nn.Module):
    """Coupling subnet (official `F_fully_connected`): fc1 -> ReLU -> fc2 -> ReLU -> fc2b -> ReLU -> fc3,
    with dropout before each ReLU. Not invertible; the coupling around it is.

    The official class also builds a BatchNorm1d (`bn`) that its forward never uses; it is left out, and
    `load_official_state_dict` drops its entries. `linear` computes each layer (torch.nn.functional.linear's
    signature): `DifferNetFlow.use_linear` swaps in other kernels for the same products.
    """
    linear = staticmethod(torch.nn.functional.linear)

    def __init__(self, size_in, size_out, internal_size, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(size_in, internal_size)
        self.fc2 = nn.Linear(internal_size, internal_size)
        self.fc2b = nn.Linear(internal_size, internal_size)
        self.fc3 = nn.Linear(internal_size, size_out)
        self.d1 = nn.Dropout(p=dropout)
        self.d2 = nn.Dropout(p=dropout)
        self.d2b = nn.Dropout(p=dropout)

    def forward(self, x):
        out = torch.relu(self.d1(self.layer(self.fc1, x)))
        out = torch.relu(self.d2(self.layer(self.fc2, out)))
        out = torch.relu(self.d2b(self.layer(self.fc2b, out)))
        return self.layer(self.fc3, out)

    def layer(self, fc, x):
        return self.linear(x, fc.weight, fc.bias)


class PermuteLayer(nn.Module):
    """Fixed random permutation y = x[:, perm], perm drawn with numpy seed `seed`.

    log|det J| = 0. The permutation is a non-persistent buffer: it follows `.to(device)` but is not in
    the state dict, exactly like the official module, whose state dict has no entry for it.
    """

    def __init__(self, n_dims, seed):
        super().__init__()
        perm = fixed_permutation(n_dims, seed)
        self.register_buffer('perm', torch.as_tensor(perm, dtype=torch.long), persistent=False)
        self.register_buffer('perm_inv', torch.as_tensor(np.argsort(perm), dtype=torch.long), persistent=False)

    def forward(self, x, rev=False):
        y = x[:, self.perm_inv] if rev else x[:, self.perm]
        return y, x.new_zeros(x.shape[0])


class GlowCouplingLayer(nn.Module):
    """GLOW affine coupling with the soft clamp of the official code.

    Split x into x1 (first n//2 values) and x2 (the rest). Forward:
        (s2, t2) = subnet2(x2),   y1 = e(s2) * x1 + t2
        (s1, t1) = subnet1(y1),   y2 = e(s1) * x2 + t1
        log e(s) = alpha * 0.636 * atan(s / alpha)       (|log e| < alpha, alpha = clamp)
        log|det J| = sum(log e(s1)) + sum(log e(s2))
    The output is clamped to [-1e6, 1e6] as in the official code. Reverse (rev=True) undoes it:
        x2 = (y2 - t1) / e(s1) with (s1, t1) = subnet1(y1);  x1 = (y1 - t2) / e(s2) with (s2, t2) = subnet2(x2)
    and returns -log|det J| of the forward map.
    """

    def __init__(self, n_dims, internal_size, clamp=3.0, dropout=0.0):
        super().__init__()
        self.split_len1 = n_dims // 2
        self.split_len2 = n_dims - n_dims // 2
        self.clamp = clamp
        self.s1 = SubnetFC(self.split_len1, 2 * self.split_len2, internal_size, dropout)
        self.s2 = SubnetFC(self.split_len2, 2 * self.split_len1, internal_size, dropout)

    def log_e(self, s):
        return self.clamp * 0.636 * torch.atan(s / self.clamp)

    def forward(self, x, rev=False):
        x1, x2 = x[:, :self.split_len1], x[:, self.split_len1:]
        if not rev:
            r2 = self.s2(x2)
            log_e2 = self.log_e(r2[:, :self.split_len1])
            y1 = torch.exp(log_e2) * x1 + r2[:, self.split_len1:]
            r1 = self.s1(y1)
            log_e1 = self.log_e(r1[:, :self.split_len2])
            y2 = torch.exp(log_e1) * x2 + r1[:, self.split_len2:]
            log_jac_det = log_e1.sum(dim=1) + log_e2.sum(dim=1)
        else:  # here x holds (y1, y2) of the forward map
            r1 = self.s1(x1)
            log_e1 = self.log_e(r1[:, :self.split_len2])
            y2 = (x2 - r1[:, self.split_len2:]) / torch.exp(log_e1)
            r2 = self.s2(y2)
            log_e2 = self.log_e(r2[:, :self.split_len1])
            y1 = (x1 - r2[:, self.split_len1:]) / torch.exp(log_e2)
            log_jac_det = -(log_e1.sum(dim=1) + log_e2.sum(dim=1))
        y = torch.clamp(torch.cat((y1, y2), dim=1), -1e6, 1e6)
        return y, log_jac_det


class DifferNetFlow(nn.Module):
    """The official `nf_head()`: n_blocks x [PermuteLayer(seed=k), GlowCouplingLayer].

    `module_list` mirrors the official ReversibleGraphNet, whose list starts with the (module-less) input
    node, so block k's permutation sits at index 2k+1 and its coupling at 2k+2: state-dict keys such as
    `module_list.2.s1.fc1.weight` are the official ones.
    """

    def __init__(self, n_dims, n_blocks=8, internal_size=2048, clamp=3.0, dropout=0.0):
        super().__init__()
        self.n_dims = n_dims
        layers = [None]
        for k in range(n_blocks):
            layers.append(PermuteLayer(n_dims, seed=k))
            layers.append(GlowCouplingLayer(n_dims, internal_size, clamp=clamp, dropout=dropout))
        self.module_list = nn.ModuleList(layers)

    def use_linear(self, linear):
        """Computes every subnet layer with `linear(x, weight, bias)` (e.g. hardware.onednn_linear)."""
        for module in self.modules():
            if isinstance(module, SubnetFC):
                module.linear = linear

    def forward(self, x, rev=False):
        """Returns (z, log|det J|) for rev=False, (x, -log|det J(x)|) for rev=True given z."""
        layers = list(self.module_list)[1:]
        log_jac_det = x.new_zeros(x.shape[0])
        for layer in (reversed(layers) if rev else layers):
            x, layer_log_det = layer(x, rev=rev)
            log_jac_det = log_jac_det + layer_log_det
        return x, log_jac_det

    def load_official_state_dict(self, state_dict):
        """Loads flow weights saved by the official code (keys relative to the flow, `nf.` stripped).

        Drops the unused `bn` entries of the official subnets. Also accepts coupling indices shifted by
        one (1, 3, ..., 15), as written by ports that leave the input node out of the module list.
        """
        state_dict = {k: v for k, v in state_dict.items() if '.bn.' not in k}
        indices = sorted({int(k.split('.')[1]) for k in state_dict if k.startswith('module_list.')})
        if indices and indices[0] % 2 == 1:
            state_dict = {shift_module_index(k, 1): v for k, v in state_dict.items()}
        self.load_state_dict(state_dict, strict=True)


def shift_module_index(key, offset):
    """'module_list.3.s1.fc1.weight' -> 'module_list.4.s1.fc1.weight' for offset 1."""
    parts = key.split('.')
    if parts[0] == 'module_list':
        parts[1] = str(int(parts[1]) + offset)
    return '.'.join(parts)


def nll_loss(z, log_jac_det):
    """The official DifferNet loss: mean over the batch of (0.5 * ||z||^2 - log|det J|) / n_dims."""
    return torch.mean(0.5 * torch.sum(z ** 2, dim=1) - log_jac_det) / z.shape[1]
