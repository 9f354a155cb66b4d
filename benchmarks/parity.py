"""Does a speed-up move AUROC? Runs main.py once per (mode, seed), prints mean +- std per mode, the
paired differences against a baseline mode with the verdict of the rule below, and plots every run's
AUROC curve.

    python benchmarks/parity.py --modes online online_auto official_test_views --seeds 0 1 2 \\
        --meta_epochs 8 --sub_epochs 8
    python benchmarks/parity.py ... --jobs 9            # 9 runs at once (a GPU has room; a 2-core CPU has not)
    python benchmarks/parity.py ... -- --weights_path alexnet.pth   # anything after -- goes to main.py

Each mode is a set of main.py options (MODES below); everything else is config.py's, except that no
checkpoint or resume state is written (parity needs only AUROC). Results of every run stay in --out (one
folder per run, with its results.json); finished runs are kept, so an interrupted sweep can be resumed.

The rule (docs/faithfulness.md), applied per class to each pair in PAIRS: a speed-up shows a direction
when, for max or for last AUROC, its paired differences (speed-up minus baseline, same seed) all have
the same sign AND their mean is larger in size than the seed-to-seed spread (the standard deviation over
seeds of the baseline's values). It becomes or stays a default only if it shows no direction on every
class measured.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODES = {
    'online': ['--train_feature_pool', '0'],  # the official on-line augmentation
    'pool16': ['--train_feature_pool', '16'],
    'pool32': ['--train_feature_pool', '32'],
    'pool64': ['--train_feature_pool', '64'],
    'online_bf16': ['--train_feature_pool', '0', '--bf16_autocast', 'true'],
    'online_auto': ['--train_feature_pool', '0', '--bf16_autocast', 'auto'],  # bf16 only where native
    'online_fp32': ['--train_feature_pool', '0', '--bf16_autocast', 'false'],
    'pool16_bf16': ['--train_feature_pool', '16', '--bf16_autocast', 'true'],
    'pool16_fp32': ['--train_feature_pool', '16', '--bf16_autocast', 'false'],
    'official_test_views': ['--train_feature_pool', '0', '--cache_test_features', 'false'],
}
# what the plot's legend calls a mode (default: its name)
LABELS = {'online': 'online: defaults (fp32, test views cached)', 'online_auto': 'online_auto: bf16 where faster',
          'official_test_views': 'official_test_views: fp32, fresh test views'}
# (speed-up, baseline) pairs the rule is applied to, when both modes ran
PAIRS = [('online_auto', 'online'), ('online_bf16', 'online'), ('online', 'official_test_views'),
         ('pool16', 'online'), ('pool16_fp32', 'online'), ('pool16_bf16', 'online_bf16'), ('pool16_bf16', 'online_auto')]
NO_FILES = ['--save_checkpoint', 'false', '--resume_state', 'false']


def seed_spread(values):
    """The standard deviation over seeds (0 for one seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std(values):
    return f'{statistics.mean(values):.4f} +- {seed_spread(values):.4f}'


def verdict(differences, baseline_values):
    """'none', '+' or '-': the direction the paired differences show beyond the seed-to-seed spread."""
    if len(differences) < 2:
        return 'n/a (1 seed)'
    spread = seed_spread(baseline_values)
    mean = statistics.mean(differences)
    same_sign = all(d > 0 for d in differences) or all(d < 0 for d in differences)
    if same_sign and abs(mean) > spread:
        return '+' if mean > 0 else '-'
    return 'none'


def run_command(args, mode, seed, out):
    return [sys.executable, os.path.join(REPO_ROOT, 'main.py'), '--dataset_path', args.dataset_path,
            '--class_name', args.class_name, '--seed', str(seed), '--meta_epochs', str(args.meta_epochs),
            '--sub_epochs', str(args.sub_epochs), '--feature_cache_dir', os.path.join(args.out, 'feature_cache'),
            '--results_dir', out, *NO_FILES, *MODES[mode], *args.main_args]


def run_all(args, todo):
    """Runs the (mode, seed) pairs in `todo`, at most --jobs at once; returns the ones that failed."""
    waiting, running, failed = list(todo), {}, []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`/`kill`: stop the runs, keep what they wrote
    try:
        return run_queue(args, waiting, running, failed)
    finally:
        for process, log in running.values():
            process.terminate()
            process.wait()
            log.close()


def run_queue(args, waiting, running, failed):
    while waiting or running:
        while waiting and len(running) < args.jobs:
            mode, seed = waiting.pop(0)
            out = os.path.join(args.out, f'{mode}_seed{seed}')
            log = open(os.path.join(args.out, f'{mode}_seed{seed}.log'), 'w')
            running[(mode, seed)] = (subprocess.Popen(run_command(args, mode, seed, out), stdout=log,
                                                      stderr=subprocess.STDOUT), log)
        time.sleep(1)
        for key, (process, log) in list(running.items()):
            if process.poll() is not None:
                log.close()
                del running[key]
                if process.returncode != 0:
                    failed.append(key)
                    print(f'{key[0]} seed {key[1]}: main.py exited {process.returncode}; see '
                          f'{os.path.join(args.out, f"{key[0]}_seed{key[1]}.log")}', flush=True)
    return failed


def read_entry(args, mode, seed):
    results_file = os.path.join(args.out, f'{mode}_seed{seed}', 'results.json')
    if not os.path.isfile(results_file):
        return None
    with open(results_file) as handle:
        results = json.load(handle)
    # a finished run is in 'classes'; a run stopped part way left its meta epochs so far in 'in_progress'
    entry = results['classes'][0] if results.get('classes') else results.get('in_progress')
    if not entry or not entry.get('auroc'):
        return None
    if 'last_auroc' not in entry:  # a run stopped early: its curve so far, marked partial
        curve = entry['auroc']
        entry.update(last_auroc=curve[-1], max_auroc=max(curve), max_auroc_epoch=curve.index(max(curve)),  # 0-based, as the official observer
                     wall_time_s=float('nan'), partial=True)
    return entry


def plot_curves(args, entries, path):
    """One thin line per run, one colour per mode; the legend counts the runs of each mode."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for index, mode in enumerate(args.modes):
        runs = [entries[(mode, seed)] for seed in args.seeds if (mode, seed) in entries]
        for run_index, entry in enumerate(runs):
            axis.plot(range(1, len(entry['auroc']) + 1), entry['auroc'], color=colors[index % len(colors)],
                      linewidth=1.2, alpha=0.8, label=f'{LABELS.get(mode, mode)} ({len(runs)} seed{"s" if len(runs) > 1 else ""})'
                      if run_index == 0 else None)
    axis.set_xlabel('meta epoch')
    axis.set_ylabel('image AUROC')
    axis.set_title(f'{args.class_name}: {args.meta_epochs} x {args.sub_epochs} epochs, one line per run', fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def report(args, entries):
    lines = [f'{args.class_name}, {args.meta_epochs} x {args.sub_epochs} epochs, seeds {args.seeds}',
             '| mode | options | runs | last AUROC | max AUROC | minutes per run |', '|---|---|---|---|---|---|']
    for mode in args.modes:
        done = [entries[(mode, seed)] for seed in args.seeds if (mode, seed) in entries]
        if done:
            lines.append(f'| {mode} | {" ".join(MODES[mode])} | {len(done)} | '
                         f'{mean_std([e["last_auroc"] for e in done])} | {mean_std([e["max_auroc"] for e in done])} | '
                         f'{statistics.mean(e["wall_time_s"] for e in done) / 60:.1f} |')
    pair_lines = []
    for faster, baseline in PAIRS:
        seeds = [s for s in args.seeds if (faster, s) in entries and (baseline, s) in entries]
        if faster not in args.modes or baseline not in args.modes or not seeds:
            continue
        cells = []
        for key in ('max_auroc', 'last_auroc'):
            differences = [entries[(faster, s)][key] - entries[(baseline, s)][key] for s in seeds]
            base = [entries[(baseline, s)][key] for s in seeds]
            cells.append(f'{" ".join(f"{d:+.4f}" for d in differences)} (mean {statistics.mean(differences):+.4f}, '
                         f'spread {seed_spread(base):.4f}): {verdict(differences, base)}')
        pair_lines.append(f'| {faster} - {baseline} | {len(seeds)} | {cells[0]} | {cells[1]} |')
    if pair_lines:
        lines += ['', 'Paired differences (same seed); direction beyond the seed-to-seed spread ("none" passes the rule)',
                  '| pair | seeds | max AUROC | last AUROC |', '|---|---|---|---|'] + pair_lines
    lines += ['', 'AUROC per meta epoch', '| run | ' + ' | '.join(str(i + 1) for i in range(args.meta_epochs)) + ' |',
              '|---|' + '---|' * args.meta_epochs]
    for mode in args.modes:
        for seed in args.seeds:
            entry = entries.get((mode, seed))
            if entry:
                lines.append(f'| {mode} seed {seed} | ' + ' | '.join(f'{a:.4f}' for a in entry['auroc']) + ' |')
    return '\n'.join(lines)


def main():
    argv = sys.argv[1:]
    main_args = argv[argv.index('--') + 1:] if '--' in argv else []
    argv = argv[:argv.index('--')] if '--' in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--modes', nargs='+', default=['online', 'pool16'], choices=sorted(MODES))
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--dataset_path', default=os.path.join(REPO_ROOT, '..', 'shared', 'data', 'mvtec'))
    parser.add_argument('--class_name', default='bottle')
    parser.add_argument('--meta_epochs', type=int, default=4)
    parser.add_argument('--sub_epochs', type=int, default=8)
    parser.add_argument('--jobs', type=int, default=1, help='runs at once (default 1)')
    parser.add_argument('--report_only', action='store_true', help='only read finished runs, run nothing')
    parser.add_argument('--out', default=os.path.join(REPO_ROOT, 'results', 'parity'))
    args = parser.parse_args(argv)
    args.main_args = main_args
    os.makedirs(args.out, exist_ok=True)
    # seed-major, so an interrupted sweep still compares the modes
    todo = [(mode, seed) for seed in args.seeds for mode in args.modes if read_entry(args, mode, seed) is None]
    failed = [] if args.report_only else run_all(args, todo)
    entries = {(mode, seed): entry for mode in args.modes for seed in args.seeds
               if (entry := read_entry(args, mode, seed)) is not None}
    for (mode, seed), entry in sorted(entries.items(), key=lambda item: (item[0][1], item[0][0])):
        print(f'{mode} seed {seed}: last {entry["last_auroc"]:.4f} max {entry["max_auroc"]:.4f} '
              f'(epoch {entry["max_auroc_epoch"]}), {len(entry["auroc"])} meta epochs'
              f'{" (stopped early)" if entry.get("partial") else ""}, {entry["wall_time_s"] / 60:.1f} min', flush=True)
    table = report(args, entries)
    print(table)
    with open(os.path.join(args.out, 'parity.md'), 'w') as handle:
        handle.write(table + '\n')
    if entries:
        plot_curves(args, entries, os.path.join(args.out, 'parity_curves.png'))
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
