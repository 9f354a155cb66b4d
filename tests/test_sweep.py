"""Sweeps with torchrun (the real launcher, gloo's store, CPU): same numbers as one process, one merged
table, a failing job reported, a killed rank resumed; and the disk a run says it will take."""
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from runner import disk
from runner import jobs, run_folder
from base import launch
from runner import sweep
from base.atomic_files import write_json_atomic
from conftest import REPO_ROOT, cuda, tiny_config
from freia_funcs import DifferNetFlow
from main import main
from model import DifferNet, save_checkpoint

TINY = ['--pretrained', 'false', '--img_size', '64', '--n_scales', '1', '--n_coupling_blocks', '2',
        '--fc_internal', '32', '--meta_epochs', '1', '--sub_epochs', '1', '--n_transforms', '2',
        '--n_transforms_test', '2', '--batch_size', '4', '--feature_cache', 'false', '--device', 'cpu',
        '--verbose', 'false']
COMPARED = ('auroc', 'test_loss', 'train_loss', 'test_scores', 'best_test_scores', 'last_auroc', 'max_auroc',
            'max_auroc_epoch', 'n_train_images', 'test_files')


def write_classes(root, train_counts):
    """One class per (name, n training images): noise images, 2 good and 2 anomalous test images."""
    rng = np.random.RandomState(0)
    for class_name, n_train in train_counts.items():
        for folder, count in {'train/good': n_train, 'test/good': 2, 'test/scratch': 2}.items():
            os.makedirs(root / class_name / folder, exist_ok=True)
            for i in range(count):
                pixels = rng.randint(0, 255, (40, 40, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(root / class_name / folder / f'{i:03d}.png')


def torchrun(*args, processes=2):
    """The launcher as a user starts it: two processes on this machine, a free port of its own choosing."""
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(processes),
            os.path.join(REPO_ROOT, 'main.py'), *args]


def read_results(folder):
    return json.loads((folder / 'results.json').read_text())


def test_sweep_over_two_processes_equals_one_process_and_reports_a_failing_job(tmp_path, capsys):
    data = tmp_path / 'data'
    write_classes(data, {'alpha': 5, 'beta': 3, 'gamma': 4})
    (data / 'broken' / 'train' / 'good').mkdir(parents=True)
    (data / 'broken' / 'test' / 'good').mkdir(parents=True)
    (data / 'broken' / 'train' / 'good' / '000.png').write_bytes(b'')  # unreadable: the job fails
    Image.new('RGB', (40, 40)).save(data / 'broken' / 'test' / 'good' / '000.png')
    common = ['--dataset_path', str(data), '--class_name', 'all', *TINY]

    # the reference, with the CPU threads each of the two processes gets (thread counts change float sums)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, sweep.available_cpus() // 2))
    try:
        assert main([*common, '--results_dir', str(tmp_path / 'one')]) == 1  # broken failed, the rest ran
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    one = read_results(tmp_path / 'one')
    estimate = disk.checkpoint_bytes(tiny_config())
    assert f'disk: {disk.size_text(estimate)} per job for <class>_checkpoint.pt (4 jobs' in printed
    actual = (tmp_path / 'one' / 'alpha_checkpoint.pt').stat().st_size
    assert estimate <= actual <= estimate * 1.02 + 50_000

    swept = tmp_path / 'swept'
    launch = subprocess.run(torchrun(*common, '--results_dir', str(swept), '--save_checkpoint', 'false'),
                            capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert launch.returncode != 0, launch.stdout  # rank 0 exits 1: a job failed
    assert 'disk: no checkpoints (save_checkpoint = False)' in launch.stdout
    assert '[rank 1] job' in launch.stdout and '[rank 0] job' in launch.stdout
    many = read_results(swept)
    assert [(e['class_name'], e['seed']) for e in many['classes']] == [('alpha', 0), ('beta', 0), ('gamma', 0)]
    for expected, got in zip(one['classes'], many['classes'], strict=True):
        for key in COMPARED:
            assert expected[key] == got[key], (expected['class_name'], key)
        assert 'checkpoint' in expected and 'checkpoint' not in got
    assert not list(swept.glob('*.pt')) and not (swept / 'resume').exists()
    assert 'reference views' in printed and 'reference views' not in launch.stdout  # not extracted for nothing
    assert [f['class_name'] for f in many['failed']] == ['broken']
    assert 'zero-byte file' in many['failed'][0]['error']
    assert sorted(p.name for p in (swept / 'jobs').iterdir()) == \
        ['alpha_seed0.json', 'beta_seed0.json', 'broken_seed0.json', 'gamma_seed0.json']
    assert json.loads((swept / 'jobs' / 'broken_seed0.json').read_text())['status'] == 'failed'
    # one merged table, as a one-process run writes it; F1 at a checkpoint's threshold only where one was saved
    def without_f1(text):
        return re.sub(r'## Image-level F1.*?(?=\n## )', '', text, flags=re.S)
    assert without_f1((swept / 'results.md').read_text()) == without_f1((tmp_path / 'one' / 'results.md').read_text())
    assert "F1 at the checkpoint's threshold" in (swept / 'results.md').read_text()
    assert (swept / 'results.md').read_text() in launch.stdout
    for name in ('auroc.png', 'alpha_roc.png', 'gamma_scores.csv', 'results.csv'):
        assert (swept / name).stat().st_size > 0


def worker_pids(launcher_pid):
    """{rank: pid} of the processes torchrun started, read from /proc (their environment holds RANK)."""
    workers = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as handle:
                parent = int(handle.read().rsplit(')', 1)[1].split()[1])
            if parent != launcher_pid:
                continue
            with open(f'/proc/{entry}/environ', 'rb') as handle:
                environment = dict(item.split(b'=', 1) for item in handle.read().split(b'\0') if b'=' in item)
        except (OSError, ValueError, IndexError):
            continue
        if b'RANK' in environment:
            workers[int(environment[b'RANK'])] = int(entry)
    return workers


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='finds the worker processes in /proc')
def test_killed_rank_then_resume_runs_only_the_missing_jobs(tmp_path):
    data = tmp_path / 'data'
    write_classes(data, {'alpha': 4, 'beta': 4, 'gamma': 4})
    out = tmp_path / 'out'
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    launcher = subprocess.Popen(
        torchrun('--dataset_path', str(data), '--class_name', 'all', '--seeds', '0,1', '--results_dir', str(out),
                 *TINY, '--meta_epochs', '3', '--sub_epochs', '2', '--resume_interval_s', '0'),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(tmp_path))
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / 'jobs').glob('*.json')):
        time.sleep(0.05)
    killed = worker_pids(launcher.pid)[1]
    os.kill(killed, signal.SIGKILL)  # a crash: no handler runs
    first_output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode != 0
    before = {path.name: (path.stat().st_mtime_ns, path.read_text()) for path in (out / 'jobs').glob('*.json')}
    assert 1 <= len(before) < 6, first_output
    assert 'main.py --resume' in first_output  # rank 0, stopped by the launcher, says how to go on

    resumed = subprocess.run(torchrun('--resume', str(out)), capture_output=True, text=True, timeout=600,
                             env=env, cwd=str(tmp_path))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    missing = {f'{c}_seed{s}.json' for c in ('alpha', 'beta', 'gamma') for s in (0, 1)} - set(before)
    started = {f'{match[0]}_seed{match[1]}.json'
               for match in re.findall(r'job \d+/\d+: (\w+) seed (\d+) starts on', resumed.stdout)}
    assert started == missing
    assert f'sweep: {len(missing)} jobs over 2 processes ({len(before)} done before)' in resumed.stdout
    for name, (mtime, text) in before.items():  # finished jobs were not run again
        assert (out / 'jobs' / name).stat().st_mtime_ns == mtime and (out / 'jobs' / name).read_text() == text
    results = read_results(out)
    assert len(results['classes']) == 6 and results['failed'] == [] and results['in_progress'] is None
    assert all(len(entry['auroc']) == 3 for entry in results['classes'])
    assert not (out / 'resume').exists()  # every job's resume state went when the job ended
    assert not list(out.rglob('*.part'))  # nor did a temporary file the killed rank may have been writing


