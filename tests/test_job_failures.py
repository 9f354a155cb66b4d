"""Nothing computed is lost when a job fails: an exception during or after training, a kill in the middle of a
write, a full disk at each write, a damaged resume state. Each leaves whole files and its resume state, and
--resume trains nothing again and gives the uninterrupted run's test scores bit for bit."""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import localization
import model
import train
from base import atomic_files, job_memory, resume_state
from base.errors import UserError
from conftest import REPO_ROOT, tiny_config
from main import main
from reporting import plots
from reporting.results_files import write_results_files
from runner import disk, jobs

TINY = ['--pretrained', 'false', '--img_size', '64', '--n_scales', '1', '--fc_internal', '16',
        '--n_coupling_blocks', '2', '--meta_epochs', '2', '--sub_epochs', '1', '--n_transforms', '2',
        '--n_transforms_test', '2', '--batch_size', '4', '--device', 'cpu', '--feature_cache', 'false',
        '--resume_interval_s', '0', '--cpu_flow_kernel', 'default']
LAST = 1  # the last meta epoch
STEPS_PER_META_EPOCH = 1  # 4 training images, batch_size 4, 1 sub epoch
COMPARED = ('auroc', 'test_loss', 'train_loss', 'test_scores', 'best_test_scores', 'last_auroc', 'max_auroc',
            'max_auroc_epoch', 'checkpoint_threshold')
MAPS = ('pixel_auroc', 'aupro')  # with grad_map_viz, which changes no other number: the tests that need maps


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """widget: 4 training images, 2 good and 2 scratched test images with masks (noise)."""
    root = tmp_path_factory.mktemp('data')
    rng = np.random.RandomState(0)
    for folder, count in {'train/good': 4, 'test/good': 2, 'test/scratch': 2}.items():
        os.makedirs(root / 'widget' / folder)
        for i in range(count):
            Image.fromarray(rng.randint(0, 255, (40, 40, 3)).astype(np.uint8)).save(root / 'widget' / folder / f'{i:03d}.png')
            if folder == 'test/scratch':
                os.makedirs(root / 'widget' / 'ground_truth' / 'scratch', exist_ok=True)
                Image.fromarray(((rng.rand(40, 40) > 0.7) * 255).astype(np.uint8)).save(
                    root / 'widget' / 'ground_truth' / 'scratch' / f'{i:03d}_mask.png')
    return root


def command(data, out, maps=False):
    return ['--dataset_path', str(data), '--class_name', 'widget', '--results_dir', str(out), *TINY,
            '--grad_map_viz', str(maps)]


@pytest.fixture(scope='module')
def straight(data, tmp_path_factory):
    """The uninterrupted run's entry."""
    out = tmp_path_factory.mktemp('straight') / 'out'
    assert main(command(data, out, maps=True)) == 0
    return read_results(out)['classes'][0]


def read_results(out):
    return json.loads((out / 'results.json').read_text())


@pytest.fixture(scope='module', autouse=True)  # from the start: it imports the project while the first tests run
def pausing_runs():
    """start(name, nth, flag, log, argv) -> the process id of a main.py run that stops in the nth write of the
    file `name` (tests/paused_write.py: the project is imported once, each run forked from there)."""
    server = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, 'tests', 'paused_write.py')],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def start(name, nth, flag, log, argv):
        server.stdin.write(json.dumps({'name': name, 'nth': nth, 'flag': str(flag), 'log': str(log),
                                       'argv': argv}) + '\n')
        server.stdin.flush()
        return int(server.stdout.readline())
    yield start
    server.stdin.close()
    server.wait(timeout=60)


@pytest.fixture
def flow_steps(monkeypatch):
    """The flow steps taken from now on."""
    taken, real_step = [], train.flow_step
    monkeypatch.setattr(train, 'flow_step', lambda *args: taken.append(1) or real_step(*args))
    return taken


def saved_meta_epoch(out):
    state = torch.load(out / 'resume' / 'widget_seed0.pt', map_location='cpu', weights_only=True)
    return state['meta_epoch']


def temporaries(out):
    return [name for _, _, names in os.walk(out) for name in names if name.endswith('.part')]


