"""Magnetic Tile Defects read where it lies, with DifferNet's split; few-shot training on a seeded subset."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from image_data import layouts
from conftest import REPO_ROOT, tiny_config
from base.errors import UserError
from main import main
from reporting.references import mean_row_groups
from reporting.summary import summary_rows
from image_data.mtd import find_mtd_samples, read_mtd_train_list
from image_data.layouts import find_class_samples, split_validation, training_subset

TINY = ['--pretrained', 'false', '--img_size', '64', '--n_scales', '1', '--fc_internal', '16',
        '--n_coupling_blocks', '2', '--meta_epochs', '1', '--sub_epochs', '1', '--n_transforms', '2',
        '--n_transforms_test', '2', '--device', 'cpu', '--feature_cache', 'false', '--save_checkpoint', 'false']


def write_tile(path, seed, size=(24, 40), mask=None):
    """A grayscale JPEG like MTD's, with its .png mask beside it (all black unless `mask`)."""
    rng = np.random.RandomState(seed)
    Image.fromarray(rng.randint(60, 200, size=size).astype(np.uint8), 'L').save(path)
    pixels = np.zeros(size, dtype=np.uint8)
    if mask is not None:
        pixels[mask] = 255
    Image.fromarray(pixels, 'L').save(os.path.splitext(path)[0] + '.png')


@pytest.fixture(scope='module')
def mtd_tree(tmp_path_factory):
    """MTD's layout with every name of DifferNet's list in MT_Free (tiny images), 3 more defect-free test
    images and 2 defective ones in each of two defect folders."""
    root = tmp_path_factory.mktemp('mtd')
    free = root / 'MT_Free' / 'Imgs'
    free.mkdir(parents=True)
    names = read_mtd_train_list()
    for i, name in enumerate(names + ['extra_a.jpg', 'extra_b.jpg', 'extra_c.jpg']):
        write_tile(str(free / name), i, size=(24 + i % 5, 40 - i % 7))  # sizes vary, as MTD's do
    for folder, offset in (('MT_Crack', 10_000), ('MT_Blowhole', 20_000)):
        (root / folder / 'Imgs').mkdir(parents=True)
        for i in range(2):
            write_tile(str(root / folder / 'Imgs' / f'exp{i}_num_{i}.jpg'), offset + i, mask=(slice(5, 9), slice(5, 12)))
    return root


def test_mtd_is_one_class_with_differnets_split_and_masks(mtd_tree):
    assert layouts.class_folders(str(mtd_tree)) == ['mtd'] and layouts.detect_layout(str(mtd_tree)) == 'mtd'
    train, test = find_class_samples(str(mtd_tree), 'mtd')
    assert len(train) == 761 and sorted(os.path.basename(s.path) for s in train) == sorted(read_mtd_train_list())
    assert all(s.label == 0 and s.path.endswith('.jpg') for s in train)
    good = [s for s in test if s.label == 0]
    assert sorted(os.path.basename(s.path) for s in good) == ['extra_a.jpg', 'extra_b.jpg', 'extra_c.jpg']
    assert all(s.mask_path is None for s in good)  # defect-free: an all-zero mask, as MVTec AD's protocol
    defective = [s for s in test if s.label == 1]
    assert sorted({s.defect_type for s in defective}) == ['blowhole', 'crack'] and len(defective) == 4
    assert all(s.mask_path == s.path[:-4] + '.png' for s in defective)
    assert not {s.path for s in train} & {s.path for s in test}


def test_mtd_list_errors_are_one_line(mtd_tree, tmp_path, capsys):
    with pytest.raises(UserError, match='the MTD training list .* is missing; restore splits/mtd_train_filenames.txt'):
        find_mtd_samples(str(mtd_tree), str(tmp_path / 'none.txt'))
    listed = tmp_path / 'list.txt'
    listed.write_text('\n'.join(read_mtd_train_list()[:5] + ['not_there.jpg']) + '\n')
    with pytest.raises(UserError, match=r'1 of the 6 names in .*list.txt are not in .*MT_Free.Imgs \(first: not_there.jpg\)'):
        find_mtd_samples(str(mtd_tree), str(listed))
    broken = tmp_path / 'broken'
    (broken / 'MT_Free' / 'Imgs').mkdir(parents=True)
    (broken / 'MT_Crack').mkdir()
    with pytest.raises(UserError, match=r'missing folder .*MT_Crack.Imgs'):
        find_class_samples(str(broken), 'mtd')
    (broken / 'MT_Crack' / 'Imgs').mkdir()
    assert main(['--dataset_path', str(broken), '--class_name', 'mtd', '--results_dir', str(tmp_path / 'out'),
                 *TINY]) == 2
    error = capsys.readouterr().err
    assert error.count('\n') == 1 and 'Traceback' not in error
    assert 'error: 761 of the 761 names in' in error and 'give --dataset_path the MTD folder as distributed' in error