def test_one_process_resume_of_a_sweep_folder_keeps_its_finished_jobs(official_tree, tmp_path, capsys):
    common = ['--dataset_path', str(official_tree), '--class_name', 'widget', '--seeds', '0,1', *TINY]
    assert main([*common, '--results_dir', str(tmp_path / 'one')]) == 0
    entry = read_results(tmp_path / 'one')['classes'][0]
    out = tmp_path / 'sweep'  # as a sweep stopped after its first job leaves it
    out.mkdir()
    write_json_atomic(str(out / 'results.json'), {**read_results(tmp_path / 'one'), 'classes': []})
    run_folder.write_job_file(str(out), 'widget', 0, entry, None, rank=1)
    capsys.readouterr()
    assert main(['--resume', str(out)]) == 0
    printed = capsys.readouterr().out
    assert '=== widget (seed 1' in printed and '=== widget (seed 0' not in printed
    assert [(e['class_name'], e['seed']) for e in read_results(out)['classes']] == [('widget', 0), ('widget', 1)]


def test_jobs_are_handed_out_largest_first(tmp_path):
    write_classes(tmp_path, {'small': 2, 'large': 6, 'medium': 4})
    config = tiny_config(dataset_path=str(tmp_path), seeds=(0, 1))
    planned = sweep.plan_jobs(config, ['large', 'medium', 'small'], {}, done={('medium', 1)})
    assert [(job['class_name'], job['seed']) for job in planned] == [('large', 0), ('large', 1), ('medium', 0),
                                                                  ('small', 0), ('small', 1)]