def resume_and_compare(out, straight, capsys, flow_steps, trained_before, maps=False):
    """--resume: it says where it continues, trains only the meta epochs after `trained_before` (none when
    it is the last), and ends with the uninterrupted run's numbers, its files whole, its resume state gone."""
    capsys.readouterr()
    flow_steps.clear()
    assert main(['--resume', str(out)]) == 0
    printed = capsys.readouterr().out
    assert f'resumed after meta epoch {trained_before}' in printed
    assert not [epoch for epoch in range(trained_before + 1) if f'Train epoch {epoch}\n' in printed]
    assert len(flow_steps) == (LAST - trained_before) * STEPS_PER_META_EPOCH
    entry = read_results(out)['classes'][0]
    for key in COMPARED + (MAPS if maps else ()):
        assert entry[key] == straight[key], key
    assert read_results(out)['failed'] == [] and (out / 'widget_checkpoint.pt').is_file()
    if maps:
        assert sorted(os.listdir(out / 'maps' / 'widget')) == ['scratch_000.png', 'scratch_001.png']
    assert not (out / 'resume').exists() and not temporaries(out)


# --- an exception during training, and after it ---------------------------------------------------------

@pytest.mark.parametrize('error, status', [(RuntimeError('injected bug'), 1),
                                           (RuntimeError('DefaultCPUAllocator: out of memory'), 2)],
                         ids=['bug', 'out-of-memory'])
def test_an_exception_at_a_meta_epoch_keeps_the_ones_before(data, straight, tmp_path, monkeypatch, capsys, flow_steps,
                                                            error, status):
    real_sub_epoch = train.train_sub_epoch

    def failing_at_the_last_meta_epoch(model, optimizer, batches, config, label, steps):
        if label.startswith(f'{LAST}.'):
            raise error
        return real_sub_epoch(model, optimizer, batches, config, label, steps)
    monkeypatch.setattr(train, 'train_sub_epoch', failing_at_the_last_meta_epoch)
    out = tmp_path / 'out'
    assert main(command(data, out)) == status
    printed = capsys.readouterr().out
    assert saved_meta_epoch(out) == LAST - 1 and not temporaries(out)
    failure = next(line for line in printed.splitlines() if line.startswith('error:') and 'continue with' in line)
    assert ('injected bug' if status == 1 else 'out of memory') in failure
    assert failure.endswith(f'continue with: python main.py --resume {out}')
    assert f'  widget (seed 0): continue with: python main.py --resume {out}' in printed or status == 1  # the summary
    monkeypatch.setattr(train, 'train_sub_epoch', real_sub_epoch)
    resume_and_compare(out, straight, capsys, flow_steps, trained_before=LAST - 1)


def unreadable_image(*args):
    raise UserError('cannot read image test/scratch/000.png (OSError: image file is truncated)')


def buggy_report(results_dir, results, deviations, figures=True):
    if figures:  # the tables after each meta epoch are written; the report when the job ends is not
        raise ValueError('injected bug in the report')
    return write_results_files(results_dir, results, deviations, figures)


@pytest.mark.parametrize('where, replacement, status', [
    ('localize_class', unreadable_image, 2), ('write_results_files', buggy_report, 1)],
    ids=['maps: unreadable images', 'report: a bug'])
def test_a_failure_after_training_resumes_straight_to_the_results(data, straight, tmp_path, monkeypatch, capsys,
                                                                  flow_steps, where, replacement, status):
    real = getattr(jobs, where)
    monkeypatch.setattr(jobs, where, replacement)
    out, maps = tmp_path / 'out', where == 'localize_class'
    assert main(command(data, out, maps)) == status
    printed = capsys.readouterr()
    assert saved_meta_epoch(out) == LAST and not temporaries(out)
    assert re.search(r'^error: .*injected bug|^error: class widget \(seed 0\) failed: cannot read image', printed.out, re.M)
    assert printed.out.rstrip().endswith(f'continue with: python main.py --resume {out}') or \
        printed.err.rstrip().endswith(f'continue with: python main.py --resume {out}')
    monkeypatch.setattr(jobs, where, real)
    resume_and_compare(out, straight, capsys, flow_steps, trained_before=LAST, maps=maps)


# --- killed in the middle of a write --------------------------------------------------------------------

def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize('name, nth, trained_before', [('widget_checkpoint.pt', 1, LAST), ('widget_seed0.pt', 2, 0),
                                                       ('results.json', 3, LAST)],
                         ids=['checkpoint', 'resume state', 'results'])
