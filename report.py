"""The results report of a run: results.md and results.csv (our image AUROC per class, beside the paper's
and a published reproduction's), the plots (AUROC per meta epoch, ours against the paper, each class's ROC
curve and score histogram), each class's score list, and report.html, one page that holds all of it.

`write_results_files` writes them all, each to a temporary name and renamed (utils.replace_atomically);
main.run calls it after every meta epoch and every class, so the folder always describes the run as far as
it got, and a reader never opens half a file.

The reference columns (results.md, results.csv, report.html) are a small set on purpose:

    Paper                 Table 1 of the paper (printed in %, shown as a fraction like ours)
    Max - paper           our max AUROC (mean over seeds) minus the paper's
    Reproduction last     the published reproduction's last-meta-epoch AUROC (it gives none for BTAD)
    Reproduction max      its max AUROC over the 24 meta epochs
    Max - reproduction    our max minus its max

Differences use our max, not our last AUROC: the paper does not say which meta epoch it reports, and of the
reproduction's two columns its max is the one near the paper (means 0.9409 max and 0.9246 last against the
paper's 0.9469), so max against max is the like-for-like reading. A class with another name gets empty
reference cells, and so does an MVTec class whose image counts are not the official split's (a subset or a
re-split; a note under the table says so). The mean row averages each column over the classes that have a
value in it (a difference over the classes that have both sides) and says how many when that is fewer than the
classes that ran.
"""
import base64
import csv
import html
import io
import math
import os
import warnings

import numpy as np

from utils import auroc_or_nan, replace_atomically, write_json_atomic, write_text_atomic

REFERENCE_SOURCES = {
    'paper': ('Rudolph, Wandt, Rosenhahn, "Same Same But DifferNet: Semi-Supervised Defect Detection with '
              'Normalizing Flows", WACV 2021, Table 1 of arXiv 2008.12577 (image AUROC in %, MVTec AD only)'),
    'reproduction': ('a published reproduction (a public GitHub README) that ran the official code with the '
                     "paper's 24 x 8 epochs on NVIDIA L4 GPUs; last and max AUROC over the 24 meta epochs; "
                     'its BTAD classes were rearranged by hand and reported without a last AUROC'),
}

# class: (paper Table 1 in %, reproduction last AUROC, reproduction max AUROC); None where the source has none.
# The reproduction's values are those its README reports. Of the paper's, the printed mean 94.9 is confirmed by
# later papers' tables citing DifferNet (e.g. PatchCore's Table 1); the class values could not be re-read from
# the paper's own text where this was written and are as transcribed from its Table 1 for issue 10.
REFERENCE_AUROC = {
    'bottle': (99.0, 0.9881, 0.9921),
    'cable': (95.9, 0.9496, 0.9665),
    'capsule': (86.9, 0.8089, 0.8432),
    'carpet': (92.9, 0.9057, 0.9109),
    'grid': (84.0, 0.7109, 0.7937),
    'hazelnut': (99.3, 0.9939, 0.9979),
    'leather': (97.1, 0.9813, 0.9823),
    'metal_nut': (96.1, 0.9580, 0.9619),
    'pill': (88.8, 0.8669, 0.8792),
    'screw': (96.3, 0.9424, 0.9572),
    'tile': (99.4, 0.9751, 0.9978),
    'toothbrush': (98.6, 0.9722, 0.9833),
    'transistor': (91.1, 0.8983, 0.9142),
    'wood': (99.8, 0.9930, 0.9974),
    'zipper': (95.1, 0.9249, 0.9359),
    '01': (None, None, 0.9903),  # BTAD: the paper has no BTAD results
    '02': (None, None, 0.8298),
    '03': (None, None, 0.9870),
}
# MVTec AD's official split, class: (training images, test images); totals 3,629 and 1,725, as the dataset's
# paper gives. The references were measured on it; a run with other counts (a subset, a re-split) gets no
# reference cells, and a note says why.
OFFICIAL_SPLIT = {
    'bottle': (209, 83), 'cable': (224, 150), 'capsule': (219, 132), 'carpet': (280, 117), 'grid': (264, 78),
    'hazelnut': (391, 110), 'leather': (245, 124), 'metal_nut': (220, 115), 'pill': (267, 167),
    'screw': (320, 160), 'tile': (230, 117), 'toothbrush': (60, 42), 'transistor': (213, 100),
    'wood': (247, 79), 'zipper': (240, 151),
}
PAPER_PRINTED_MEAN = 94.9  # the mean the paper prints under Table 1
PAPER_COMPUTED_MEAN = float(np.mean([paper for paper, _, _ in REFERENCE_AUROC.values() if paper is not None]))
PAPER_NOTE = (f'The paper prints the mean of Table 1 as {PAPER_PRINTED_MEAN} %, but its fifteen class values '
              f'average {PAPER_COMPUTED_MEAN:.1f} % ({PAPER_COMPUTED_MEAN:.2f}); the mean rows here are computed, '
              f'so over all fifteen MVTec AD classes the paper column reads {PAPER_COMPUTED_MEAN / 100:.4f}.')
