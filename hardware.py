"""What this machine is and does: the device a run takes, and whether bfloat16 pays off on it."""
import torch

from errors import UserError


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


def bf16_pays_off(device):
    """(whether bfloat16 autocast makes `device` faster than float32, why), for bf16_autocast 'auto'.

    CUDA: where the GPU computes bfloat16. CPU: only with AMX. AVX512-BF16 alone is native too, but on the
    CPU measured there bfloat16 ran slower than float32 (docs/performance.md)."""
    if device.type == 'cuda':
        native = torch.cuda.is_bf16_supported()
        return native, 'cuda computes bfloat16 natively' if native else 'cuda has no native bfloat16'
    if cpu_feature('amx_tile'):
        return True, 'cpu has AMX, which computes bfloat16 natively'
    if cpu_feature('avx512_bf16'):
        return False, 'cpu has AVX512-BF16 but no AMX; there bfloat16 ran slower than float32'
    return False, 'cpu has no native bfloat16'


def choose_precision(setting, fast_bf16, why):
    """(use_bf16, the line that says what was chosen and why) for `bf16_autocast` = True, False or 'auto';
    `fast_bf16` and `why` come from bf16_pays_off.

    'auto' takes bfloat16 only where it is faster; elsewhere (emulated, or AVX512-BF16 without AMX)
    AlexNet and the flow run slower than in float32 (docs/performance.md)."""
    if setting == 'auto':
        return fast_bf16, f"precision: {'bfloat16' if fast_bf16 else 'float32'} (bf16_autocast auto: {why})"
    if setting and not fast_bf16:
        return True, (f'warning: precision: bfloat16 (bf16_autocast true) although {why}: AlexNet and the flow '
                      f'run slower than in float32; use --bf16_autocast auto or false')
    if setting:
        return True, 'precision: bfloat16 (bf16_autocast true)'
    hint = '; --bf16_autocast auto would use it (docs/performance.md)' if fast_bf16 else ''
    return False, f'precision: float32 (bf16_autocast false, as the paper; {why}{hint})'
