"""Speed and memory of DifferNet on this machine: prints one figure per line, asserts nothing.

    python benchmarks/speed.py                      # components: extraction, flow step, evaluation, loading
    python benchmarks/speed.py --components breakdown limits   # a sub epoch's parts, GFLOP/s against the limits
    python benchmarks/speed.py --components breakdown --breakdown_modes fp32 --flow_kernels default onednn
                                                    # the fp32 sub epoch with the flow through MKL, then oneDNN
    python benchmarks/speed.py --full_run default   # + wall time and peak memory of a whole class run
    python benchmarks/speed.py --full_run online --meta_epochs 4   # a shorter schedule of another mode
    ONEDNN_MAX_CPU_ISA=AVX512_CORE python benchmarks/speed.py --components extraction flow
                                                    # as a CPU without native bf16 would run

Modes of --full_run (each a `python main.py` run on --dataset_path/--class_name, feature cache off):
    default   config.py as it is
    online    train_feature_pool = 0 (the official on-line augmentation), test cache on
    pool16    train_feature_pool = 16 (16 views per training image extracted once), test cache on
    pool16_bf16  the same with bf16_autocast = True (fast; collapses on screw, not recommended)
    official  train_feature_pool = 0, cache_test_features = False, channels_last = False, adam_fused = False
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from base.alexnet_weights import load_imagenet_alexnet_features  # noqa: E402
from base.hardware import choose_flow_kernel, onednn_linear, onednn_product, seconds_per_call  # noqa: E402
from base.settings import build_config  # noqa: E402
from freia_funcs import nll_loss  # noqa: E402
from image_data.layouts import find_class_samples  # noqa: E402
from model import DifferNet, batch_features, score_view_features, view_features  # noqa: E402
from train import flow_step, make_optimizer  # noqa: E402
from utils import MultiViewDataset, dataset_loader, view_backend  # noqa: E402

MODES = {
    'default': [],
    'online': ['--train_feature_pool', '0'],
    'pool16': ['--train_feature_pool', '16'],
    'pool16_bf16': ['--train_feature_pool', '16', '--bf16_autocast', 'true'],
    'official': ['--train_feature_pool', '0', '--cache_test_features', 'false', '--channels_last', 'false',
                 '--adam_fused', 'false'],
}


COMPONENTS = ['extraction', 'flow', 'loading', 'online', 'breakdown', 'limits']


def timed(function, repeats):
    function()  # warm-up: allocator, oneDNN kernels
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def bench_extraction(state, n_views, repeats):
    for label, overrides in [('fp32', dict(channels_last=False)), ('fp32 channels-last', dict(channels_last=True)),
                             ('bf16 autocast channels-last', dict(channels_last=True, bf16_autocast=True))]:
        config = build_config(**overrides)
        model = DifferNet(config, state).prepare(config, 'cpu').eval()
        views = torch.randn(n_views, 3, config.img_size, config.img_size)
        seconds = timed(lambda: view_features(model, views, (config.norm_mean, config.norm_std)), repeats)
        print(f'extraction {label:30s} {n_views / seconds:7.1f} views/s  (batch {config.extract_batch_size}, '
              f'{config.n_scales} scales, {config.img_size} px)', flush=True)


def bench_flow(repeats, n_rows):
    for label, overrides in [('fp32, torch Adam (default kernel)', dict(adam_fused=False)),
                             ('fp32, fused Adam', dict(adam_fused=True)),
                             ('bf16 autocast, fused Adam', dict(adam_fused=True, bf16_autocast=True))]:
        config = build_config(**overrides)
        torch.manual_seed(0)
        model = DifferNet(config)
        optimizer = make_optimizer(model.nf, config)
        features = torch.randn(n_rows, model.n_features)
        model.prepare(config, 'cpu')
        seconds = timed(lambda: flow_step(model, optimizer, features), repeats)
        print(f'flow training step  {label:34s} {seconds:6.3f} s per {n_rows} feature vectors', flush=True)
        test = torch.randn(83, config.n_transforms_test, model.n_features)
        seconds = timed(lambda: score_view_features(model, test, config.batch_size_test), 1)
        print(f'evaluation (flow)   {label:34s} {seconds:6.2f} s for 83 images x {config.n_transforms_test} '
              f'views', flush=True)


def bench_loading(dataset_path, class_name, n_images):
    config = build_config()
    train, _ = find_class_samples(dataset_path, class_name)
    dataset = MultiViewDataset(train[:n_images], config.n_transforms, config, keep_images=True)
    for label in ('decode + resize +', 'kept image,'):  # the first pass decodes, the second reads kept images
        start = time.perf_counter()
        [dataset[i] for i in range(len(dataset))]
        seconds = time.perf_counter() - start
        print(f'loading: {label} {config.n_transforms} views of {class_name} images: '
              f'{len(dataset) / seconds:6.1f} images/s', flush=True)


def bench_online_sub_epochs(state, dataset_path, class_name, bf16, num_workers, n_sub_epochs=2):
    """Training sub epochs of the on-line (official) augmentation on a real class: 4 views per image,
    AlexNet, 9 flow steps for bottle. The first decodes the images, later ones read the kept resized
    images (as train.train_class does). The official implementation takes 96 s per sub epoch here."""
    config = build_config(bf16_autocast=bf16, num_workers=num_workers)
    torch.manual_seed(0)
    model = DifferNet(config, state)
    model.prepare(config, 'cpu')
    optimizer = make_optimizer(model.nf, config)
    train, _ = find_class_samples(dataset_path, class_name)
    loader = dataset_loader(MultiViewDataset(train, config.n_transforms, config, keep_images=True),
                            config.batch_size, True, config.num_workers, torch.device('cpu'))
    for sub_epoch in range(n_sub_epochs):
        start = time.perf_counter()
        for features, _ in batch_features(model, loader, torch.device('cpu')):
            flow_step(model, optimizer, features.reshape(-1, features.shape[-1]))
        print(f'on-line sub epoch {sub_epoch} ({"bf16" if bf16 else "fp32"}, num_workers {num_workers}, '
              f'{len(train)} {class_name} images x {config.n_transforms} views): '
              f'{time.perf_counter() - start:6.1f} s', flush=True)


def counted_gflop(function):
    """GFLOP that `function` computes (matrix products and convolutions), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops() / 1e9


