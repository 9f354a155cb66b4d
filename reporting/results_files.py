"""The results of a run on disk: results.json, results.md, results.csv, the plots, each class's score
list and report.html, each written whole (atomic_files).

`write_results_files` writes them: the tables after every meta epoch, so that the folder always describes
the run as far as it got; with `figures` (when a class finishes and at the end) the plots and report.html too.
"""
import csv
import io
import os

from base.atomic_files import write_json_atomic, write_text_atomic
from reporting.plots import write_auroc_plot, write_class_plots, write_paper_comparison_plot
from reporting.references import has_references
from reporting.report_html import report_html
from base.file_names import file_stem
from reporting.summary import (CSV_REFERENCE_COLUMNS, F1_HEADER, REFERENCE_COLUMNS, build_summary, failure_text,
                     in_progress_text, summary_header)


def markdown_table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows]
    return '\n'.join(lines)


def results_markdown(results, deviations, summary=None):
    """The text of results.md, also printed at the end of a run."""
    summary = summary or build_summary(results)
    header = summary_header(summary['runs'], 'Pixel AUROC, last epoch (ours: not reported by the paper)')
    parts = ['## Image-level AUROC', '', markdown_table(header, summary['rows'])]
    if summary['notes']:
        parts += [''] + [f'- {note}' for note in summary['notes']]
    if results.get('failed'):
        parts += ['', 'Failed:'] + [f'- {failure_text(failure)}' for failure in results['failed']]
    if results.get('in_progress'):
        parts += ['', in_progress_text(results['in_progress'])]
    if summary['references'] is not None:
        parts += ['', '## Against the paper and a published reproduction (image AUROC)', '',
                  markdown_table(['Class', 'Last AUROC', 'Max AUROC'] + [title for _, title in REFERENCE_COLUMNS],
                                 summary['comparison_rows']), '']
        parts += [f'- {note}' for note in summary['reference_notes']]
    if summary['f1_rows']:
        parts += ['', '## Image-level F1 (ours: not reported by the paper)', '',
                  markdown_table(F1_HEADER, summary['f1_rows'])]
    if summary['defect_rows']:
        parts += ['', '## AUROC per defect type (each type against the good test images)', '',
                  markdown_table(['Class', 'Defect type', 'AUROC (last epoch)', 'AUROC (max epoch)'],
                                 summary['defect_rows'])]
    parts += ['', '## Settings that differ from the paper / official code', '']
    parts += [f'- `{name}` = {value!r} (paper/official: {reference!r})' for name, value, reference in deviations] \
        or ['- none']
    return '\n'.join(parts) + '\n'


def results_csv(results, summary=None):
    """The text of results.csv: the per-class table with the reference columns, then one row per run."""
    summary = summary or build_summary(results)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(['class', 'last_auroc', 'max_auroc', 'max_auroc_epoch', 'runs']
                    + (['pixel_auroc'] if summary['with_pixels'] else []) + CSV_REFERENCE_COLUMNS)
    writer.writerows(row + cells for row, cells in zip(summary['rows'], summary['csv_references']))
    writer.writerow([])
    writer.writerow(['class', 'seed', 'last_auroc', 'max_auroc', 'max_auroc_epoch', 'wall_time_s', 'f1_max_last',
                     'f1_max_threshold_last', 'f1_at_checkpoint_threshold', 'job_peak_rss_gib', 'job_peak_gpu_gib'])
    for run in results['classes']:
        writer.writerow([run['class_name'], run['seed'], run['last_auroc'], run['max_auroc'],
                         run['max_auroc_epoch'], run['wall_time_s'], run.get('f1_max_last'),
                         run.get('f1_max_threshold_last'), run.get('f1_at_checkpoint_threshold'),
                         run.get('job_peak_rss_gib'), run.get('job_peak_gpu_gib')])
    return buffer.getvalue()


def class_scores_csv(run):
    """The text of <stem>_scores.csv: each test image's score at the last and at the best meta epoch."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(['file', 'label', 'defect_type', 'score_last_epoch', 'score_max_epoch'])
    for row in zip(run['test_files'], run['test_labels'], run['test_defect_types'], run['test_scores'],
                   run['best_test_scores']):
        writer.writerow(row)
    return buffer.getvalue()


def write_results_files(results_dir, results, deviations, figures=True):
    """results.json, results.md and results.csv; with `figures` also auroc.png, paper_comparison.png (when a
    class has references), each finished class's score list and plots, and report.html. Each written whole."""
    summary = build_summary(results)
    write_json_atomic(os.path.join(results_dir, 'results.json'), results)
    write_text_atomic(os.path.join(results_dir, 'results.md'), results_markdown(results, deviations, summary))
    write_text_atomic(os.path.join(results_dir, 'results.csv'), results_csv(results, summary))
    if not figures:
        return
    finished = [run for run in results['classes'] if run.get('test_scores')]
    if finished:
        write_auroc_plot(results_dir, finished)
        if has_references(finished):
            write_paper_comparison_plot(results_dir, finished)
        for run in finished:
            stem = file_stem(run['class_name'], run['seed'], results['seeds'])
            write_text_atomic(os.path.join(results_dir, f'{stem}_scores.csv'), class_scores_csv(run))
            write_class_plots(results_dir, run, stem)
    write_text_atomic(os.path.join(results_dir, 'report.html'), report_html(results_dir, results, deviations, summary))
