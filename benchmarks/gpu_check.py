"""One command for a CUDA machine (under 10 minutes on one GPU): runs the CUDA tests, measures, and prints
one JSON line (the last line of stdout; everything else goes to stderr).

    python benchmarks/gpu_check.py                                  # CUDA: tests + figures + bottle 24 x 8
    python benchmarks/gpu_check.py --dataset_path ../shared/data/mvtec --class_name bottle
    python benchmarks/gpu_check.py --quick                          # tiny settings, any device (CPU: a test runs it)

The JSON holds: the device and GPU name; the result of `pytest -m cuda` (the CUDA-marked tests);
views/s of the AlexNet extractor (all scales) in fp32 (TF32 off), TF32 and bf16 autocast; views/s of
making views (tensor and PIL backends); the flow's training step time at the run's size; and a full run
of the paper schedule (config.py as it is, feature cache off) with wall time, last and max AUROC and the
peak GPU memory (torch.cuda.max_memory_allocated). --quick: 64 px, 1 scale, a 2-block flow of width 32,
random AlexNet weights, the demo set generated into --work_dir, 2 x 1 epochs.
"""
import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from base.atomic_files import read_json  # noqa: E402
from image_data.demo_data import DEMO_CLASS, generate_demo_dataset  # noqa: E402
from model import view_features
from utils import dataset_loader
from runner.jobs import run  # noqa: E402
from model import DifferNet  # noqa: E402
from base.settings import build_config  # noqa: E402
from train import flow_step, make_optimizer  # noqa: E402
from utils import MultiViewDataset
from image_data.layouts import find_class_samples

QUICK = dict(img_size=64, n_scales=1, n_coupling_blocks=2, fc_internal=32, meta_epochs=2, sub_epochs=1,
             n_transforms_test=4, pretrained=False, extract_batch_size_cuda=64)


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def seconds_per_call(function, device, repeats):
    function()  # warm-up: kernels, cuDNN algorithm choice, allocator
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


@contextlib.contextmanager
def tf32(enabled):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cuda_tests(device):
    if device.type != 'cuda':
        return {'skipped': 'no CUDA device: the CUDA-marked tests skip here'}
    command = [sys.executable, '-m', 'pytest', '-q', '-m', 'cuda', os.path.join(REPO_ROOT, 'tests')]
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    log(result.stdout[-3000:], result.stderr[-2000:])
    lines = [line for line in result.stdout.strip().splitlines() if line.strip()]
    return {'skipped': False, 'returncode': result.returncode, 'summary': lines[-1] if lines else '',
            'wall_s': round(time.time() - started, 1)}


def extractor_rates(base, device, n_views, repeats):
    """AlexNet views/s: fp32 with TF32 off, TF32 on, bf16 autocast (channels_last as config.py)."""
    rates = {}
    for label, allow_tf32, bf16 in (('fp32', False, False), ('tf32', True, False), ('bf16', False, True)):
        config = build_config(**{**vars(base), 'bf16_autocast': bf16})
        torch.manual_seed(0)
        model = DifferNet(config).to(device).eval()
        model.prepare(config, 'cpu')
        views = torch.randn(n_views, 3, config.img_size, config.img_size, device=device)
        with tf32(allow_tf32):
            seconds = seconds_per_call(lambda: view_features(model, views, (config.norm_mean, config.norm_std)), device, repeats)
        rates[label] = round(n_views / seconds, 1)
        log(f'extraction {label}: {rates[label]} views/s ({n_views} views per call)')
    return rates


def view_making_rates(config, samples, device, repeats):
    """Views/s of making training views (n_transforms per image, batch_size images per batch), per backend."""
    rates = {}
    for backend in ('tensor', 'pil'):
        dataset = MultiViewDataset(samples, config.n_transforms, config, keep_images=True, backend=backend)
        loader = dataset_loader(dataset, config.batch_size, True, config, device)

        def one_pass():
            for batch, _ in loader:
                dataset.batch_views(batch, device)
        seconds = seconds_per_call(one_pass, device, repeats)
        rates[backend] = round(len(samples) * config.n_transforms / seconds, 1)
        log(f'view making {backend}: {rates[backend]} views/s')
    return rates