REFERENCE_COLUMNS = [('paper', 'Paper (Table 1)'), ('max_minus_paper', 'Max − paper'),
                     ('reproduction_last', 'Reproduction last'), ('reproduction_max', 'Reproduction max'),
                     ('max_minus_reproduction', 'Max − reproduction')]
CSV_REFERENCE_COLUMNS = ['paper_auroc', 'max_minus_paper', 'reproduction_last_auroc', 'reproduction_max_auroc',
                         'max_minus_reproduction']
MAX_GALLERY_MAPS = 12  # gradient maps shown per class in report.html: enough to judge them, the page stays small


def as_float(value):
    return float('nan') if value is None else float(value)


def mean_std_text(values, digits=4):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return 'n/a'
    if len(values) == 1:
        return f'{values[0]:.{digits}f}'
    return f'{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}'


def summary_rows(runs):
    """One row per class (in first-seen order) with Last AUROC, Max AUROC, Max AUROC Epoch, each as
    mean ± std over the class's seeds, then a mean row over the classes."""
    by_class = {}
    for run in runs:
        by_class.setdefault(run['class_name'], []).append(run)
    with_pixels = any(r.get('pixel_auroc') is not None for r in runs)
    rows = []
    for class_name, class_runs in by_class.items():
        rows.append([class_name, mean_std_text([r['last_auroc'] for r in class_runs]),
                     mean_std_text([r['max_auroc'] for r in class_runs]),
                     mean_std_text([r['max_auroc_epoch'] for r in class_runs], digits=1 if len(class_runs) > 1 else 0),
                     len(class_runs)] + ([mean_std_text([r.get('pixel_auroc') for r in class_runs])] if with_pixels else []))
    if len(by_class) > 1:
        class_means = {key: [mean_or_nan([as_float(r[key]) for r in class_runs]) for class_runs in by_class.values()]
                       for key in ('last_auroc', 'max_auroc')}
        rows.append(['mean', f"{mean_or_nan(class_means['last_auroc']):.4f}",
                     f"{mean_or_nan(class_means['max_auroc']):.4f}", '', sum(len(v) for v in by_class.values())]
                    + ([''] if with_pixels else []))
    return rows


def mean_or_nan(values):
    finite = [value for value in values if not math.isnan(value)]
    return float(np.mean(finite)) if finite else float('nan')


def markdown_table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows]
    return '\n'.join(lines)


def defect_type_rows(runs):
    """Rows (class, defect type, AUROC at the last meta epoch, at the max epoch), mean ± std over seeds."""
    collected = {}
    for run in runs:
        for when in ('last', 'best'):
            for defect, value in run.get(f'defect_type_auroc_{when}', {}).items():
                collected.setdefault((run['class_name'], defect), {'last': [], 'best': []})[when].append(value)
    return [[class_name, defect, mean_std_text(values['last']), mean_std_text(values['best'])]
            for (class_name, defect), values in collected.items()]


def reference_auroc(class_name):
    """The references of a class name as fractions: {'paper', 'reproduction_last', 'reproduction_max'},
    nan where the source has no value (BTAD in the paper, BTAD's last AUROC, any other name)."""
    paper, last, best = REFERENCE_AUROC.get(class_name, (None, None, None))
    return {'paper': as_float(paper) / 100, 'reproduction_last': as_float(last), 'reproduction_max': as_float(best)}


