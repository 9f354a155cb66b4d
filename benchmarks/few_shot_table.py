"""The 16-image claim: image AUROC against the number of training images, as a table and a plot.

    python benchmarks/few_shot_table.py --runs docs/evidence/fewshot*.results.json \
        --full bottle=0.9881,0.9897,209 screw=0.9268,0.9516,200 --plot docs/few_shot.png

Each run (a results folder, or the results.json that benchmarks/evidence_runs.sh keeps in docs/evidence/) is
a run of `main.py --n_train_images K` (one class, one or more seeds); `--full` gives the full-data runs'
last and max AUROC (seed 0, the paper's schedule; optionally the number of images) for the last point of
each class, or a full-data run's folder is given with --runs. Prints a markdown table; asserts nothing.
"""
import argparse
import json
import os
import sys

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from reporting.summary import mean_std_text  # noqa: E402


def collect(run_dirs, full):
    """{class: {n_images: {'last': [...], 'max': [...], 'of': training images available}}}"""
    table = {}
    for run in run_dirs:
        path = run if run.endswith('.json') else os.path.join(run, 'results.json')
        if not os.path.isfile(path):
            print(f'(no results yet in {run})', file=sys.stderr)
            continue
        with open(path) as handle:
            results = json.load(handle)
        for entry in results['classes']:
            if entry.get('status') != 'done':
                continue
            n_images = entry['n_train_images']
            row = table.setdefault(entry['class_name'], {}).setdefault(
                n_images, {'last': [], 'max': [], 'of': entry.get('train_subset_of', n_images)})
            row['last'].append(entry['last_auroc'])
            row['max'].append(entry['max_auroc'])
    for item in full:
        name, values = item.split('=')
        last, best, *size = values.split(',')
        last, best = float(last), float(best)
        rows = table.setdefault(name, {})
        available = int(size[0]) if size else max((row['of'] for row in rows.values()), default=0)
        rows.setdefault(available or 'all', {'last': [last], 'max': [best], 'of': available})
    return table


def markdown(table):
    lines = ['| class | training images | runs (seeds) | last AUROC | max AUROC |', '|---|---|---|---|---|']
    for name, rows in table.items():
        for n_images in sorted(rows, key=lambda n: (isinstance(n, str), n)):
            row = rows[n_images]
            label = f'{n_images} of {row["of"]}' if row['of'] and n_images != row['of'] else f'{n_images} (all)'
            lines.append(f'| {name} | {label} | {len(row["last"])} | {mean_std_text(row["last"])} | '
                         f'{mean_std_text(row["max"])} |')
    return '\n'.join(lines)


def plot(table, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for name, rows in table.items():
        sizes = sorted(n for n in rows if not isinstance(n, str))
        means = [np.mean(rows[n]['last']) for n in sizes]
        spreads = [np.std(rows[n]['last'], ddof=1) if len(rows[n]['last']) > 1 else 0.0 for n in sizes]
        axis.errorbar(sizes, means, yerr=spreads, marker='o', capsize=3, label=f'{name}, last AUROC')
    axis.set_xscale('log', base=2)
    axis.set_xlabel('training images (log scale; the last point: all)')
    axis.set_ylabel('image-level AUROC')
    axis.set_title('DifferNet with few training images (24 x 8 epochs)')
    axis.grid(alpha=0.3)
    axis.legend(fontsize='small')
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f'plot: {path}')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--runs', nargs='+', required=True)
    parser.add_argument('--full', nargs='*', default=[], metavar='CLASS=LAST,MAX[,N_IMAGES]')
    parser.add_argument('--plot', default='')
    args = parser.parse_args()
    table = collect(args.runs, args.full)
    print(markdown(table))
    if args.plot:
        plot(table, args.plot)


if __name__ == '__main__':
    main()
