"""The plots of a run: AUROC per meta epoch, ours against the references, each class's ROC curve and score
histogram; each written whole (atomic_files)."""
import math
import os
import warnings

import matplotlib
import numpy as np

from base.atomic_files import replace_atomically
from base.metrics import auroc_or_nan
from reporting.references import as_float, class_references, runs_by_class
from reporting.summary import mean_or_nan

matplotlib.use('Agg')  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import matplotlib.ticker  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402


def write_class_plots(results_dir, run, stem):
    """<stem>_scores.png (histograms of the last meta epoch's scores per defect type) and <stem>_roc.png (the
    ROC curves of the last and the best meta epoch)."""
    scores, labels = np.asarray(run['test_scores']), np.asarray(run['test_labels'])
    defect_types = np.asarray(run['test_defect_types'])
    figure, axis = plt.subplots(figsize=(7, 4.5))
    log_scores = np.log10(np.maximum(scores, 1e-12))
    bins = np.linspace(log_scores.min(), log_scores.max() + 1e-9, 30)
    for defect in sorted(set(defect_types), key=lambda d: (d not in ('good', 'ok'), d)):  # same colours every run
        axis.hist(log_scores[defect_types == defect], bins=bins, alpha=0.55, label=defect)
    axis.set_xlabel('log10 anomaly score (mean z² over views), last meta epoch')
    axis.set_ylabel('test images')
    axis.set_title(f"{run['class_name']} (seed {run['seed']}): test scores")
    axis.legend()
    figure.tight_layout()
    save_figure(figure, os.path.join(results_dir, f'{stem}_scores.png'))
    plt.close(figure)
    if len(np.unique(labels)) == 2:
        figure, axis = plt.subplots(figsize=(5, 5))
        for key, name in (('test_scores', 'last epoch'), ('best_test_scores', 'max epoch')):
            fpr, tpr, _ = roc_curve(labels, run[key])
            axis.plot(fpr, tpr, label=f'{name}: AUROC {auroc_or_nan(labels, run[key]):.4f}')
        axis.plot([0, 1], [0, 1], color='gray', linestyle=':')
        axis.set_xlabel('false positive rate')
        axis.set_ylabel('true positive rate')
        axis.set_title(f"{run['class_name']} (seed {run['seed']}): image-level ROC")
        axis.legend(loc='lower right')
        figure.tight_layout()
        save_figure(figure, os.path.join(results_dir, f'{stem}_roc.png'))
        plt.close(figure)


def save_figure(figure, path):
    replace_atomically(path, lambda part: figure.savefig(part, dpi=100, format='png'))


def write_auroc_plot(results_dir, runs):
    """auroc.png: AUROC per meta epoch, one line per class (mean over its seeds)."""
    by_class = {}
    for run in runs:
        by_class.setdefault(run['class_name'], []).append(run['auroc'])
    figure, axis = plt.subplots(figsize=(8, 5))
    for class_name, curves in by_class.items():
        length = min(len(curve) for curve in curves)
        with warnings.catch_warnings():  # an undefined AUROC (no anomalies) leaves a gap in the line
            warnings.simplefilter('ignore', RuntimeWarning)
            mean_curve = np.nanmean(np.array([curve[:length] for curve in curves], dtype=float), axis=0)
        label = class_name if len(curves) == 1 else f'{class_name} (mean of {len(curves)} seeds)'
        axis.plot(range(length), mean_curve, marker='o', markersize=3, label=label)
    axis.set_xlabel('meta epoch')
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    longest = max(min(len(curve) for curve in curves) for curves in by_class.values())
    axis.set_xlim(-0.5, max(longest - 1, 1) + 0.5)  # one meta epoch alone would get fractional ticks
    axis.set_ylabel('image-level AUROC')
    axis.set_title('AUROC after each meta epoch')
    axis.grid(alpha=0.3)
    axis.legend(fontsize='small', ncol=2 if len(by_class) > 8 else 1)
    figure.tight_layout()
    save_figure(figure, os.path.join(results_dir, 'auroc.png'))
    plt.close(figure)


def write_paper_comparison_plot(results_dir, runs):
    """paper_comparison.png: per class, our max and last AUROC (mean over seeds, bars: sample std) against
    the paper's and the published reproduction's max."""
    by_class = runs_by_class(runs)
    positions = np.arange(len(by_class))
    figure, axis = plt.subplots(figsize=(max(6.5, 0.55 * len(by_class) + 4.5), 4.5), layout='constrained')
    for offset, key, label, marker in ((-0.12, 'max_auroc', 'ours, max', 'o'), (0.12, 'last_auroc', 'ours, last', 's')):
        values = [[as_float(r[key]) for r in class_runs] for class_runs in by_class.values()]
        means = [mean_or_nan(v) for v in values]
        spreads = [float(np.std([x for x in v if not math.isnan(x)], ddof=1))
                   if sum(not math.isnan(x) for x in v) > 1 else 0.0 for v in values]
        axis.errorbar(positions + offset, means, yerr=spreads, fmt=marker, capsize=3, label=label)
    references = [class_references(name, class_runs) for name, class_runs in by_class.items()]
    axis.scatter(positions, [r['paper'] for r in references], marker='_', s=500, linewidths=2.5, color='black',
                 label='paper', zorder=3)
    axis.scatter(positions, [r['reproduction_max'] for r in references], marker='x', s=40, color='tab:red',
                 label='published reproduction, max', zorder=3)
    axis.set_xticks(positions)
    if len(by_class) > 6:
        axis.set_xticklabels(list(by_class), rotation=45, ha='right', rotation_mode='anchor')
    else:
        axis.set_xticklabels(list(by_class))
    axis.set_xlim(-0.6, len(by_class) - 0.4)
    shown = [value for value in axis.get_ylim()]
    axis.set_ylim(max(0.0, shown[0] - 0.01), min(1.005, max(shown[1], 1.0) + 0.005))  # room up to a perfect 1.0
    axis.set_ylabel('image-level AUROC')
    axis.set_title('Ours against the paper and a published reproduction')
    axis.grid(alpha=0.3, axis='y')
    axis.legend(fontsize='small', loc='upper left', bbox_to_anchor=(1.01, 1.0))  # outside: never over a marker
    save_figure(figure, os.path.join(results_dir, 'paper_comparison.png'))
    plt.close(figure)