def split_mismatch(class_name, class_runs):
    """Why the runs of `class_name` are not compared with the references, or '': their training (validation
    images included) and test image counts differ from MVTec AD's official split. Runs that record no counts
    are compared."""
    official = OFFICIAL_SPLIT.get(class_name)
    if official is None:
        return ''
    for run in class_runs:
        if 'n_train_images' not in run or 'n_test_images' not in run:
            continue
        counts = (run['n_train_images'] + run.get('n_validation_images', 0), run['n_test_images'])
        if counts != official:
            return (f"{class_name}: {counts[0]} training and {counts[1]} test images, not MVTec AD's official split "
                    f'({official[0]} and {official[1]}): not compared with the paper or the reproduction, whose '
                    'numbers are for that split')
    return ''


def class_references(class_name, class_runs):
    """reference_auroc of the class, or all nan when its runs used another split (split_mismatch)."""
    if split_mismatch(class_name, class_runs):
        return {key: float('nan') for key in reference_auroc(class_name)}
    return reference_auroc(class_name)


def split_notes(runs):
    return [note for name, class_runs in runs_by_class(runs).items() if (note := split_mismatch(name, class_runs))]


def runs_by_class(runs):
    by_class = {}
    for run in runs:
        by_class.setdefault(run['class_name'], []).append(run)
    return by_class


def reference_records(runs):
    """One dict per class (first-seen order): our last and max AUROC (means over seeds) and the reference
    columns (REFERENCE_COLUMNS), nan where absent."""
    records = []
    for class_name, class_runs in runs_by_class(runs).items():
        record = {'class_name': class_name,
                  'last': mean_or_nan([as_float(r['last_auroc']) for r in class_runs]),
                  'max': mean_or_nan([as_float(r['max_auroc']) for r in class_runs])}
        record.update(class_references(class_name, class_runs))
        record['max_minus_paper'] = record['max'] - record['paper']
        record['max_minus_reproduction'] = record['max'] - record['reproduction_max']
        records.append(record)
    return records


def has_references(runs):
    return any(name in REFERENCE_AUROC and not split_mismatch(name, class_runs)
               for name, class_runs in runs_by_class(runs).items())


def reference_cell(value, key, mean=False):
    if math.isnan(value):
        return ''
    if key.startswith('max_minus'):
        return f'{value:+.4f}'
    return f'{value:.3f}' if key == 'paper' and not mean else f'{value:.4f}'  # Table 1 has three digits


def mean_reference_cells(records, annotate=True):
    """The mean row's reference cells: each column over the classes that have it, with '(n=k)' when that is
    fewer than all of them and `annotate`."""
    cells = []
    for key, _ in REFERENCE_COLUMNS:
        values = [r[key] for r in records if not math.isnan(r[key])]
        cell = reference_cell(mean_or_nan(values), key, mean=True)
        if values and annotate and len(values) < len(records):
            cell += f' (n={len(values)})'
        cells.append(cell)
    return cells


def reference_cells(runs, annotate=True):
    """[cells of REFERENCE_COLUMNS] per summary row: one per class, then the mean row's when there is one
    (summary_rows adds a mean row for more than one class)."""
    records = reference_records(runs)
    rows = [[reference_cell(r[key], key) for key, _ in REFERENCE_COLUMNS] for r in records]
    if len(records) > 1:
        rows.append(mean_reference_cells(records, annotate))
    return rows


def comparison_rows(runs):
    """Rows of the table against the references: class, our last and max AUROC (means over seeds), then
    REFERENCE_COLUMNS; a mean row for more than one class."""
    records = reference_records(runs)
    rows = [[r['class_name'], reference_cell(r['last'], 'last'), reference_cell(r['max'], 'max')] for r in records]
    if len(records) > 1:
        rows.append(['mean', reference_cell(mean_or_nan([r['last'] for r in records]), 'last'),
                     reference_cell(mean_or_nan([r['max'] for r in records]), 'max')])
    return [row + cells for row, cells in zip(rows, reference_cells(runs))]


def reference_notes():
    return [f"Paper: {REFERENCE_SOURCES['paper']}. {PAPER_NOTE}",
            f"Reproduction: {REFERENCE_SOURCES['reproduction']}.",
            'Differences are our max AUROC (mean over seeds) minus the reference; empty cells: the source has no '
            'value for that class.']