def test_killed_in_the_middle_of_a_write(data, straight, pausing_runs, tmp_path, capsys, flow_steps, name, nth,
                                         trained_before):
    out, flag, log = tmp_path / 'out', tmp_path / 'paused', tmp_path / 'log'
    pid = pausing_runs(name, nth, flag, log, command(data, out))
    deadline = time.time() + 120
    while not flag.exists() and not gone(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert flag.exists(), log.read_text()[-2000:]
    os.kill(pid, signal.SIGKILL)
    while not gone(pid) and time.time() < deadline:
        time.sleep(0.02)
    half = temporaries(out)
    assert len(half) == 1 and half[0].startswith(f'.{name}.')  # the writer's own temporary file, never the file
    if name == 'results.json':
        assert read_results(out)['in_progress']['auroc']  # the whole file of the write before
    elif name == 'widget_checkpoint.pt':
        assert not (out / name).exists()
    assert saved_meta_epoch(out) == trained_before
    resume_and_compare(out, straight, capsys, flow_steps, trained_before)


# --- a full disk at each write ----------------------------------------------------------------------------

def full_disk_from(monkeypatch, fragment, nth):
    """Every write of a file whose name holds `fragment`, from its `nth` on, meets a full disk."""
    real_replace, seen = atomic_files.replace_atomically, []

    def replace(path, write):
        if fragment in os.path.basename(path):
            seen.append(path)
            if len(seen) >= nth:
                def no_space(part):
                    with open(part, 'wb') as handle:
                        handle.write(b'\0' * 1000)  # a partial file: the temporary must not survive
                    raise OSError(errno.ENOSPC, 'No space left on device')
                return real_replace(path, no_space)
        return real_replace(path, write)
    writers = [module for module in (atomic_files, model, resume_state, localization, plots)
               if hasattr(module, 'replace_atomically')]
    for module in writers:
        monkeypatch.setattr(module, 'replace_atomically', replace)
    return lambda: [monkeypatch.setattr(module, 'replace_atomically', real_replace) for module in writers]


@pytest.mark.parametrize('fragment, nth, status, trained_before', [
    ('widget_checkpoint.pt', 1, 1, LAST), ('results.json', 3, 1, LAST), ('scratch_000.png', 1, 2, LAST),
    ('widget_seed0.pt', 2, 2, 0)], ids=['checkpoint', 'results', 'map', 'resume state'])
def test_a_full_disk_at_each_write(data, straight, tmp_path, monkeypatch, capsys, flow_steps, fragment, nth, status,
                                   trained_before):
    free_again = full_disk_from(monkeypatch, fragment, nth)
    if fragment == 'widget_seed0.pt':  # the state after the last meta epoch is not written; then a failure
        monkeypatch.setattr(jobs, 'localize_class', unreadable_image)
    out, maps = tmp_path / 'out', fragment in ('scratch_000.png', 'widget_seed0.pt')
    assert main(command(data, out, maps)) == status
    printed = capsys.readouterr().out
    assert 'No space left on device' in printed and not temporaries(out)
    assert saved_meta_epoch(out) == trained_before
    free_again()
    monkeypatch.setattr(jobs, 'localize_class', localization.localize_class)
    resume_and_compare(out, straight, capsys, flow_steps, trained_before, maps)


# --- a damaged resume state -------------------------------------------------------------------------------

def stopped_after_meta_epoch_0(data, out):
    """A run of `data` into `out` stopped (Ctrl-C) in the last meta epoch: its state is the one after 0."""
    real_sub_epoch, patch = train.train_sub_epoch, pytest.MonkeyPatch()

    def interrupted(model, optimizer, batches, config, label, steps):
        if label.startswith(f'{LAST}.'):
            raise KeyboardInterrupt
        return real_sub_epoch(model, optimizer, batches, config, label, steps)
    patch.setattr(train, 'train_sub_epoch', interrupted)
    try:
        assert main(command(data, out)) == 130
    finally:
        patch.undo()
    return out


@pytest.fixture(scope='module')
def stopped(data, tmp_path_factory):
    """A stopped run's folder."""
    return stopped_after_meta_epoch_0(data, tmp_path_factory.mktemp('stopped') / 'out')


def truncated(state):
    state.write_bytes(state.read_bytes()[:len(state.read_bytes()) // 2])


def of_another_version(state):
    saved = torch.load(state, weights_only=True)
    torch.save({**saved, 'version': resume_state.VERSION - 1}, state)


def of_an_older_version_without_a_format(state):
    saved = torch.load(state, weights_only=True)
    torch.save({key: value for key, value in saved.items() if key not in ('format', 'version', 'settings')}, state)


def of_another_configuration(state):
    """As a run with another lr_init leaves it (the file of such a run, copied here, is refused the same way)."""
    saved = torch.load(state, weights_only=True)
    torch.save({**saved, 'settings': {**saved['settings'], 'lr_init': 0.001}}, state)


@pytest.mark.parametrize('damage, said', [(truncated, 'is damaged'), (of_another_version, 'another version'),
                                          (of_an_older_version_without_a_format, 'is not a resume state'),
                                          (of_another_configuration, 'another configuration (lr_init 0.001 there')])
def test_a_damaged_resume_state_is_refused_in_one_line_and_kept(stopped, tmp_path, capsys, flow_steps, damage, said):
    out = tmp_path / 'out'
    shutil.copytree(stopped, out)
    state = out / 'resume' / 'widget_seed0.pt'
    damage(state)
    before = state.read_bytes()
    capsys.readouterr()
    assert main(['--resume', str(out)]) == 2
    printed = capsys.readouterr()
    lines = [line for line in printed.out.splitlines() if line.startswith('error:') and str(state) in line]
    assert len(lines) == 1 and said in lines[0] and 'delete it to train this class from its start' in lines[0]
    assert 'Traceback' not in printed.out + printed.err
    assert flow_steps == [] and state.read_bytes() == before  # never trained over, never removed


# --- the free space a run needs, and the memory a job takes -------------------------------------------------

def test_a_new_checkpoint_needs_its_size_once_and_results_are_counted(tmp_path, monkeypatch):
    paper = tiny_config(n_scales=3, n_coupling_blocks=8, fc_internal=2048, pretrained=True, save_best=False,
                        resume_state=False, feature_cache=False)
    checkpoint = disk.checkpoint_bytes(paper)
    assert 680e6 < checkpoint < 700e6  # the paper's flow
    needs = disk.space_needs(paper, str(tmp_path), [(209, 83)])
    assert needs == {str(tmp_path): [('1 checkpoint file(s)', checkpoint), ('results', disk.RESULTS_BYTES_PER_JOB)]}
    monkeypatch.setattr(disk, 'free_bytes', lambda path: checkpoint + disk.RESULTS_BYTES_PER_JOB)
    disk.check_free_space(needs)  # fits exactly
    monkeypatch.setattr(disk, 'free_bytes', lambda path: checkpoint)
    expected = (f'the run writes {disk.size_text(checkpoint + disk.RESULTS_BYTES_PER_JOB)} ({tmp_path}: 1 checkpoint '
                f'file(s) {disk.size_text(checkpoint)}, results {disk.size_text(disk.RESULTS_BYTES_PER_JOB)}) where '
                f'{disk.size_text(checkpoint)} is free')
    with pytest.raises(UserError, match=re.escape(expected)):
        disk.check_free_space(needs)
    with_states = disk.space_needs(tiny_config(n_scales=3, n_coupling_blocks=8, fc_internal=2048, pretrained=True,
                                               save_best=True, grad_map_viz=True), str(tmp_path), [(209, 83)] * 3,
                                   running_at_once=2)
    assert dict(with_states[str(tmp_path)]) == {
        '3 checkpoint file(s)': 3 * checkpoint,
        '3 best checkpoint file(s), each replaced at a new maximum': 5 * checkpoint,
        'the resume states of 2 running job(s), each with the next beside it': 4 * disk.resume_state_bytes(paper),
        'results': 3 * (disk.RESULTS_BYTES_PER_JOB + 83 * disk.MAP_PNG_BYTES)}


@pytest.mark.parametrize('counter', [True, False], ids=['peak counter reset', 'sampled'])
def test_peak_memory_is_each_jobs_own(monkeypatch, tmp_path, counter):
    if not counter:
        monkeypatch.setattr(job_memory, 'reset_peak_counter', lambda: False)
    if job_memory.resident_bytes() is None:
        pytest.skip('needs /proc to measure a job alone')

    def job_of(megabytes):
        def run_class(config, *args):
            held = np.ones(megabytes * 2 ** 17)  # float64: 8 bytes each
            time.sleep(3 * job_memory.SAMPLE_S)
            del held
            return {'class_name': f'{megabytes} MB', 'seed': 0, 'status': 'done'}
        return run_class
    recorded = []
    for megabytes in (400, 0):  # the large job first: the small one must not inherit its peak
        monkeypatch.setattr(jobs, 'run_class', job_of(megabytes))
        jobs.run_job(tiny_config(), 'widget', 0, 'cpu', str(tmp_path), lambda entry, failure: recorded.append(entry))
    large, small = (entry['job_peak_rss_gib'] for entry in recorded)
    assert large - small > 0.3, (large, small)


def test_the_report_names_the_peak_memory_of_the_job(straight, tmp_path_factory):
    from reporting.report_html import report_html
    assert straight['job_peak_rss_gib'] > 0 and 'peak_rss_gib' not in straight
    page = report_html(str(tmp_path_factory.mktemp('report')), {'classes': [straight], 'seeds': [0], 'config': {}}, [])
    assert f"peak memory of this job: {straight['job_peak_rss_gib']:.2f} GiB resident" in page
    older = report_html(str(tmp_path_factory.mktemp('older')), {'classes': [
        {**straight, 'job_peak_rss_gib': None, 'peak_rss_gib': 3.5}], 'seeds': [0], 'config': {}}, [])
    assert 'peak memory of the process up to this job: 3.50 GiB resident' in older
