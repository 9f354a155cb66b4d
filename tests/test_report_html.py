"""report.html and the columns against the paper: built through main.main on a tiny run, then parsed, its
images decoded, its rows and reference cells checked; and, where Chromium is installed, rendered."""
import base64
import csv
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from reporting import references
from main import main
from reporting.references import PAPER_COMPUTED_MEAN, REFERENCE_AUROC
from reporting.results_files import results_csv, results_markdown, write_results_files
from reporting.summary import comparison_rows

TINY = ['--pretrained', 'false', '--img_size', '64', '--n_scales', '1', '--fc_internal', '16',
        '--n_coupling_blocks', '2', '--meta_epochs', '2', '--sub_epochs', '1', '--n_transforms', '2',
        '--n_transforms_test', '2', '--feature_cache', 'false', '--verbose', 'false']


class ReportParser(HTMLParser):
    """Collects the <img> sources, every table row as (table number, row class, cells), and the text."""

    def __init__(self):
        super().__init__()
        self.images, self.rows, self.text = [], [], []
        self.tables_seen = 0
        self.in_cell = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == 'img':
            self.images.append(attrs.get('src', ''))
        elif tag == 'table':
            self.tables_seen += 1
        elif tag == 'tr':
            self.rows.append((self.tables_seen, attrs.get('class', ''), []))
        elif tag in ('td', 'th'):
            self.in_cell = True
            self.rows[-1][2].append('')

    def handle_endtag(self, tag):
        if tag in ('td', 'th'):
            self.in_cell = False

    def handle_data(self, data):
        self.text.append(data)
        if self.in_cell:
            self.rows[-1][2][-1] += data


def parse_report(path):
    parser = ReportParser()
    with open(path, encoding='utf-8') as handle:
        parser.feed(handle.read())
    parser.close()
    return parser


def results_table(parser):
    """{row class: [cells]} rows of the results table (the one whose rows are class-row / mean-row)."""
    table = next(t for t, row_class, _ in parser.rows if row_class == 'class-row')
    rows = [(row_class, cells) for t, row_class, cells in parser.rows if t == table]
    return rows[0][1], rows[1:]


def decode_data_uri(src):
    assert src.startswith(('data:image/png;base64,', 'data:image/jpeg;base64,')), src[:40]
    with Image.open(io.BytesIO(base64.b64decode(src.split(',', 1)[1]))) as image:
        image.load()
        return image.size


@pytest.fixture(scope='module')
def bottle_and_widget_run(tmp_path_factory):
    """A tiny real run of two classes: 'bottle' (a name with references) and 'widget' (none), maps on."""
    from conftest import write_image
    root = tmp_path_factory.mktemp('report') / 'data'
    rng = np.random.RandomState(0)
    for folder, count in {'train/good': 3, 'test/good': 2, 'test/scratch': 2, 'test/dent': 1}.items():
        for i in range(count):
            color = tuple(int(v) for v in rng.randint(0, 255, size=3))
            write_image(str(root / 'widget' / folder / f'{i:03d}.png'), color)
    write_image(str(root / 'widget' / 'ground_truth' / 'scratch' / '000_mask.png'), 255, mode='L')
    shutil.copytree(root / 'widget', root / 'bottle')
    out = root.parent / 'out'
    with pytest.MonkeyPatch.context() as patch:  # the tiny 'bottle' stands in for the real one's split
        patch.setitem(references.OFFICIAL_SPLIT, 'bottle', (3, 5))
        code = main(['--dataset_path', str(root), '--class_name', 'bottle,widget', '--results_dir', str(out),
                     '--grad_map_viz', 'true', *TINY])
    assert code == 0
    return out


def test_report_parses_with_embedded_images_and_a_row_per_class(bottle_and_widget_run, capsys):
    out = bottle_and_widget_run
    report = out / 'report.html'
    parser = parse_report(report)
    header, rows = results_table(parser)
    assert [cells[0] for row_class, cells in rows if row_class == 'class-row'] == ['bottle', 'widget']
    assert [cells[0] for row_class, cells in rows if row_class == 'mean-row'] == ['mean']
    assert header[:3] == ['Class', 'Last AUROC', 'Max AUROC'] and 'Paper' in header
    # every image is embedded and decodes: auroc, comparison, 2 x (ROC, histogram), and the map gallery
    assert len(parser.images) >= 6 + 2 * 3
    for src in parser.images:
        width, height = decode_data_uri(src)
        assert width > 50 and height > 50
    text = ''.join(parser.text)
    for expected in ('AUROC per defect type', 'scratch', 'dent', 'Gradient maps (3 of 3', 'img_size',
                     'paper/official: 448', '94.9', '94.7'):
        assert expected in text, expected
    assert 'src="http' not in report.read_text() and '<script' not in report.read_text()  # nothing external
    assert not list(out.glob('*.part'))


