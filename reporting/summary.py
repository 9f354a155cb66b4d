"""The summary of a run's results, computed once and rendered by results.md, results.csv and report.html:
AUROC per class (mean ± std over seeds) with a mean row, the reference columns, AUROC per defect type.
"""
import math

import numpy as np

from reporting.references import (as_float, class_references, has_references, mean_row_groups, reference_notes, runs_by_class,
                        split_notes)

REFERENCE_COLUMNS = [('paper', 'Paper'), ('max_minus_paper', 'Max − paper'),
                     ('reproduction_last', 'Reproduction last'), ('reproduction_max', 'Reproduction max'),
                     ('max_minus_reproduction', 'Max − reproduction')]
CSV_REFERENCE_COLUMNS = ['paper_auroc', 'max_minus_paper', 'reproduction_last_auroc', 'reproduction_max_auroc',
                         'max_minus_reproduction']


def mean_std_text(values, digits=4):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return 'n/a'
    if len(values) == 1:
        return f'{values[0]:.{digits}f}'
    return f'{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}'


def mean_or_nan(values):
    finite = [value for value in values if not math.isnan(value)]
    return float(np.mean(finite)) if finite else float('nan')


def summary_rows(runs):
    """One row per class (in first-seen order) with Last AUROC, Max AUROC, Max AUROC Epoch, each as
    mean ± std over the class's seeds, then the mean rows (references.mean_row_groups: one over the
    classes, or one per benchmark when the run spans several)."""
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
    for label, names in mean_row_groups(list(by_class)):
        class_means = {key: [mean_or_nan([as_float(r[key]) for r in by_class[name]]) for name in names]
                       for key in ('last_auroc', 'max_auroc')}
        rows.append([label, f"{mean_or_nan(class_means['last_auroc']):.4f}",
                     f"{mean_or_nan(class_means['max_auroc']):.4f}", '', sum(len(by_class[name]) for name in names)]
                    + ([''] if with_pixels else []))
    return rows


F1_HEADER = ['Class', 'F1-max (last epoch)', 'Its threshold', "F1 at the checkpoint's threshold", 'Runs']


def f1_rows(runs):
    """Rows (class, F1-max of the last meta epoch, the threshold that gives it, F1 at the threshold the
    checkpoint decides with, runs), mean ± std over seeds; none when no run has an F1 (older results)."""
    rows = []
    for class_name, class_runs in runs_by_class(runs).items():
        if not any(r.get('f1_max_last') is not None for r in class_runs):
            continue
        rows.append([class_name, mean_std_text([r.get('f1_max_last') for r in class_runs]),
                     mean_std_text([r.get('f1_max_threshold_last') for r in class_runs], digits=6),
                     mean_std_text([r.get('f1_at_checkpoint_threshold') for r in class_runs]), len(class_runs)])
    return rows


def defect_type_rows(runs):
    """Rows (class, defect type, AUROC at the last meta epoch, at the max epoch), mean ± std over seeds."""
    collected = {}
    for run in runs:
        for when in ('last', 'best'):
            for defect, value in run.get(f'defect_type_auroc_{when}', {}).items():
                collected.setdefault((run['class_name'], defect), {'last': [], 'best': []})[when].append(value)
    return [[class_name, defect, mean_std_text(values['last']), mean_std_text(values['best'])]
            for (class_name, defect), values in collected.items()]


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


def reference_cell(value, key, mean=False):
    if math.isnan(value):
        return ''
    if key.startswith('max_minus'):
        return f'{value:+.4f}'
    return f'{value:.3f}' if key == 'paper' and not mean else f'{value:.4f}'  # the paper's tables have three digits


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
    """[cells of REFERENCE_COLUMNS] per summary row: one per class, then those of each mean row."""
    records = reference_records(runs)
    rows = [[reference_cell(r[key], key) for key, _ in REFERENCE_COLUMNS] for r in records]
    by_name = {r['class_name']: r for r in records}
    for _, names in mean_row_groups(list(by_name)):
        rows.append(mean_reference_cells([by_name[name] for name in names], annotate))
    return rows


def comparison_rows(runs):
    """Rows of the table against the references: class, our last and max AUROC (means over seeds), then
    REFERENCE_COLUMNS; then the mean rows."""
    records = reference_records(runs)
    rows = [[r['class_name'], reference_cell(r['last'], 'last'), reference_cell(r['max'], 'max')] for r in records]
    by_name = {r['class_name']: r for r in records}
    for label, names in mean_row_groups(list(by_name)):
        rows.append([label, reference_cell(mean_or_nan([by_name[name]['last'] for name in names]), 'last'),
                     reference_cell(mean_or_nan([by_name[name]['max'] for name in names]), 'max')])
    return [row + cells for row, cells in zip(rows, reference_cells(runs))]


def summary_header(runs, pixel_title):
    """The header of the per-class table; `pixel_title` names the pixel AUROC column where a run has one."""
    header = ['Class', 'Last AUROC', 'Max AUROC', 'Max AUROC Epoch', 'Runs']
    if any(r.get('pixel_auroc') is not None for r in runs):
        header.append(pixel_title)
    return header


def build_summary(results):
    """Everything the three writers show, from results.json's dict: {rows (per class, then a mean row),
    n_classes, with_pixels, references (cells per row, or None when no class has references), csv_references
    (the same without '(n=k)'), comparison_rows, notes (split notes), reference_notes, defect_rows}."""
    runs = results['classes']
    with_references = has_references(runs)
    return {'runs': runs, 'rows': summary_rows(runs), 'n_classes': len(runs_by_class(runs)),
            'with_pixels': any(r.get('pixel_auroc') is not None for r in runs),
            'references': reference_cells(runs) if with_references else None,
            'csv_references': reference_cells(runs, annotate=False),
            'comparison_rows': comparison_rows(runs) if with_references else [],
            'notes': split_notes(runs), 'reference_notes': reference_notes() if with_references else [],
            'defect_rows': defect_type_rows(runs), 'f1_rows': f1_rows(runs)}


def failure_text(failure):
    """'<class> (seed s): <error>' of a failed job (no seed for a class that could not start)."""
    seed = f" (seed {failure['seed']})" if failure.get('seed') is not None else ''
    return f"{failure['class_name']}{seed}: {failure['error']}"


def in_progress_text(entry):
    """The line about the job still running: its meta epochs so far and their AUROC."""
    aurocs = ', '.join('n/a' if a is None or math.isnan(a) else f'{a:.4f}' for a in entry['auroc'])
    return (f"In progress: {entry['class_name']} (seed {entry['seed']}), {len(entry['auroc'])} meta epoch(s) "
            f'finished, AUROC per meta epoch: {aurocs}')


def memory_text(run):
    """The peak memory of a job, as measured: for that job alone (job_peak_rss_gib, job_peak_gpu_gib), or
    the process's peak so far where that could not be measured, or in results written before it was
    (peak_rss_gib); '' when the entry holds none."""
    parts = []
    if run.get('job_peak_rss_gib') is not None:
        parts.append(f"{run['job_peak_rss_gib']:.2f} GiB resident")
    if run.get('job_peak_gpu_gib') is not None:
        parts.append(f"{run['job_peak_gpu_gib']:.2f} GiB on the GPU")
    if parts:
        return 'peak memory of this job: ' + ', '.join(parts)
    process_peak = run.get('process_peak_rss_gib', run.get('peak_rss_gib'))
    return '' if process_peak is None else f'peak memory of the process up to this job: {process_peak:.2f} GiB resident'