def results_markdown(results, deviations):
    """The text of results.md, also printed at the end of a run."""
    header = ['Class', 'Last AUROC', 'Max AUROC', 'Max AUROC Epoch', 'Runs']
    if any(r.get('pixel_auroc') is not None for r in results['classes']):
        header.append('Pixel AUROC, last epoch (ours: not reported by the paper)')
    parts = ['## Image-level AUROC', '', markdown_table(header, summary_rows(results['classes']))]
    notes = split_notes(results['classes'])
    if notes:
        parts += [''] + [f'- {note}' for note in notes]
    if results.get('failed'):
        parts += ['', 'Failed:'] + [f"- {f['class_name']}" + (f" (seed {f['seed']})" if f['seed'] is not None else '')
                                    + f": {f['error']}" for f in results['failed']]
    if results.get('in_progress'):
        entry = results['in_progress']
        parts += ['', f"In progress: {entry['class_name']} (seed {entry['seed']}), {len(entry['auroc'])} meta "
                      f"epoch(s) finished, AUROC per meta epoch: "
                      + ', '.join('n/a' if a is None or math.isnan(a) else f'{a:.4f}' for a in entry['auroc'])]
    if has_references(results['classes']):
        parts += ['', '## Against the paper and a published reproduction (image AUROC)', '',
                  markdown_table(['Class', 'Last AUROC', 'Max AUROC'] + [title for _, title in REFERENCE_COLUMNS],
                                 comparison_rows(results['classes'])), '']
        parts += [f'- {note}' for note in reference_notes()]
    defect_rows = defect_type_rows(results['classes'])
    if defect_rows:
        parts += ['', '## AUROC per defect type (each type against the good test images)', '',
                  markdown_table(['Class', 'Defect type', 'AUROC (last epoch)', 'AUROC (max epoch)'], defect_rows)]
    parts += ['', '## Settings that differ from the paper / official code', '']
    parts += [f'- `{name}` = {value!r} (paper/official: {reference!r})' for name, value, reference in deviations] \
        or ['- none']
    return '\n'.join(parts) + '\n'


def results_csv(results):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(['class', 'last_auroc', 'max_auroc', 'max_auroc_epoch', 'runs']
                    + (['pixel_auroc'] if any(r.get('pixel_auroc') is not None for r in results['classes']) else [])
                    + CSV_REFERENCE_COLUMNS)
    writer.writerows(row + cells for row, cells in zip(summary_rows(results['classes']),
                                                       reference_cells(results['classes'], annotate=False)))
    writer.writerow([])
    writer.writerow(['class', 'seed', 'last_auroc', 'max_auroc', 'max_auroc_epoch', 'wall_time_s'])
    for run in results['classes']:
        writer.writerow([run['class_name'], run['seed'], run['last_auroc'], run['max_auroc'],
                         run['max_auroc_epoch'], run['wall_time_s']])
    return buffer.getvalue()


def run_file_stem(run, seeds):
    """'<class>', or '<class>_seed<seed>' in a run of several seeds."""
    return f"{run['class_name']}_seed{run['seed']}" if len(seeds) > 1 else run['class_name']


def write_class_files(results_dir, run, stem):
    """<stem>_scores.csv (last and best epoch), <stem>_scores.png (histograms), <stem>_roc.png."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(['file', 'label', 'defect_type', 'score_last_epoch', 'score_max_epoch'])
    for row in zip(run['test_files'], run['test_labels'], run['test_defect_types'], run['test_scores'],
                   run['best_test_scores']):
        writer.writerow(row)
    write_text_atomic(os.path.join(results_dir, f'{stem}_scores.csv'), buffer.getvalue())

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve
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
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import matplotlib.ticker
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
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
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
                 label='paper (Table 1)', zorder=3)
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


# --- report.html -------------------------------------------------------------------------------------

REPORT_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; margin: 1.5em auto; max-width: 1150px;
       padding: 0 1em; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
h3 { margin-bottom: 0.3em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f3f7; } td:first-child, th:first-child { text-align: left; }
tr.mean-row td { font-weight: 600; background: #fafafa; }
td.better { color: #0a7a2f; } td.worse { color: #b3261e; }
.meta, .note { color: #555; font-size: 0.9em; } .warn { color: #b3261e; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.figures img { max-width: 100%; border: 1px solid #eee; }
.pair { display: grid; gap: 1em; align-items: start; }
.pair img { width: 100%; border: 1px solid #eee; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 0.6em; }
.gallery figure { margin: 0; } .gallery img { width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.8em; color: #555; }
table.settings td, table.settings th { text-align: left; font-family: ui-monospace, monospace; font-size: 0.9em; }
tr.deviation td { background: #fff4e5; }
"""