def test_merged_results_keep_run_order_and_list_failures():
    config = tiny_config(seeds=(0, 1))
    entry = {'class_name': 'b', 'seed': 0, 'status': 'done'}
    diverged = {'class_name': 'b', 'seed': 1, 'status': 'diverged'}
    records = {('b', 1): {'status': 'diverged', 'entry': diverged, 'error': 'loss is nan'},
               ('b', 0): {'status': 'done', 'entry': entry, 'error': None}}
    results = sweep.merged_results(config, ['a', 'b'], {'a': 'no images'}, records)
    assert results['classes'] == [entry, diverged] and results['in_progress'] is None
    assert results['failed'] == [{'class_name': 'a', 'seed': None, 'error': 'no images'},
                                 {'class_name': 'b', 'seed': 1, 'error': 'loss is nan'}]
    without_checkpoint = {**entry, 'checkpoint_error': 'cannot write b_checkpoint.pt'}
    records[('b', 0)] = {'status': 'done', 'entry': without_checkpoint, 'error': 'finished, but its checkpoint ...'}
    results = sweep.merged_results(config, ['b'], {}, records)
    assert results['classes'] == [without_checkpoint, diverged]  # its numbers are kept; --resume writes it
    assert [failure['seed'] for failure in results['failed']] == [0, 1]


def test_flow_parameters_counted_without_building_match_a_built_flow():
    for sizes in [dict(n_scales=1, n_coupling_blocks=2, fc_internal=32), dict(n_scales=3, n_coupling_blocks=3,
                                                                             fc_internal=20)]:
        config = tiny_config(**sizes)
        flow = DifferNetFlow(256 * config.n_scales, config.n_coupling_blocks, config.fc_internal)
        assert disk.flow_parameter_count(config) == sum(p.numel() for p in flow.parameters())
    # the paper's flow: 8 blocks of two subnets 384 -> 2048 -> 2048 -> 2048 -> 768
    subnet = 384 * 2048 + 2048 + 2 * (2048 * 2048 + 2048) + 2048 * 768 + 768
    assert disk.flow_parameter_count(tiny_config(n_scales=3, n_coupling_blocks=8, fc_internal=2048)) == 16 * subnet


def test_resume_state_size_is_what_the_estimate_says(tmp_path):
    import train
    from base.resume_state import save_resume_state
    config = tiny_config()
    model = DifferNet(config)
    optimizer = train.make_optimizer(model.nf, config)
    train.flow_step(model, optimizer, torch.randn(8, model.n_features))  # Adam's moments exist now
    path = str(tmp_path / 'state.pt')
    save_resume_state(path, 0, model, optimizer, {'auroc': [0.5]}, [1.0], [1.0], 1.0, {'lr_init': 2e-4}, [0])
    estimate = disk.resume_state_bytes(config)
    assert estimate <= os.path.getsize(path) <= estimate * 1.05 + 50_000
    save_checkpoint(str(tmp_path / 'c.pt'), model, config, 'random', {}, {})
    assert disk.checkpoint_bytes(config) <= os.path.getsize(tmp_path / 'c.pt') <= disk.checkpoint_bytes(config) * 1.02 + 50_000


def test_disk_line_names_what_is_off():
    assert disk.disk_text(tiny_config(save_checkpoint=False, resume_state=False), 3) == \
        'disk: no checkpoints (save_checkpoint = False); no resume states (resume_state = False)'
    paper = disk.disk_text(tiny_config(n_scales=3, n_coupling_blocks=8, fc_internal=2048, pretrained=True,
                                        save_best=True), 15, running_at_once=8)
    assert paper == ('disk: 1.38 GB per job for <class>_checkpoint.pt + <class>_best.pt (15 jobs: 20.6 GB); '
                     '2.06 GB per running job for its resume state (removed when the job has finished, kept for --resume '
                     'when it fails, 8 at once: 16.5 GB)')


def test_rank_prefix_writes_whole_lines():
    target = io.StringIO()
    stream = launch.RankPrefixed(target, '[rank 1] ')
    stream.write('half ')
    assert target.getvalue() == ''
    stream.write('a line\nnext\n\nlast')
    assert target.getvalue() == '[rank 1] half a line\n[rank 1] next\n[rank 1] \n'
    stream.close_partial()
    assert target.getvalue().endswith('[rank 1] last\n')


def test_plain_runs_are_not_sweeps():
    assert launch.torchrun_launch({}) is None
    assert launch.torchrun_launch({'LOCAL_RANK': '0', 'RANK': '0', 'WORLD_SIZE': '1'}) is None  # torchrun of one
    started = launch.torchrun_launch({'LOCAL_RANK': '1', 'RANK': '5', 'WORLD_SIZE': '8', 'LOCAL_WORLD_SIZE': '4'})
    assert started == launch.Launch(rank=5, world_size=8, local_rank=1, local_world_size=4, restart=0)