def flow_step_ms(config, device, repeats):
    """Milliseconds per Adam step of the flow on batch_size x n_transforms feature vectors."""
    torch.manual_seed(0)
    model = DifferNet(config).to(device)
    optimizer = make_optimizer(model.nf, config)
    features = torch.randn(config.batch_size * config.n_transforms, model.n_features, device=device)
    return round(1000 * seconds_per_call(lambda: flow_step(model, optimizer, features, config.max_grad_norm), device, repeats), 3)


def full_run(config, device, work_dir):
    """The whole schedule of `config` through main.run, its output on stderr."""
    results_dir = os.path.join(work_dir, f'run_{time.strftime("%Y%m%d_%H%M%S")}')
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.time()
    with contextlib.redirect_stdout(sys.stderr):
        run(build_config(**{**vars(config), 'results_dir': results_dir}))
    wall = time.time() - started
    entry = read_json(os.path.join(results_dir, 'results.json'))['classes'][0]
    return {'class_name': entry['class_name'], 'meta_epochs': config.meta_epochs, 'sub_epochs': config.sub_epochs,
            'view_backend': config.view_backend, 'bf16_autocast': config.bf16_autocast,
            'train_feature_pool': config.train_feature_pool, 'wall_s': round(wall, 1),
            'last_auroc': entry['last_auroc'], 'max_auroc': entry['max_auroc'],
            'max_auroc_epoch': entry['max_auroc_epoch'],
            'peak_gpu_memory_gib': round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
            if device.type == 'cuda' else None,
            'results_dir': results_dir}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='tiny settings and the demo set, any device')
    parser.add_argument('--dataset_path', default=os.path.join(REPO_ROOT, '..', 'shared', 'data', 'mvtec'))
    parser.add_argument('--class_name', default='bottle')
    parser.add_argument('--device', default='auto', help="'auto' (CUDA when available), 'cuda' or 'cpu'")
    parser.add_argument('--work_dir', default='', help='results of the full run (default: a temporary folder)')
    parser.add_argument('--skip_tests', action='store_true')
    parser.add_argument('--skip_full_run', action='store_true')
    parser.add_argument('--meta_epochs', type=int, default=0, help='shorter full run (0: config.py, 24)')
    args = parser.parse_args()
    device = torch.device('cuda' if args.device == 'auto' and torch.cuda.is_available() else
                          ('cpu' if args.device == 'auto' else args.device))
    work_dir = args.work_dir or tempfile.mkdtemp(prefix='gpu_check_')
    os.makedirs(work_dir, exist_ok=True)
    overrides = dict(device=device.type, feature_cache=False, seed=0, verbose=True, resume_state=False)
    if args.quick:
        dataset_path = os.path.join(work_dir, 'demo')
        generate_demo_dataset(dataset_path)
        overrides.update(QUICK, dataset_path=dataset_path, class_name=DEMO_CLASS)
    else:
        overrides.update(dataset_path=args.dataset_path, class_name=args.class_name)
    if args.meta_epochs:
        overrides['meta_epochs'] = args.meta_epochs
    config = build_config(**overrides)
    repeats = 1 if args.quick else 5
    report = {'device': device.type, 'quick': args.quick,
              'gpu_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
              'cpu': platform.processor() or platform.machine(), 'torch': torch.__version__,
              'img_size': config.img_size, 'n_scales': config.n_scales}
    started = time.time()
    report['cuda_tests'] = {'skipped': '--skip_tests'} if args.skip_tests else cuda_tests(device)
    n_views = 32 if args.quick else 512
    report['views_per_s'] = extractor_rates(config, device, n_views, repeats)
    train_samples, _ = find_class_samples(config.dataset_path, config.class_name)
    report['view_making_per_s'] = view_making_rates(config, train_samples[:48], device, repeats)
    report['flow_step_ms'] = flow_step_ms(config, device, 10 if args.quick else 50)
    report['flow_step_ms_bf16'] = flow_step_ms(build_config(**{**vars(config), 'bf16_autocast': True}), device,
                                               10 if args.quick else 50)
    log(f"flow step: {report['flow_step_ms']} ms fp32, {report['flow_step_ms_bf16']} ms bf16")
    log(json.dumps(report))  # the figures so far, should the full run be stopped
    report['full_run'] = None if args.skip_full_run else full_run(config, device, work_dir)
    report['total_wall_s'] = round(time.time() - started, 1)
    print(json.dumps(report))


if __name__ == '__main__':
    main()