def test_mtd_runs_from_its_folder_on_a_seeded_subset(mtd_tree, tmp_path, capsys):
    out = tmp_path / 'run'
    assert main(['--dataset_path', str(mtd_tree), '--class_name', 'all', '--results_dir', str(out),
                 '--n_train_images', '8', '--grad_map_viz', 'true', *TINY]) == 0
    printed = capsys.readouterr().out
    assert '=== mtd (seed 0, mtd layout): 8 training images, 7 test images (4 anomalous)' in printed
    assert '(a seeded 8 of 761: n_train_images)' in printed
    entry = json.loads((out / 'results.json').read_text())['classes'][0]
    assert entry['class_name'] == 'mtd' and entry['n_train_images'] == 8 and entry['train_subset_of'] == 761
    assert len(entry['train_files']) == 8 and all(f.startswith('MT_Free') for f in entry['train_files'])
    assert sorted(entry['defect_type_auroc_last']) == ['blowhole', 'crack']
    assert entry['pixel_auroc'] is not None  # the masks beside the images were read
    markdown = (out / 'results.md').read_text()
    assert '`n_train_images` = 8 (paper/official: 0)' in markdown
    assert 'mtd: trained on a seeded subset of its training images (8 of 761; n_train_images)' in markdown


def test_subset_is_seeded_stable_nested_and_leaves_validation_out(official_tree):
    train, _ = find_class_samples(str(official_tree), 'widget')
    samples = [s._replace(path=f'/data/{i:03d}.png') for i in range(40) for s in train[:1]]
    kept, held_out = split_validation(samples, 0.25, seed=3)
    sixteen = training_subset(kept, 16, seed=3)
    assert len(sixteen) == 16 and not set(sixteen) & set(held_out)
    assert training_subset(list(reversed(kept)), 16, seed=3) == sixteen  # the order given does not matter
    assert set(sixteen) <= set(training_subset(kept, 24, seed=3))  # nested
    assert training_subset(kept, 16, seed=4) != sixteen  # another seed, other images
    assert training_subset(kept, 0, seed=3) == sorted(kept)
    # the same numbers on any machine: numpy's RandomState permutation is specified bit for bit
    assert [os.path.basename(s.path) for s in training_subset(kept, 3, seed=0)] == \
        [os.path.basename(kept[i].path) for i in sorted(np.random.RandomState(3_000).permutation(len(kept))[:3])]
    with pytest.raises(UserError, match='n_train_images = 31 asks for more than the 30 training images'):
        training_subset(kept, 31, seed=3)


def test_mean_rows_keep_the_benchmarks_apart():
    assert mean_row_groups(['bottle', 'screw']) == [('mean', ['bottle', 'screw'])]
    assert mean_row_groups(['bottle', 'widget']) == [('mean', ['bottle', 'widget'])]  # unknown classes join
    assert mean_row_groups(['bottle', 'screw', 'mtd']) == [('mean MVTec AD', ['bottle', 'screw'])]
    assert mean_row_groups(['bottle', 'mtd']) == []
    run = dict(last_auroc=0.9, max_auroc=0.95, max_auroc_epoch=3)
    rows = summary_rows([dict(run, class_name=name) for name in ('bottle', 'screw', 'mtd', '01', '02')])
    assert [row[0] for row in rows] == ['bottle', 'screw', 'mtd', '01', '02', 'mean MVTec AD', 'mean BTAD']


def test_mtd_is_compared_with_the_papers_table_2():
    from reporting.references import class_references
    run = {'class_name': 'mtd', 'n_train_images': 761, 'n_test_images': 583}
    assert class_references('mtd', [run])['paper'] == pytest.approx(0.977)
    few_shot = dict(run, n_train_images=16, train_subset_of=761)
    assert class_references('mtd', [few_shot])['paper'] == pytest.approx(0.977)  # the test set is the paper's
    assert np.isnan(class_references('mtd', [dict(run, n_test_images=100)])['paper'])
    assert tiny_config().n_train_images == 0


def test_few_shot_table_averages_finished_runs_per_class_and_size(tmp_path):
    """benchmarks/few_shot_table.py, which draws the plot of docs/results.md from kept results."""
    script = os.path.join(REPO_ROOT, 'benchmarks', 'few_shot_table.py')

    def kept(name, entries):
        path = tmp_path / f'{name}.results.json'
        path.write_text(json.dumps({'classes': entries}))
        return str(path)

    def entry(seed, n_images, last, best, status='done'):
        return dict(class_name='screw', seed=seed, n_train_images=n_images, train_subset_of=200,
                    last_auroc=last, max_auroc=best, status=status)

    runs = [kept('s0', [entry(0, 16, 0.60, 0.80)]), kept('s1', [entry(1, 16, 0.70, 0.70)]),
            kept('s2', [entry(2, 16, 0.10, 0.10, status='failed')]),  # a failed job is not averaged in
            kept('s64', [entry(0, 64, 0.90, 0.91)]), str(tmp_path / 'not_run_yet')]
    result = subprocess.run([sys.executable, script, '--runs', *runs, '--full', 'screw=0.93,0.95,200',
                             '--plot', str(tmp_path / 'few_shot.png')], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith('| screw')]
    spread = np.std([0.60, 0.70], ddof=1)
    assert rows == [f'| screw | 16 of 200 | 2 | 0.6500 ± {spread:.4f} | 0.7500 ± {spread:.4f} |',
                    '| screw | 64 of 200 | 1 | 0.9000 | 0.9100 |',
                    '| screw | 200 (all) | 1 | 0.9300 | 0.9500 |']
    assert 'no results yet' in result.stderr and (tmp_path / 'few_shot.png').stat().st_size > 0