def test_a_crashing_job_is_recorded_in_a_sweep_and_raises_in_a_plain_run(monkeypatch, tmp_path):

    def crash(*args):
        raise ValueError('a bug')
    monkeypatch.setattr(jobs, 'run_class', crash)
    recorded = []
    jobs.run_job(tiny_config(), 'widget', 3, 'cpu', str(tmp_path), lambda *both: recorded.append(both),
                 catch_all=True)
    assert recorded == [(None, {'class_name': 'widget', 'seed': 3, 'error': 'ValueError: a bug'})]
    with pytest.raises(ValueError):
        jobs.run_job(tiny_config(), 'widget', 3, 'cpu', str(tmp_path), lambda *both: None)


def test_a_restarted_attempt_continues_its_results_dir(official_tree, tmp_path, capsys):
    out = tmp_path / 'out'
    config = tiny_config(dataset_path=str(official_tree), class_name='widget', seeds=(0, 1), results_dir=str(out))
    first, _, _ = sweep.make_plan(config, None, launch.Launch(0, 2, 0, 2, restart=0), torch.device('cpu'))
    assert [job['seed'] for job in first['jobs']] == [0, 1] and (out / 'results.json').is_file()
    run_folder.write_job_file(str(out), 'widget', 1, {'class_name': 'widget', 'seed': 1, 'status': 'done'}, None, 0)
    again, _, earlier = sweep.make_plan(config, None, launch.Launch(0, 2, 0, 2, restart=1),  # torchrun --max_restarts
                                        torch.device('cpu'))
    assert again['results_dir'] == str(out) and [job['seed'] for job in again['jobs']] == [0]
    assert earlier['config']['results_dir'] == str(out)
    assert 'continuing' in capsys.readouterr().out


def test_more_processes_than_gpus_share_them_round_robin(monkeypatch, capsys):
    monkeypatch.setattr(sweep, 'resolve_device', lambda name: torch.device('cuda'))
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    chosen = []
    monkeypatch.setattr(torch.cuda, 'set_device', chosen.append)
    monkeypatch.setattr(sweep, 'available_cpus', lambda: 16)
    threads = []
    monkeypatch.setattr(torch, 'set_num_threads', threads.append)
    devices = [sweep.rank_device(tiny_config(), launch.Launch(rank, 5, rank, 5, 0)) for rank in range(5)]
    assert devices == [torch.device('cuda', gpu) for gpu in (0, 1, 0, 1, 0)]
    assert chosen == [0, 1, 0, 1, 0]
    assert threads == [3] * 5  # 16 cores shared by 5 processes, GPU or not
    assert capsys.readouterr().out.count('5 processes share 2 GPU(s) on this machine (up to 3 per GPU)') == 1


def test_out_of_memory_on_a_gpu_hands_the_cached_memory_back(monkeypatch, tmp_path, capsys):

    def out_of_memory(*args):
        raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB')
    monkeypatch.setattr(jobs, 'run_class', out_of_memory)
    emptied = []
    monkeypatch.setattr(torch.cuda, 'empty_cache', lambda: emptied.append(True))
    recorded = []
    for device in ('cuda:1', 'cpu'):
        jobs.run_job(tiny_config(), 'widget', 0, device, str(tmp_path), lambda *both: recorded.append(both))
    assert emptied == [True]  # the GPU job only
    assert [failure['error'].startswith('out of memory on ') for entry, failure in recorded] == [True, True]
    assert 'lower batch_size' in capsys.readouterr().out


@cuda
def test_cuda_sweep_with_more_processes_than_gpus(tmp_path):
    """The real launcher on the real GPUs, one process more than there are: every job runs, one table."""
    data = tmp_path / 'data'
    write_classes(data, {'alpha': 5, 'beta': 3, 'gamma': 4})
    n_gpus = torch.cuda.device_count()
    tiny_on_cuda = [value if value != 'cpu' else 'cuda' for value in TINY]
    launch = subprocess.run(torchrun('--dataset_path', str(data), '--class_name', 'all', *tiny_on_cuda,
                                     '--results_dir', str(tmp_path / 'out'), processes=n_gpus + 1),
                            capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert launch.returncode == 0, launch.stdout + launch.stderr
    assert f'{n_gpus + 1} processes share {n_gpus} GPU(s)' in launch.stdout
    assert 'starts on cuda:' in launch.stdout and 'starts on cpu' not in launch.stdout
    merged = read_results(tmp_path / 'out')
    assert sorted(entry['class_name'] for entry in merged['classes']) == ['alpha', 'beta', 'gamma']
    assert not merged['failed']