def alexnet_gflop_per_view(model, config):
    view = torch.zeros(1, 3, config.img_size, config.img_size)
    with torch.no_grad():
        return counted_gflop(lambda: model.features(view))


def flow_step_gflop(model, config, n_rows, kernel):
    """GFLOP of one flow step, counted through PyTorch's own products (FlopCounterMode does not see oneDNN's
    calls; the arithmetic is the same), then `kernel` back in place."""
    features = torch.zeros(n_rows, model.n_features)
    model.use_flow_kernel('default')
    gflop = counted_gflop(lambda: nll_loss(*model.nf(features)).backward())
    model.use_flow_kernel(kernel)
    return gflop


def linear_gflops(linear, n_rows, width, repeats=5):
    """GFLOP/s of `linear` on the flow's largest shape, forward and both backward products: (n_rows x width)
    through a (width x width) layer."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(n_rows, width, generator=generator, requires_grad=True)
    weight = torch.randn(width, width, generator=generator, requires_grad=True)
    bias = torch.zeros(width, requires_grad=True)

    def step():
        linear(inputs, weight, bias).sum().backward()
    return 3 * 2 * n_rows * width * width / seconds_per_call(step, repeats) / 1e9


def bench_limits(n_rows, width, repeats):
    """The fastest fp32 matrix products this CPU has: MKL (PyTorch's default) and oneDNN, on the flow's
    largest shape (forward and both backward products) and on a square 2048^3 product."""
    square = torch.randn(2048, 2048)
    for label, linear, product in (('MKL (PyTorch default)', torch.nn.functional.linear, lambda a, b: a @ b),
                                   ('oneDNN', onednn_linear, lambda a, b: onednn_product(a, b.t()))):
        flow_shape = linear_gflops(linear, n_rows, width, repeats)
        cube = 2 * 2048 ** 3 / timed(lambda: product(square, square), repeats) / 1e9
        print(f'fp32 matrix products, {label:22s}: {flow_shape:6.0f} GFLOP/s on {n_rows} x {width} by {width} x '
              f'{width} (forward + backward), {cube:6.0f} GFLOP/s on 2048^3', flush=True)


def bench_sub_epoch_breakdown(state, dataset_path, class_name, bf16, keep_grads, flow_kernel='auto'):
    """Where one on-line sub epoch's time goes: view making (loader and device copy), AlexNet, the flow's
    forward pass and loss, backward, zero_grad + Adam step, and the rest (the difference to the wall time
    of the loop). The second of two sub epochs is measured (the first decodes the images). With
    `keep_grads`, zero_grad keeps the 172 M-value gradient buffers instead of freeing them every step
    (set_to_none=False: the same update, since backward adds into zeros)."""
    config = build_config(bf16_autocast=bf16, cpu_flow_kernel=flow_kernel)
    device = torch.device('cpu')
    torch.manual_seed(0)
    model = DifferNet(config, state)
    kernel, kernel_line = choose_flow_kernel(config.cpu_flow_kernel, device, bf16,
                                             config.batch_size * config.n_transforms, config.fc_internal)
    model.prepare(config, device).use_flow_kernel(kernel)
    optimizer = make_optimizer(model.nf, config)
    train, _ = find_class_samples(dataset_path, class_name)
    dataset = MultiViewDataset(train, config.n_transforms, config, keep_images=True,
                               backend=view_backend(config.view_backend, device))
    loader = dataset_loader(dataset, config.batch_size, True, config.num_workers, device)
    views_per_sub_epoch = []
    for sub_epoch in range(2):
        parts = dict.fromkeys(['views', 'extraction', 'flow forward + loss', 'backward', 'zero_grad + Adam step'], 0.0)
        start = mark = time.perf_counter()

        def lap(name):
            nonlocal mark
            now = time.perf_counter()
            parts[name] += now - mark
            mark = now
        for batch, _ in loader:
            views = dataset.batch_pixels(batch, device)
            lap('views')
            features = view_features(model, views.view(-1, *views.shape[2:]), (config.norm_mean, config.norm_std))
            lap('extraction')
            optimizer.zero_grad(set_to_none=not keep_grads)
            with model.autocast():
                z, log_jac_det = model.nf(features)
            loss = nll_loss(z.float(), log_jac_det.float())
            lap('flow forward + loss')
            loss.backward()
            lap('backward')
            optimizer.step()
            lap('zero_grad + Adam step')
        total = time.perf_counter() - start
        views_per_sub_epoch.append(parts['views'])
    label = f'{"bf16" if bf16 else "fp32"}, {"grads kept" if keep_grads else "grads freed (set_to_none)"}'
    rest = total - sum(parts.values())
    print(f'sub epoch breakdown ({label}; {len(train)} {class_name} images x {config.n_transforms} views): '
          + ', '.join(f'{name} {seconds:.1f} s' for name, seconds in parts.items())
          + f', rest {rest:.1f} s; total {total:.1f} s; decoding and resizing the images once (first sub epoch\'s '
          f'views minus the second\'s) {views_per_sub_epoch[0] - views_per_sub_epoch[1]:.1f} s', flush=True)
    n_views, n_steps = len(train) * config.n_transforms, -(-len(train) // config.batch_size)
    alexnet = alexnet_gflop_per_view(model, config) * n_views / parts['extraction']
    flow = flow_step_gflop(model, config, config.batch_size * config.n_transforms, kernel) * n_steps / (
        parts['flow forward + loss'] + parts['backward'])
    print(f'  {kernel_line}\n  AlexNet {alexnet:.0f} GFLOP/s ({alexnet_gflop_per_view(model, config):.2f} GFLOP per '
          f'{config.n_scales}-scale view); flow forward + backward {flow:.0f} GFLOP/s', flush=True)


def full_run(mode, args):
    out = os.path.join(args.results_dir, f'{mode}_{time.strftime("%Y%m%d_%H%M%S")}')
    command = [sys.executable, os.path.join(REPO_ROOT, 'main.py'), '--dataset_path', args.dataset_path,
               '--class_name', args.class_name, '--feature_cache', 'false', '--seed', '0',
               '--results_dir', out] + MODES[mode]
    if args.meta_epochs:
        command += ['--meta_epochs', str(args.meta_epochs)]
    start = time.time()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.time() - start
    if os.path.isdir(out):  # main.py's own output, with the time of each extraction, next to its results
        with open(os.path.join(out, 'run.log'), 'w') as handle:
            handle.write(result.stdout + result.stderr)
    if result.returncode != 0:
        print(f'full run {mode}: failed ({result.stderr.strip()[-300:]})', flush=True)
        return
    with open(os.path.join(out, 'results.json')) as handle:
        entry = json.load(handle)['classes'][0]
    print(f'full run {mode:9s} {args.class_name} {len(entry["auroc"])} x {entry["train_loss"] and len(entry["train_loss"][0])} '
          f'epochs: {wall / 60:6.1f} min wall (process start to exit), peak resident memory '
          f'{entry.get("job_peak_rss_gib", entry.get("process_peak_rss_gib")):.2f} GiB, last AUROC {entry["last_auroc"]:.4f}, max {entry["max_auroc"]:.4f} '
          f'(epoch {entry["max_auroc_epoch"]}); {out}', flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset_path', default=os.path.join(REPO_ROOT, '..', 'shared', 'data', 'mvtec'))
    parser.add_argument('--class_name', default='bottle')
    parser.add_argument('--extraction_views', type=int, default=64)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--full_run', nargs='*', default=[], choices=sorted(MODES))
    parser.add_argument('--meta_epochs', type=int, default=0, help='shorter schedule for --full_run (0: config)')
    parser.add_argument('--results_dir', default=os.path.join(REPO_ROOT, 'results', 'benchmark'))
    parser.add_argument('--skip_components', action='store_true')
    parser.add_argument('--components', nargs='+', default=COMPONENTS, choices=COMPONENTS,
                        help='which component figures to measure (default: all)')
    parser.add_argument('--breakdown_modes', nargs='+', default=['fp32', 'fp32_kept', 'bf16', 'bf16_kept'],
                        choices=['fp32', 'fp32_kept', 'bf16', 'bf16_kept'],
                        help='which sub-epoch breakdowns to run (default: all four)')
    parser.add_argument('--flow_kernels', nargs='+', default=['auto'], choices=['auto', 'default', 'onednn'],
                        help="cpu_flow_kernel of each breakdown (default: config's 'auto'); several compare them")
    args = parser.parse_args()
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, CPU count {os.cpu_count()}', flush=True)
    if not args.skip_components:
        state, _ = load_imagenet_alexnet_features()
        if 'extraction' in args.components:
            bench_extraction(state, args.extraction_views, args.repeats)
        if 'flow' in args.components:
            bench_flow(args.repeats, 96)
        if 'loading' in args.components:
            bench_loading(args.dataset_path, args.class_name, 24)
        if 'online' in args.components:
            for bf16, num_workers in ((False, 0), (False, 1), (True, 0), (True, 1)):
                bench_online_sub_epochs(state, args.dataset_path, args.class_name, bf16, num_workers)
        if 'limits' in args.components:
            bench_limits(96, 2048, args.repeats)
        if 'breakdown' in args.components:
            for mode in args.breakdown_modes:
                for flow_kernel in args.flow_kernels:
                    bench_sub_epoch_breakdown(state, args.dataset_path, args.class_name, mode.startswith('bf16'),
                                              mode.endswith('_kept'), flow_kernel)
    for mode in args.full_run:
        full_run(mode, args)


if __name__ == '__main__':
    main()
