"""What this machine is and does: the device a run takes, whether bfloat16 pays off on it, and which kernels
compute the flow's fp32 matrix products on a CPU, each decided once at the start of a run and printed.

The flow's kernels follow what the CPU is, so that the same command gives the same numbers on a machine
every time: MKL, PyTorch's fp32 matrix products on x86, takes slower code paths on AMD processors, where
oneDNN's reach about twice its speed; on Intel processors the two are alike (docs/performance.md).
bf16_autocast 'auto' measures instead (a fraction of a second), since bfloat16 is opt-in anyway.
"""
import time

import torch
import torch.nn.functional as F

from base.errors import UserError

BF16_MIN_SPEEDUP = 1.2  # 'auto' takes bfloat16 on a CPU only when its convolutions measure this much faster
ONEDNN_VENDORS = ('AuthenticAMD',)  # CPUs where MKL's fp32 products run far below oneDNN's (docs/performance.md)


def resolve_device(name):
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for but CUDA is not available here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"device '{name}' is not a device; use 'auto', 'cpu' or 'cuda'") from None


def cpu_feature(name):
    """torch's own check of a CPU feature ('amx_tile', 'avx512_bf16'); False where this torch lacks it."""
    check = getattr(torch.cpu, f'_is_{name}_supported', None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def seconds_per_call(function, repeats):
    """The best of `repeats` timed calls after one warm-up call (kernel selection, allocation)."""
    function()
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def bf16_convolution_speedup(repeats=3):
    """How many times faster an AlexNet-sized convolution (conv2: 64 -> 192 channels, 5 x 5, 55 x 55 px,
    8 images, channels-last) runs under bfloat16 autocast than in float32 on this CPU."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 64, 55, 55, generator=generator).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(192, 64, 5, 5, generator=generator).contiguous(memory_format=torch.channels_last)

    def convolve(bf16):
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            F.conv2d(images, weight, padding=2)
    return seconds_per_call(lambda: convolve(False), repeats) / seconds_per_call(lambda: convolve(True), repeats)


def bf16_pays_off(device, measure=False):
    """(whether bfloat16 autocast makes `device` faster than float32, why), for bf16_autocast 'auto'.

    CUDA: where the GPU computes bfloat16. A CPU without native bfloat16 (neither AMX nor AVX512-BF16):
    never. A CPU with it: with `measure`, when its convolutions run BF16_MIN_SPEEDUP times faster in a
    short measurement; without, where it has AMX (the unmeasured guess)."""
    if device.type == 'cuda':
        native = torch.cuda.is_bf16_supported()
        return native, 'cuda computes bfloat16 natively' if native else 'cuda has no native bfloat16'
    amx = cpu_feature('amx_tile')
    if not amx and not cpu_feature('avx512_bf16'):
        return False, 'cpu has no native bfloat16'
    has = 'cpu has AMX' if amx else 'cpu has AVX512-BF16 without AMX'
    if not measure:
        return amx, has
    speedup = bf16_convolution_speedup()
    return speedup >= BF16_MIN_SPEEDUP, f'{has}; measured now: bfloat16 convolutions {speedup:.1f}x as fast as float32'


def choose_precision(setting, fast_bf16, why):
    """(use_bf16, the line that says what was chosen and why) for `bf16_autocast` = True, False or 'auto';
    `fast_bf16` and `why` come from bf16_pays_off."""
    if setting == 'auto':
        return fast_bf16, f"precision: {'bfloat16' if fast_bf16 else 'float32'} (bf16_autocast auto: {why})"
    if setting and not fast_bf16:
        return True, (f'warning: precision: bfloat16 (bf16_autocast true) although {why}: AlexNet and the flow '
                      f'may run slower than in float32; use --bf16_autocast auto or false')
    if setting:
        return True, 'precision: bfloat16 (bf16_autocast true)'
    hint = '; --bf16_autocast auto measures whether bfloat16 is faster here' if fast_bf16 else ''
    return False, f'precision: float32 (bf16_autocast false, as the paper; {why}{hint})'


# --- the flow's fp32 matrix products on a CPU -------------------------------------------------------------

def onednn_available():
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise')


def plain_layout(matrix):
    """`matrix` itself where it is row-major or a transposed row-major matrix, else a row-major copy: oneDNN
    reads those two layouts with its fast kernels, but falls back to its reference kernel (about 1000x
    slower) for other strides, such as the transpose of a column slice (the coupling's half of a batch)."""
    if matrix.is_contiguous() or matrix.t().is_contiguous():
        return matrix
    return matrix.contiguous()


def onednn_product(inputs, weight, bias=None):
    """inputs @ weight^T (+ bias) through oneDNN's matmul, for 2-D operands of any strides."""
    return torch.ops.mkldnn._linear_pointwise(plain_layout(inputs), plain_layout(weight), bias, 'none', [], '')


class OneDnnLinear(torch.autograd.Function):
    """y = x W^T + b with all three products through oneDNN:
        forward  y = x W^T + b
        backward dL/dx = g W,  dL/dW = g^T x,  dL/db = sum over rows of g
    The same arithmetic as torch.nn.functional.linear, rounded by other kernels."""

    @staticmethod
    def forward(context, inputs, weight, bias):
        context.save_for_backward(inputs, weight)
        return onednn_product(inputs, weight, bias)

    @staticmethod
    def backward(context, grad_output):
        inputs, weight = context.saved_tensors
        grad_output = grad_output.contiguous()
        grad_inputs = onednn_product(grad_output, weight.t()) if context.needs_input_grad[0] else None
        grad_weight = onednn_product(grad_output.t(), inputs.t()) if context.needs_input_grad[1] else None
        grad_bias = grad_output.sum(dim=0) if context.needs_input_grad[2] else None
        return grad_inputs, grad_weight, grad_bias


def onednn_linear(inputs, weight, bias):
    """torch.nn.functional.linear's signature, the products through oneDNN (2-D float32 inputs on a CPU)."""
    return OneDnnLinear.apply(inputs, weight, bias)


def cpu_vendor():
    """The CPU's vendor id ('GenuineIntel', 'AuthenticAMD', ...), or '' where the system does not say."""
    try:
        with open('/proc/cpuinfo') as handle:
            for line in handle:
                if line.startswith('vendor_id'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return ''


def choose_flow_kernel(setting, device, bf16, n_rows, width):
    """(kernel, the line that says which and why): 'default' (PyTorch's own: MKL on x86) or 'onednn', for
    `cpu_flow_kernel` = 'auto', 'default' or 'onednn'. 'auto' takes oneDNN on the CPUs of ONEDNN_VENDORS and
    PyTorch's default elsewhere (the same choice on a machine every time); on a GPU, under bfloat16 (autocast
    picks its own kernels) or without oneDNN it keeps PyTorch's. `n_rows` and `width` name the flow's shape."""
    if device.type != 'cpu' or bf16:
        where = 'on the GPU' if device.type != 'cpu' else 'under bfloat16 autocast'
        return 'default', f"kernels: the flow's products {where} are PyTorch's own (cpu_flow_kernel applies to fp32 on a CPU)"
    if not onednn_available():
        return 'default', "kernels: the flow's products through PyTorch's default (this torch has no oneDNN matmul)"
    if setting != 'auto':
        return setting, f"kernels: the flow's fp32 products through {'oneDNN' if setting == 'onednn' else 'PyTorch default (MKL)'} (cpu_flow_kernel {setting})"
    vendor = cpu_vendor()
    if vendor in ONEDNN_VENDORS:
        return 'onednn', (f"kernels: the flow's fp32 products ({n_rows} x {width} by {width} x {width}) through oneDNN "
                          f"(cpu_flow_kernel auto: an {vendor} CPU, where MKL's run at about half oneDNN's speed)")
    return 'default', (f"kernels: the flow's fp32 products through PyTorch default (MKL) (cpu_flow_kernel auto: "
                       f"{vendor or 'this'} CPU; python benchmarks/speed.py --components limits compares both)")
