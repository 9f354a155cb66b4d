"""report.html: one page with every table and plot of a run, every image embedded, readable from disk."""
import base64
import datetime
import html
import io
import os

from PIL import Image

from base.file_names import map_png_name
from reporting.references import as_float, runs_by_class
from base.file_names import file_stem
from reporting.summary import (F1_HEADER, REFERENCE_COLUMNS, build_summary, failure_text, in_progress_text, mean_std_text,
                     memory_text, summary_header)

MAX_GALLERY_MAPS = 12  # gradient maps shown per class in report.html: enough to judge them, the page stays small
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


def image_data_uri(path, max_width, image_format='PNG'):
    """The image at `path` as a data URI: a PNG no wider than `max_width` as its own bytes; anything else
    scaled down to `max_width` pixels wide and re-encoded (JPEG, quality 85, for the photographs of the
    gradient maps: a tenth of their PNG size)."""
    with Image.open(path) as image:
        as_is = image.format == 'PNG' == image_format and image.width <= max_width
        if not as_is:
            image = image.convert('RGB')
            if image.width > max_width:
                image = image.resize((max_width, max(1, round(image.height * max_width / image.width))),
                                     Image.LANCZOS)
    if as_is:  # the plots are embedded as they are, without decoding and encoding them again
        with open(path, 'rb') as handle:
            data = handle.read()
    else:
        buffer = io.BytesIO()
        image.save(buffer, format=image_format, **({'quality': 85} if image_format == 'JPEG' else {}))
        data = buffer.getvalue()
    return f'data:image/{image_format.lower()};base64,' + base64.b64encode(data).decode('ascii')


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


def results_table_html(summary):
    """The results table of report.html: the summary's rows, with REFERENCE_COLUMNS when a class has
    references."""
    header = summary_header(summary['runs'], 'Pixel AUROC (ours, not in the paper)')
    rows = summary['rows']
    if summary['references'] is not None:
        header += [title for _, title in REFERENCE_COLUMNS]
        rows = [row + cells for row, cells in zip(rows, summary['references'])]
    n_classes = summary['n_classes']
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
        name = map_png_name(defect, file)
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
             f'images; status {html.escape(str(run.get("status", "")))}; {as_float(run.get("wall_time_s")):.0f} s'
             + (f'; {html.escape(memory_text(run))}' if memory_text(run) else '') + '</p>',
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


def report_html(results_dir, results, deviations, summary=None):
    """The text of report.html: one page, every image embedded, readable from disk without a server;
    `summary` is build_summary(results), made here when not given."""
    summary = summary or build_summary(results)
    runs = results['classes']
    with_references = summary['references'] is not None
    names = list(runs_by_class(runs)) or [str((results.get('config') or {}).get('class_name', ''))]
    title = f"DifferNet results: {', '.join(names)}"
    parts = ['<!DOCTYPE html>', '<html lang="en">', '<head>', '<meta charset="utf-8">',
             f'<title>{html.escape(title)}</title>', f'<style>{REPORT_CSS}</style>', '</head>', '<body>',
             f'<h1>{html.escape(title)}</h1>',
             f'<p class="meta">Folder {html.escape(os.path.abspath(results_dir))}; written '
             f'{datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")}; {len(runs)} run(s) finished'
             + (', one in progress' if results.get('in_progress') else '') + '.</p>']
    parts += ['<h2>Image-level AUROC</h2>', results_table_html(summary) if runs else '<p>No class finished yet.</p>']
    notes = summary['reference_notes'] + summary['notes']
    if notes:
        parts.append('<ul class="note">' + ''.join(f'<li>{html.escape(note)}</li>' for note in notes) + '</ul>')
    if summary['f1_rows']:
        parts += ['<h2>Image-level F1 (ours, not in the paper)</h2>', html_table(F1_HEADER, summary['f1_rows'])]
    for failure in results.get('failed') or []:
        parts.append(f'<p class="warn">Failed: {html.escape(failure_text(failure))}</p>')
    if results.get('in_progress'):
        parts.append(f"<p>{html.escape(in_progress_text(results['in_progress']))}</p>")
    parts += ['<h2>Settings that differ from the paper / official code</h2>',
              '<ul>' + ''.join(f'<li><code>{html.escape(name)}</code> = {html.escape(repr(value))} (paper/official: '
                               f'{html.escape(repr(reference))})</li>' for name, value, reference in deviations)
              + '</ul>' if deviations else '<p>None: every setting that can change a number is the paper\'s.</p>']
    if runs:
        parts.append('<h2>AUROC per meta epoch' + (' and against the paper</h2>' if with_references else '</h2>'))
    plots = [(os.path.join(results_dir, 'auroc.png'), 'AUROC per meta epoch')]
    if with_references:
        plots.append((os.path.join(results_dir, 'paper_comparison.png'), 'ours against the paper'))
    parts.append(side_by_side(plots))
    for run in runs:
        if run.get('test_scores'):
            parts.append(class_section_html(results_dir, run, file_stem(run['class_name'], run['seed'], results['seeds'])))
    parts += ['<h2>All settings of this run</h2>', settings_html(results.get('config'), deviations),
              '</body>', '</html>']
    return '\n'.join(part for part in parts if part) + '\n'
