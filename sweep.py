"""Sweeps over processes and machines, and what their runs cost in disk.

    torchrun --nproc_per_node 8 main.py --dataset_path D --class_name all --seeds 0,1,2

torchrun starts one process per GPU, or several sharing each GPU (more processes than GPUs), or without GPUs
one per share of the CPU threads; the (class, seed) jobs of the run are handed out one at a time through the
launcher's own key-value store, largest first, so a process that finishes early takes the next job instead
of idling behind a fixed split. Each finished job is written whole to
<results_dir>/jobs/<class>_seed<seed>.json (failures too, with their error); rank 0 merges them into
results.json/md/csv and the plots when every process is done. `--resume DIR` with the same command runs only
the jobs that are missing or failed. A plain `python main.py` (or a torchrun of one process) does not come
here: main.run() does the jobs one after another as before.
"""
import datetime
import json
import os
import re
import socket
import sys
import time
from typing import NamedTuple

from utils import UserError, read_json, write_json_atomic
from report import results_markdown, write_results_files  # tables and plots of a run, as a one-process run writes them

JOBS_DIR = 'jobs'
JOB_FILE_NAME = re.compile(r'[^.].*_seed-?\d+\.json')
POLL_S = 0.5  # how often rank 0 looks whether the other processes are done
STORE_TIMEOUT = datetime.timedelta(hours=2)  # the longest a process waits for rank 0's plan
BYTES_PER_VALUE = 4  # float32 parameters and Adam moments


# --- disk: checkpoints and resume states ---------------------------------------------------------------

def flow_parameter_count(config):
    """Parameters of the flow that `config` builds, counted on the meta device (nothing is allocated)."""
    import torch
    from freia_funcs import DifferNetFlow
    from model import N_FEATURES_PER_SCALE
    with torch.device('meta'):
        flow = DifferNetFlow(N_FEATURES_PER_SCALE * config.n_scales, config.n_coupling_blocks, config.fc_internal,
                             config.clamp_alpha, config.dropout)
    return sum(parameter.numel() for parameter in flow.parameters())


def alexnet_parameter_count():
    import torch
    import torchvision
    with torch.device('meta'):
        features = torchvision.models.alexnet(weights=None).features
    return sum(parameter.numel() for parameter in features.parameters())


def checkpoint_bytes(config):
    """Size of one <class>_checkpoint.pt: the flow, plus the AlexNet weights when they cannot be reloaded
    from the ImageNet source (random or a weights_path file; model.save_checkpoint). The history and
    reference scores add kilobytes."""
    values = flow_parameter_count(config)
    if not config.pretrained or config.weights_path:
        values += alexnet_parameter_count()
    return values * BYTES_PER_VALUE


def resume_state_bytes(config):
    """Size of one resume state: the flow and Adam's two moments per parameter (train.save_resume_state)."""
    return 3 * flow_parameter_count(config) * BYTES_PER_VALUE


def size_text(n_bytes):
    for unit, scale in (('GB', 1e9), ('MB', 1e6), ('kB', 1e3)):
        if n_bytes >= scale:
            return f'{n_bytes / scale:.3g} {unit}'
    return f'{n_bytes} B'


def disk_text(config, n_jobs, running_at_once=1):
    """The line a run starts with: what its checkpoints and resume states will take on disk."""
    if config.save_checkpoint or config.save_best:
        files = ' + '.join(name for name, on in (('<class>_checkpoint.pt', config.save_checkpoint),
                                                 ('<class>_best.pt', config.save_best)) if on)
        per_job = checkpoint_bytes(config) * (int(config.save_checkpoint) + int(config.save_best))
        checkpoints = f'{size_text(per_job)} per job for {files} ({n_jobs} job{"s" if n_jobs != 1 else ""}: {size_text(n_jobs * per_job)})'
    else:
        checkpoints = 'no checkpoints (save_checkpoint = False)'
    if config.resume_state:
        per_running_job = resume_state_bytes(config)
        at_once = f', {running_at_once} at once: {size_text(running_at_once * per_running_job)}' \
            if running_at_once > 1 else ''
        states = f'{size_text(per_running_job)} per running job for its resume state (removed when the job ends{at_once})'
    else:
        states = 'no resume states (resume_state = False)'
    return f'disk: {checkpoints}; {states}'


# --- the launch -------------------------------------------------------------------------------------------