def test_reference_cells_of_a_known_and_an_unknown_class(bottle_and_widget_run):
    out = bottle_and_widget_run
    results = json.loads((out / 'results.json').read_text())
    ours = {r['class_name']: r['max_auroc'] for r in results['classes']}
    header, rows = results_table(parse_report(out / 'report.html'))
    cells = {row[0]: dict(zip(header, row)) for _, row in rows}
    bottle, widget, mean = cells['bottle'], cells['widget'], cells['mean']
    assert bottle['Paper'] == '0.990' and bottle['Reproduction max'] == '0.9921'
    assert bottle['Reproduction last'] == '0.9881'
    assert float(bottle['Max − paper']) == pytest.approx(ours['bottle'] - 0.990, abs=6e-5)
    assert float(bottle['Max − reproduction']) == pytest.approx(ours['bottle'] - 0.9921, abs=6e-5)
    assert all(widget[title] == '' for title in ('Paper', 'Max − paper', 'Reproduction last',
                                                 'Reproduction max', 'Max − reproduction'))
    # the mean row: ours over both classes, the references over the one class that has them, said so
    assert float(mean['Max AUROC']) == pytest.approx(np.mean(list(ours.values())), abs=6e-5)
    assert mean['Paper'] == '0.9900 (n=1)' and mean['Max − paper'] == bottle['Max − paper'] + ' (n=1)'
    markdown = (out / 'results.md').read_text()
    assert '## Against the paper and a published reproduction' in markdown
    assert '| widget | ' in markdown.split('## Against the paper')[1]
    assert 'prints the mean of Table 1 as 94.9' in markdown
    with open(out / 'results.csv', newline='') as handle:
        table = list(csv.reader(handle))
    assert table[0][-5:] == ['paper_auroc', 'max_minus_paper', 'reproduction_last_auroc', 'reproduction_max_auroc',
                             'max_minus_reproduction']
    assert table[1][0] == 'bottle' and table[1][-5] == '0.990' and table[1][-2] == '0.9921'
    assert table[2][0] == 'widget' and table[2][-5:] == [''] * 5
    assert table[3][0] == 'mean' and table[3][-5] == '0.9900'  # plain numbers in the CSV, no '(n=1)'
    assert (out / 'paper_comparison.png').stat().st_size > 0


def synthetic_run(class_name, seed, max_auroc, last_auroc):
    return dict(class_name=class_name, seed=seed, last_auroc=last_auroc, max_auroc=max_auroc, max_auroc_epoch=0,
                wall_time_s=1.0, auroc=[last_auroc])


def test_mean_row_over_all_fifteen_paper_classes_keeps_btad_apart():
    mvtec = [name for name, (paper, _, _) in REFERENCE_AUROC.items() if paper is not None and name != 'mtd']
    assert len(mvtec) == 15
    runs = [synthetic_run(name, 0, 0.9, 0.8) for name in mvtec] + [synthetic_run('02', 0, 0.9, 0.8)]
    rows = {row[0]: row for row in comparison_rows(runs)}
    # Class, Last, Max, Paper, Max - paper, Reproduction last, Reproduction max, Max - reproduction
    assert rows['02'][3:] == ['', '', '', '0.8298', '+0.0702']  # BTAD: no paper value, no last AUROC given
    assert rows['grid'][3:] == ['0.840', '+0.0600', '0.7109', '0.7937', '+0.1063']
    # MVTec AD and BTAD are not averaged together: one mean row for MVTec AD's fifteen, none for one BTAD class
    assert 'mean' not in rows and 'mean BTAD' not in rows
    assert rows['mean MVTec AD'][3] == f'{PAPER_COMPUTED_MEAN / 100:.4f}' == '0.9469'
    assert rows['mean MVTec AD'][6] == f'{np.mean([REFERENCE_AUROC[n][2] for n in mvtec]):.4f}'
    markdown = results_markdown({'classes': runs, 'seeds': [0]}, [])
    assert 'as 94.9 %' in markdown and 'average 94.7 %' in markdown