_embedded_images = {}  # absolute path -> ((mtime, size, width, format), data URI): report.html is rebuilt often


def image_data_uri(path, max_width, image_format='PNG'):
    """The image at `path` as a data URI: a PNG no wider than `max_width` as its own bytes; anything else
    scaled down to `max_width` pixels wide and re-encoded (JPEG, quality 85, for the photographs of the
    gradient maps: a tenth of their PNG size)."""
    from PIL import Image
    stat = os.stat(path)
    stamp = (stat.st_mtime_ns, stat.st_size, max_width, image_format)
    cached = _embedded_images.get(os.path.abspath(path))
    if cached and cached[0] == stamp:
        return cached[1]
    with Image.open(path) as image:
        as_is = image.format == 'PNG' == image_format and image.width <= max_width
        if not as_is:
            image = image.convert('RGB')
            if image.width > max_width:
                image = image.resize((max_width, max(1, round(image.height * max_width / image.width))),
                                     Image.LANCZOS)
    if as_is:  # the per-class plots are redrawn at every refresh: copying their bytes keeps that cheap
        with open(path, 'rb') as handle:
            data = handle.read()
    else:
        buffer = io.BytesIO()
        image.save(buffer, format=image_format, **({'quality': 85} if image_format == 'JPEG' else {}))
        data = buffer.getvalue()
    uri = f'data:image/{image_format.lower()};base64,' + base64.b64encode(data).decode('ascii')
    _embedded_images[os.path.abspath(path)] = (stamp, uri)
    return uri


def html_image(path, alt, max_width=800, image_format='PNG'):
    """An <img> of the file, or '' when it does not exist (yet) or cannot be read."""
    if not os.path.isfile(path):
        return ''
    try:
        uri = image_data_uri(path, max_width, image_format)
    except (OSError, ValueError):  # a damaged PNG leaves a gap in the page, not a failed run
        return ''
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def side_by_side(images, max_total_width=1600):
    """[(path, alt)] in one row, each as wide as its share of their pixel widths (files that do not exist
    are left out); a row wider than `max_total_width` pixels stacks instead, so a wide plot keeps its size."""
    from PIL import Image
    present, widths = [], []
    for path, alt in images:
        try:
            with Image.open(path) as image:
                widths.append(image.width)
            present.append((path, alt))
        except (OSError, ValueError):  # not written yet, or damaged: html_image leaves it out as well
            continue
    tags = [html_image(path, alt, 2000) for path, alt in present]
    if len(present) < 2 or sum(widths) > max_total_width:
        return '<div class="figures">' + ''.join(tags) + '</div>'
    columns = ' '.join(f'{width}fr' for width in widths)
    return f'<div class="pair" style="grid-template-columns: {columns}">' + ''.join(tags) + '</div>'


def html_table(header, rows, row_classes=None, cell_classes=None):
    lines = ['<table>', '<tr>' + ''.join(f'<th>{html.escape(str(h))}</th>' for h in header) + '</tr>']
    for i, row in enumerate(rows):
        row_class = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ''
        cells = []
        for j, cell in enumerate(row):
            cell_class = cell_classes[i][j] if cell_classes else ''
            attribute = f' class="{cell_class}"' if cell_class else ''
            cells.append(f'<td{attribute}>{html.escape(str(cell))}</td>')
        lines.append(f'<tr{row_class}>' + ''.join(cells) + '</tr>')
    return '\n'.join(lines + ['</table>'])


def difference_class(cell):
    """'better' / 'worse' for a signed difference cell, so a glance finds where we are below the reference."""
    if cell.startswith('+'):
        return 'better'
    return 'worse' if cell.startswith('-') else ''