class Launch(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    restart: int  # torchrun --max_restarts: each attempt has its own keys in the store, continues the folder


def torchrun_launch(environ=None):
    """The Launch when torchrun started this process as one of two or more, else None."""
    environ = os.environ if environ is None else environ
    if 'LOCAL_RANK' not in environ or int(environ.get('WORLD_SIZE', '1')) < 2:
        return None
    return Launch(int(environ['RANK']), int(environ['WORLD_SIZE']), int(environ['LOCAL_RANK']),
                  int(environ.get('LOCAL_WORLD_SIZE', environ['WORLD_SIZE'])),
                  int(environ.get('TORCHELASTIC_RESTART_COUNT', '0')))


class RankZeroError(UserError):
    """Raised on the other ranks when rank 0 could not plan the sweep; rank 0 has printed why."""


class RankPrefixed:
    """A text stream that starts every line with `prefix` and writes whole lines only, so that lines of
    processes sharing one terminal or log do not cut into each other."""

    def __init__(self, stream, prefix):
        self.stream, self.prefix, self.partial = stream, prefix, ''

    def write(self, text):
        self.partial += text
        cut = max(self.partial.rfind('\n'), self.partial.rfind('\r')) + 1
        if cut:
            lines, self.partial = self.partial[:cut], self.partial[cut:]
            self.stream.write(''.join(self.prefix + line for line in lines.splitlines(keepends=True)))
            self.stream.flush()
        return len(text)

    def flush(self):
        self.stream.flush()

    def close_partial(self):
        if self.partial:
            self.write('\n')

    def __getattr__(self, name):
        return getattr(self.stream, name)


def prefix_output(launch):
    """Prefixes this process's stdout and stderr with its rank; returns a function that undoes it."""
    originals = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (RankPrefixed(stream, f'[rank {launch.rank}] ') for stream in originals)

    def restore():
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, RankPrefixed):
                stream.close_partial()
        sys.stdout, sys.stderr = originals
    return restore


def connect_store(launch):
    """The launcher's key-value store (torchrun's MASTER_ADDR:MASTER_PORT), under this sweep's own keys."""
    import torch.distributed as dist
    store, _, _ = next(dist.rendezvous('env://', launch.rank, launch.world_size, timeout=STORE_TIMEOUT))
    return dist.PrefixStore(f'differnet_sweep/{launch.restart}/', store)