def test_no_reference_table_for_unknown_classes_only_but_csv_columns_stay(tmp_path):
    results = {'classes': [synthetic_run('widget', 0, 0.9, 0.8)], 'seeds': [0], 'failed': [], 'config': {}}
    assert 'Against the paper' not in results_markdown(results, [])
    first, second = results_csv(results).splitlines()[:2]
    assert first.endswith('max_minus_reproduction') and second.endswith(',,,,,')
    write_results_files(str(tmp_path), results, [])  # no scores yet: tables and the page, no plots
    header, rows = results_table(parse_report(tmp_path / 'report.html'))
    assert 'Paper' not in header and [row[0] for _, row in rows] == ['widget']


def test_a_class_on_another_split_is_not_compared_and_says_why(tmp_path):
    resplit = dict(synthetic_run('screw', 0, 0.95, 0.93), n_train_images=200, n_test_images=100,
                   n_validation_images=0)
    official = dict(synthetic_run('bottle', 0, 0.99, 0.98), n_train_images=189, n_validation_images=20,
                    n_test_images=83)  # 20 held out for the threshold: still the official split
    why = "screw: 200 training and 100 test images, not MVTec AD's official split (320 and 160)"
    rows = {row[0]: row for row in comparison_rows([resplit, official])}
    assert rows['screw'][3:] == [''] * 5
    assert rows['bottle'][3:5] == ['0.990', '+0.0000']
    assert rows['mean'][3] == '0.9900 (n=1)'
    results = {'classes': [resplit], 'seeds': [0], 'failed': [], 'config': {}}
    markdown = results_markdown(results, [])
    assert why in markdown and 'Against the paper' not in markdown
    assert results_csv(results).splitlines()[1].endswith(',,,,,')
    write_results_files(str(tmp_path), results, [])
    page = parse_report(tmp_path / 'report.html')
    assert why in ''.join(page.text)
    assert 'Paper' not in results_table(page)[0]


def test_page_of_a_run_in_progress_with_a_failure_and_a_damaged_plot(tmp_path):
    run = synthetic_run('bottle', 0, 0.95, 0.9)
    run.update(test_scores=[0.1, 0.9], best_test_scores=[0.1, 0.9], test_labels=[0, 1],
               test_defect_types=['good', 'crack'], test_files=['a.png', 'b.png'],
               defect_type_auroc_last={'crack': 1.0}, defect_type_auroc_best={'crack': 1.0})
    results = {'classes': [run], 'seeds': [0], 'config': {'img_size': 64},
               'failed': [{'class_name': 'cable', 'seed': None, 'error': 'missing folder x/train/good'}],
               'in_progress': dict(synthetic_run('screw', 0, 0.7, 0.7), auroc=[0.6, None])}
    write_results_files(str(tmp_path), results, [('img_size', 64, 448)])
    (tmp_path / 'bottle_roc.png').write_bytes(b'not a png')  # a plot damaged on disk leaves a gap, not an error
    from reporting.report_html import report_html
    page = report_html(str(tmp_path), results, [('img_size', 64, 448)])
    (tmp_path / 'report.html').write_text(page)
    parser = parse_report(tmp_path / 'report.html')
    text = ''.join(parser.text)
    assert 'Failed: cable: missing folder x/train/good' in text
    assert 'In progress: screw (seed 0), 2 meta epoch(s) finished, AUROC per meta epoch: 0.6000, n/a' in text
    assert 'img_size = 64 (paper/official: 448)' in text
    assert len(parser.images) == 3  # auroc, comparison, histogram; not the damaged ROC
    for src in parser.images:
        decode_data_uri(src)


def chromium():
    return shutil.which('chromium') or shutil.which('chromium-browser')


@pytest.mark.skipif(chromium() is None, reason='Chromium is not installed (Debian: apt-get install chromium)')
def test_chromium_renders_the_report(bottle_and_widget_run, tmp_path):
    screenshot = tmp_path / 'report.png'
    subprocess.run([chromium(), '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars',
                    f'--screenshot={screenshot}', '--window-size=1200,2000',
                    'file://' + os.path.abspath(bottle_and_widget_run / 'report.html')],
                   capture_output=True, timeout=120, check=False)
    assert screenshot.is_file(), 'Chromium wrote no screenshot'
    with Image.open(screenshot) as image:
        pixels = np.asarray(image.convert('L'), dtype=np.float64)
    assert pixels.shape == (2000, 1200)
    assert pixels.std() > 20  # text, tables and plots; a blank or failed page is one colour
    assert (pixels < 128).mean() > 0.01  # and it is not white with a stray line
