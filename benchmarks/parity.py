"""Does a speed-up move AUROC? Runs main.py once per (mode, seed) and prints mean +- std per mode.

    python benchmarks/parity.py --modes online pool16 --seeds 0 1 2 --meta_epochs 4 --sub_epochs 8

Each mode is a set of main.py options (MODES below); everything else is config.py's. Results of every
run stay in --out (one folder per run, with its results.json); the table is also written there.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODES = {
    'online': ['--train_feature_pool', '0'],  # the official on-line augmentation
    'pool16': ['--train_feature_pool', '16'],
    'pool32': ['--train_feature_pool', '32'],
    'online_bf16': ['--train_feature_pool', '0', '--bf16_autocast', 'true'],
    'online_auto': ['--train_feature_pool', '0', '--bf16_autocast', 'auto'],  # bf16 only where native
    'pool16_bf16': ['--train_feature_pool', '16', '--bf16_autocast', 'true'],
    'official_test_views': ['--train_feature_pool', '0', '--cache_test_features', 'false'],
}


def mean_std(values):
    return f'{statistics.mean(values):.4f} +- {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--modes', nargs='+', default=['online', 'pool16'], choices=sorted(MODES))
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--dataset_path', default=os.path.join(REPO_ROOT, '..', 'shared', 'data', 'mvtec'))
    parser.add_argument('--class_name', default='bottle')
    parser.add_argument('--meta_epochs', type=int, default=4)
    parser.add_argument('--sub_epochs', type=int, default=8)
    parser.add_argument('--out', default=os.path.join(REPO_ROOT, 'results', 'parity'))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    runs = {mode: [] for mode in args.modes}
    for seed in args.seeds:  # seed-major, so an interrupted sweep still compares the modes
        for mode in args.modes:
            out = os.path.join(args.out, f'{mode}_seed{seed}')
            results_file = os.path.join(out, 'results.json')
            if not os.path.isfile(results_file):  # finished runs are kept, so the script can be resumed
                with open(os.path.join(args.out, f'{mode}_seed{seed}.log'), 'w') as log:
                    subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'main.py'), '--dataset_path',
                                    args.dataset_path, '--class_name', args.class_name, '--seed', str(seed),
                                    '--meta_epochs', str(args.meta_epochs), '--sub_epochs', str(args.sub_epochs),
                                    '--feature_cache_dir', os.path.join(args.out, 'feature_cache'),
                                    '--results_dir', out, *MODES[mode]], check=True, stdout=log)
            with open(results_file) as handle:
                entry = json.load(handle)['classes'][0]
            runs[mode].append(entry)
            print(f'{mode} seed {seed}: last {entry["last_auroc"]:.4f} max {entry["max_auroc"]:.4f} '
                  f'(epoch {entry["max_auroc_epoch"]}), {entry["wall_time_s"] / 60:.1f} min', flush=True)
    rows = []
    for mode, entries in runs.items():
        rows.append(f'| {mode} | {" ".join(MODES[mode])} | {mean_std([e["last_auroc"] for e in entries])} | '
                    f'{mean_std([e["max_auroc"] for e in entries])} | '
                    f'{statistics.mean(e["wall_time_s"] for e in entries) / 60:.1f} |')
    table = '\n'.join([f'{args.class_name}, {args.meta_epochs} x {args.sub_epochs} epochs, seeds {args.seeds}',
                       '| mode | options | last AUROC | max AUROC | minutes per run |', '|---|---|---|---|---|'] + rows)
    print(table)
    with open(os.path.join(args.out, 'parity.md'), 'w') as handle:
        handle.write(table + '\n')


if __name__ == '__main__':
    main()