def available_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def rank_device(config, launch):
    """This process's device: with CUDA, GPU LOCAL_RANK modulo the GPU count (more processes than GPUs share
    them round robin: on an H200 nine 8 x 8 runs at once took about 15 s of GPU time each, where a lone one
    would take about 27 s, a third of the timed full run; docs/gpu.md); else the CPU. Either way the process
    takes its share of the CPU threads: a GPU job still decodes its images there (and makes its views there
    with view_backend 'pil'), and torch's default, every core in every process, oversubscribes the CPU once
    several processes share it."""
    import torch
    from utils import resolve_device
    device = resolve_device(config.device)
    torch.set_num_threads(max(1, available_cpus() // launch.local_world_size))
    if device.type == 'cuda':
        n_gpus = torch.cuda.device_count()
        gpu = launch.local_rank % n_gpus
        if launch.local_rank == 0 and launch.local_world_size > n_gpus:
            print(f'{launch.local_world_size} processes share {n_gpus} GPU(s) on this machine '
                  f'(up to {-(-launch.local_world_size // n_gpus)} per GPU); each needs its own GPU memory '
                  '(nine 8 x 8 runs on an H200: 48 GB together)', flush=True)
        torch.cuda.set_device(gpu)
        return torch.device('cuda', gpu)
    return device


# --- jobs, their files, the merge --------------------------------------------------------------------------

def job_cost(config, n_train, n_test):
    """Views a job pushes through the network (training and test): what its run time follows."""
    test_passes = 1 if config.cache_test_features else config.meta_epochs
    return n_train * config.meta_epochs * config.sub_epochs * config.n_transforms + \
        n_test * config.n_transforms_test * test_passes


def plan_jobs(config, names, problems, done):
    """[{class_name, seed, cost}] of the jobs still to run, largest first (ties in run order), so that the
    long jobs do not start last and leave the other processes idle at the end."""
    from main import run_seeds
    from utils import find_class_samples
    jobs = []
    for class_index, class_name in enumerate(names):
        if class_name in problems:
            continue
        train_samples, test_samples = find_class_samples(config.dataset_path, class_name)
        cost = job_cost(config, len(train_samples), len(test_samples))
        for seed_index, seed in enumerate(run_seeds(config)):
            if (class_name, seed) not in done:
                jobs.append({'class_name': class_name, 'seed': seed, 'cost': cost, 'order': (class_index, seed_index)})
    jobs.sort(key=lambda job: (-job['cost'], job['order']))
    return [{'class_name': job['class_name'], 'seed': job['seed'], 'cost': job['cost']} for job in jobs]


def job_file(results_dir, class_name, seed):
    return os.path.join(results_dir, JOBS_DIR, f'{class_name}_seed{seed}.json')


def write_job_file(results_dir, class_name, seed, entry, failure, rank):
    """Records one finished job: status done, diverged (entry and error) or failed (error only)."""
    status = 'failed' if entry is None else entry['status']
    record = {'class_name': class_name, 'seed': seed, 'status': status,
              'error': failure['error'] if failure else None, 'entry': entry, 'rank': rank,
              'host': socket.gethostname(), 'finished': datetime.datetime.now().isoformat(timespec='seconds')}
    os.makedirs(os.path.join(results_dir, JOBS_DIR), exist_ok=True)
    write_json_atomic(job_file(results_dir, class_name, seed), record)
    return record


def read_job_files(results_dir):
    """{(class, seed): record} of the jobs/ folder (empty when there is none)."""
    folder = os.path.join(results_dir, JOBS_DIR)
    records = {}
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if JOB_FILE_NAME.fullmatch(name):  # not the temporary file of a write in progress
                record = read_json(os.path.join(folder, name))
                records[(record['class_name'], record['seed'])] = record
    return records


def finished_job_entries(results_dir):
    """results.json entries of the jobs that a sweep finished in `results_dir`."""
    return [record['entry'] for record in read_job_files(results_dir).values() if record['status'] == 'done']


def merged_results(config, names, problems, records, earlier=None):
    """results.json of the sweep, in the schema and order of a one-process run: the job files, and the
    finished entries of `earlier` results (a one-process run continued as a sweep) for jobs without one."""
    from main import run_seeds
    earlier_done = {(entry['class_name'], entry['seed']): entry for entry in (earlier or {}).get('classes', [])
                    if entry.get('status') == 'done'}
    classes, failed = [], []
    for class_name in names:
        if class_name in problems:
            failed.append({'class_name': class_name, 'seed': None, 'error': problems[class_name]})
            continue
        for seed in run_seeds(config):
            record = records.get((class_name, seed))
            if record is None:
                if (class_name, seed) in earlier_done:
                    classes.append(earlier_done[(class_name, seed)])
                else:
                    failed.append({'class_name': class_name, 'seed': seed,
                                   'error': 'not finished; --resume runs it'})
                continue
            if record['entry'] is not None:
                classes.append(record['entry'])
            if record['status'] != 'done':
                failed.append({'class_name': class_name, 'seed': seed, 'error': record['error']})
    return {'config': vars(config), 'seeds': run_seeds(config), 'classes': classes, 'failed': failed,
            'in_progress': None}


# --- the sweep ---------------------------------------------------------------------------------------------

def make_plan(config, resume, launch):
    """Rank 0: checks the run, creates (or reopens) the results folder, lists the jobs to run. Returns
    (the plan every process gets, the earlier results.json of the folder or None)."""
    from main import checked_class_names, fresh_results_dir, validate_config
    from utils import DEMO_CLASS, DEMO_DATASET_PATH, ensure_demo_dataset
    validate_config(config)
    if os.path.normpath(config.dataset_path) == DEMO_DATASET_PATH and ensure_demo_dataset(DEMO_DATASET_PATH):
        print(f'Generated the demo dataset in {DEMO_DATASET_PATH}/{DEMO_CLASS}')
    names, problems = checked_class_names(config)
    earlier_attempt = os.path.join(config.results_dir, 'results.json') if config.results_dir else ''
    if not resume and launch.restart and os.path.isfile(earlier_attempt):
        resume = (config.results_dir, read_json(earlier_attempt))
        print(f'torchrun restarted the processes (attempt {launch.restart + 1}): continuing {config.results_dir}')
    if resume:
        results_dir, earlier = resume
    else:
        results_dir, earlier = fresh_results_dir(config), None
    records = read_job_files(results_dir)
    done = {key for key, record in records.items() if record['status'] == 'done'}
    done |= {(entry['class_name'], entry['seed']) for entry in (earlier or {}).get('classes', [])
             if entry.get('status') == 'done'}
    jobs = plan_jobs(config, names, problems, done)
    if not resume:  # what --resume reads: the configuration, before any job has finished
        write_json_atomic(os.path.join(results_dir, 'results.json'), merged_results(config, names, problems, {}))
    for class_name, problem in problems.items():
        print(f'error: class {class_name} skipped: {problem}', flush=True)
    print(disk_text(config, len(jobs), min(launch.world_size, len(jobs))), flush=True)
    print(f'sweep: {len(jobs)} jobs over {launch.world_size} processes'
          + (f' ({len(done)} done before)' if done else '') + f', results in {results_dir}/', flush=True)
    return {'results_dir': results_dir, 'names': names, 'problems': problems, 'jobs': jobs}, earlier


def run_sweep(config, launch, resume=None):
    """This process's part of the sweep: takes jobs from the store until none is left; rank 0 then waits
    for the others and writes the merged results. Returns (results folder, failed jobs, jobs done): the
    counts of the whole sweep on rank 0, (.., 0, 0) on the others."""
    from main import POOL_WARNING, deviations_from_paper, run_job, with_precision
    from utils import resolve_device
    store = connect_store(launch)
    config, precision = with_precision(config, resolve_device(config.device))  # the same on every rank
    if launch.rank == 0:
        print(precision, flush=True)
        if config.train_feature_pool:
            print(POOL_WARNING.format(pool=config.train_feature_pool), flush=True)
        try:
            plan, earlier = make_plan(config, resume, launch)
        except BaseException as error:  # the others wait for the plan: tell them to stop
            store.set('plan', json.dumps({'error': f'{type(error).__name__}: {error}'}))
            raise
        store.set('plan', json.dumps(plan))
    else:
        plan, earlier = json.loads(store.get('plan')), None
        if 'error' in plan:
            raise RankZeroError(plan['error'])
    device = rank_device(config, launch)
    results_dir, jobs = plan['results_dir'], plan['jobs']
    try:
        while True:
            index = store.add('next_job', 1) - 1
            if index >= len(jobs):
                break
            class_name, seed = jobs[index]['class_name'], jobs[index]['seed']
            print(f'job {index + 1}/{len(jobs)}: {class_name} seed {seed} starts on {device}', flush=True)
            started, finished = time.time(), {}

            def record(entry, failure, class_name=class_name, seed=seed):
                finished.update(write_job_file(results_dir, class_name, seed, entry, failure, launch.rank))
            run_job(config, class_name, seed, device, results_dir, record, catch_all=True)
            print(f"job {index + 1}/{len(jobs)}: {class_name} seed {seed} {finished['status']} in "
                  f'{time.time() - started:.1f} s' + (' (error above)' if finished['error'] else ''), flush=True)
            if launch.rank == 0:  # results.json follows the sweep while it runs
                write_json_atomic(os.path.join(results_dir, 'results.json'), merged_results(
                    config, plan['names'], plan['problems'], read_job_files(results_dir), earlier))
        store.add('ranks_finished', 1)
        if launch.rank != 0:
            return results_dir, 0, 0
        while store.add('ranks_finished', 0) < launch.world_size:
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        print(f'Interrupted. Finished jobs are in {results_dir}/{JOBS_DIR}/. Run only the others with the same '
              f'torchrun options and:  main.py --resume {results_dir}', flush=True)
        raise
    results = merged_results(config, plan['names'], plan['problems'], read_job_files(results_dir), earlier)
    deviations = deviations_from_paper(config)
    write_results_files(results_dir, results, deviations)
    state_dir = os.path.join(results_dir, 'resume')
    if os.path.isdir(state_dir) and not os.listdir(state_dir):
        os.rmdir(state_dir)
    if isinstance(sys.stdout, RankPrefixed):  # the summary reads as a one-process run's
        sys.stdout.close_partial()
        sys.stdout = sys.stdout.stream
    print('\n' + results_markdown(results, deviations))
    print(f'Results: {results_dir}/ (results.json, results.md, results.csv, auroc.png, per-class scores and '
          f'plots; one file per job in {JOBS_DIR}/)', flush=True)
    print(f"Report: {os.path.join(results_dir, 'report.html')} (one page with every table and plot; open it in a "
          f'browser)', flush=True)
    return results_dir, len(results['failed']), len(results['classes'])