def results_table_html(results):
    """The results table of report.html: summary_rows, with REFERENCE_COLUMNS when a class has references."""
    runs = results['classes']
    header = ['Class', 'Last AUROC', 'Max AUROC', 'Max AUROC Epoch', 'Runs']
    if any(r.get('pixel_auroc') is not None for r in runs):
        header.append('Pixel AUROC (ours, not in the paper)')
    rows = summary_rows(runs)
    if has_references(runs):
        header += [title for _, title in REFERENCE_COLUMNS]
        rows = [row + cells for row, cells in zip(rows, reference_cells(runs))]
    n_classes = len(runs_by_class(runs))
    row_classes = ['class-row'] * n_classes + ['mean-row'] * (len(rows) - n_classes)
    cell_classes = [[difference_class(str(cell)) if header[j].startswith('Max −') else ''
                     for j, cell in enumerate(row)] for row in rows]
    return html_table(header, rows, row_classes, cell_classes)


def map_gallery_html(results_dir, run, stem):
    """Up to MAX_GALLERY_MAPS gradient maps of the run (taking the defect types in turn), each PNG with the
    input, the map and, where one exists, the ground-truth mask side by side (localization.save_map_png)."""
    maps_dir = os.path.join(results_dir, 'maps', stem)
    by_type = {}
    for file, label, defect in zip(run.get('test_files', []), run.get('test_labels', []),
                                   run.get('test_defect_types', [])):
        name = f'{defect}_{os.path.splitext(os.path.basename(file))[0]}.png'  # localization.localize_class's name
        if label and os.path.isfile(os.path.join(maps_dir, name)):
            by_type.setdefault(defect, []).append((file, name))
    picked = []
    while len(picked) < MAX_GALLERY_MAPS and any(by_type.values()):
        for defect in sorted(by_type):
            if by_type[defect] and len(picked) < MAX_GALLERY_MAPS:
                picked.append(by_type[defect].pop(0))
    if not picked:
        return ''
    n_total = sum(1 for name in os.listdir(maps_dir) if name.endswith('.png'))
    figures = [f'<figure>{html_image(os.path.join(maps_dir, name), file, 720, "JPEG")}'
               f'<figcaption>{html.escape(file)}</figcaption></figure>' for file, name in picked]
    return (f'<h3>Gradient maps ({len(picked)} of {n_total}, all in maps/{html.escape(stem)}/)</h3>\n'
            f'<div class="gallery">\n' + '\n'.join(figures) + '\n</div>')


def class_section_html(results_dir, run, stem):
    """A run's section: ROC curve, score histogram, AUROC per defect type, the gradient-map gallery."""
    parts = [f'<h2 id="{html.escape(stem)}">{html.escape(run["class_name"])} (seed {run["seed"]})</h2>',
             f'<p class="meta">{run.get("n_train_images", "?")} training images, {run.get("n_test_images", "?")} test '
             f'images; status {html.escape(str(run.get("status", "")))}; {as_float(run.get("wall_time_s")):.0f} s</p>',
             side_by_side([(os.path.join(results_dir, f'{stem}_roc.png'), f'{stem} ROC curve'),
                           (os.path.join(results_dir, f'{stem}_scores.png'), f'{stem} score histogram')])]
    defect_types = sorted(set(run.get('defect_type_auroc_last', {})) | set(run.get('defect_type_auroc_best', {})))
    if defect_types:
        pixel = run.get('pixel_auroc_per_defect_type') or {}
        header = ['Defect type', 'AUROC (last epoch)', 'AUROC (max epoch)'] + (['Pixel AUROC (ours)'] if pixel else [])
        rows = [[defect, mean_std_text([run.get('defect_type_auroc_last', {}).get(defect)]),
                 mean_std_text([run.get('defect_type_auroc_best', {}).get(defect)])]
                + ([mean_std_text([pixel.get(defect)])] if pixel else []) for defect in defect_types]
        parts += ['<h3>AUROC per defect type (each type against the good test images)</h3>', html_table(header, rows)]
    parts.append(map_gallery_html(results_dir, run, stem))
    return '\n'.join(part for part in parts if part)


def settings_html(config, deviations):
    deviating = {name: reference for name, _, reference in deviations}
    rows, row_classes = [], []
    for name, value in sorted((config or {}).items()):
        rows.append([name, repr(value), repr(deviating[name]) if name in deviating else ''])
        row_classes.append('deviation' if name in deviating else '')
    table = html_table(['Setting', 'Value', 'Paper / official (where different)'], rows, row_classes)
    return table.replace('<table>', '<table class="settings">', 1)


def report_html(results_dir, results, deviations):
    """The text of report.html: one page, every image embedded, readable from disk without a server."""
    import datetime
    runs = results['classes']
    names = list(runs_by_class(runs)) or [str((results.get('config') or {}).get('class_name', ''))]
    title = f"DifferNet results: {', '.join(names)}"
    parts = ['<!DOCTYPE html>', '<html lang="en">', '<head>', '<meta charset="utf-8">',
             f'<title>{html.escape(title)}</title>', f'<style>{REPORT_CSS}</style>', '</head>', '<body>',
             f'<h1>{html.escape(title)}</h1>',
             f'<p class="meta">Folder {html.escape(os.path.abspath(results_dir))}; written '
             f'{datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")}; {len(runs)} run(s) finished'
             + (', one in progress' if results.get('in_progress') else '') + '.</p>']
    parts += ['<h2>Image-level AUROC</h2>', results_table_html(results) if runs else '<p>No class finished yet.</p>']
    notes = (reference_notes() if has_references(runs) else []) + split_notes(runs)
    if notes:
        parts.append('<ul class="note">' + ''.join(f'<li>{html.escape(note)}</li>' for note in notes) + '</ul>')
    for failure in results.get('failed') or []:
        seed = f" (seed {failure['seed']})" if failure.get('seed') is not None else ''
        parts.append(f'<p class="warn">Failed: {html.escape(failure["class_name"] + seed)}: '
                     f'{html.escape(str(failure["error"]))}</p>')
    if results.get('in_progress'):
        entry = results['in_progress']
        aurocs = ', '.join('n/a' if a is None or math.isnan(a) else f'{a:.4f}' for a in entry['auroc'])
        parts.append(f'<p>In progress: {html.escape(entry["class_name"])} (seed {entry["seed"]}), '
                     f'{len(entry["auroc"])} meta epoch(s) finished, AUROC per meta epoch: {aurocs}</p>')
    parts += ['<h2>Settings that differ from the paper / official code</h2>',
              '<ul>' + ''.join(f'<li><code>{html.escape(name)}</code> = {html.escape(repr(value))} (paper/official: '
                               f'{html.escape(repr(reference))})</li>' for name, value, reference in deviations)
              + '</ul>' if deviations else '<p>None: every setting that can change a number is the paper\'s.</p>']
    if runs:
        parts.append('<h2>AUROC per meta epoch' + (' and against the paper</h2>' if has_references(runs) else '</h2>'))
    plots = [(os.path.join(results_dir, 'auroc.png'), 'AUROC per meta epoch')]
    if has_references(runs):
        plots.append((os.path.join(results_dir, 'paper_comparison.png'), 'ours against the paper'))
    parts.append(side_by_side(plots))
    for run in runs:
        if run.get('test_scores'):
            parts.append(class_section_html(results_dir, run, run_file_stem(run, results['seeds'])))
    parts += ['<h2>All settings of this run</h2>', settings_html(results.get('config'), deviations),
              '</body>', '</html>']
    return '\n'.join(part for part in parts if part) + '\n'


def write_results_files(results_dir, results, deviations):
    """results.json, results.md, results.csv, auroc.png, paper_comparison.png (when a class has references),
    the per-class files and report.html, each written whole."""
    write_json_atomic(os.path.join(results_dir, 'results.json'), results)
    write_text_atomic(os.path.join(results_dir, 'results.md'), results_markdown(results, deviations))
    write_text_atomic(os.path.join(results_dir, 'results.csv'), results_csv(results))
    finished = [run for run in results['classes'] if run.get('test_scores')]
    if finished:
        write_auroc_plot(results_dir, finished)
        if has_references(finished):
            write_paper_comparison_plot(results_dir, finished)
        for run in finished:
            write_class_files(results_dir, run, run_file_stem(run, results['seeds']))
    write_text_atomic(os.path.join(results_dir, 'report.html'), report_html(results_dir, results, deviations))
