"""Sweeps: the jobs of a run shared out over the processes of a torchrun, on one machine or several.

    torchrun --nproc_per_node 8 main.py --dataset_path D --class_name all --seeds 0,1,2

torchrun starts one process per GPU, or several sharing each GPU (more processes than GPUs), or without GPUs
one per share of the CPU threads; the (class, seed) jobs of the run are handed out one at a time through the
launcher's own key-value store, largest first, so a process that finishes early takes the next job instead
of idling behind a fixed split. Each finished job is written whole to
<results_dir>/jobs/<class>_seed<seed>.json (failures too, with their error); rank 0 merges them into
results.json/md/csv and the plots when every process is done. `--resume DIR` with the same command runs only
the jobs that are missing or failed. A plain `python main.py` (or a torchrun of one process) does not come
here: jobs.run() does the jobs one after another.
"""
import datetime
import json
import logging
import os
import time

import torch
import torch.distributed as dist

from base.atomic_files import WriteFailed, read_json, write_json_atomic
from base.hardware import resolve_device
from base.launch import RankZeroError
from base.logs import drop_rank_prefix
from base.settings import deviations_from_paper, run_seeds, stored_config, with_values
from base.settings_table import MACHINE_SETTINGS
from runner.failures import continue_command
from runner.jobs import check_disk, class_sizes, end_run, run_job, start_run, write_results_or_warn
from runner.run_folder import (JOBS_DIR, done_entries, finished_entries, fresh_results_dir, read_job_files,
                               write_job_file)

logger = logging.getLogger(__name__)

POLL_S = 0.5  # how often rank 0 looks whether the other processes are done
STORE_TIMEOUT = datetime.timedelta(hours=2)  # the longest a process waits for rank 0's plan


def connect_store(launch):
    """The launcher's key-value store (torchrun's MASTER_ADDR:MASTER_PORT), under this sweep's own keys."""
    store, _, _ = next(dist.rendezvous('env://', launch.rank, launch.world_size, timeout=STORE_TIMEOUT))
    return dist.PrefixStore(f'differnet_sweep/{launch.restart}/', store)


def available_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def rank_device(config, launch):
    """This process's device: with CUDA, GPU LOCAL_RANK modulo the GPU count (more processes than GPUs share
    them round robin: small jobs leave a GPU mostly idle, docs/gpu.md); else the CPU. Either way the process
    takes its share of the CPU threads: a GPU job still decodes its images there (and makes its views there
    with view_backend 'pil'), and torch's default, every core in every process, oversubscribes the CPU once
    several processes share it."""
    device = resolve_device(config.device)
    torch.set_num_threads(max(1, available_cpus() // launch.local_world_size))
    if device.type == 'cuda':
        n_gpus = torch.cuda.device_count()
        gpu = launch.local_rank % n_gpus
        if launch.local_rank == 0 and launch.local_world_size > n_gpus:
            logger.info(f'{launch.local_world_size} processes share {n_gpus} GPU(s) on this machine '
                        f'(up to {-(-launch.local_world_size // n_gpus)} per GPU); each needs its own GPU memory '
                        '(docs/gpu.md)')
        torch.cuda.set_device(gpu)
        return torch.device('cuda', gpu)
    return device


def job_cost(config, n_train, n_test):
    """Views a job pushes through the network (training and test): what its run time follows."""
    test_passes = 1 if config.cache_test_features else config.meta_epochs
    return n_train * config.meta_epochs * config.sub_epochs * config.n_transforms + \
        n_test * config.n_transforms_test * test_passes


def plan_jobs(config, names, problems, done):
    """[{class_name, seed, cost}] of the jobs still to run, largest first (ties in run order), so that the
    long jobs do not start last and leave the other processes idle at the end."""
    jobs = []
    sizes = class_sizes(config, [name for name in names if name not in problems])
    for class_index, class_name in enumerate(names):
        if class_name in problems:
            continue
        cost = job_cost(config, *sizes[class_name])  # the images a job trains on, after validation and subset
        for seed_index, seed in enumerate(run_seeds(config)):
            if (class_name, seed) not in done:
                jobs.append({'class_name': class_name, 'seed': seed, 'cost': cost, 'order': (class_index, seed_index)})
    jobs.sort(key=lambda job: (-job['cost'], job['order']))
    return [{'class_name': job['class_name'], 'seed': job['seed'], 'cost': job['cost']} for job in jobs]


def merged_results(config, names, problems, records, earlier=None):
    """results.json of the sweep, in the schema and order of a one-process run: the job files, and the
    finished entries of `earlier` results (a one-process run continued as a sweep) for jobs without one."""
    earlier_done = done_entries(earlier)
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
                                   'error': 'not finished (its process stopped)'})
                continue
            if record['entry'] is not None:
                classes.append(record['entry'])
            if record['status'] != 'done' or record['error']:  # a checkpoint not written fails its job too
                failed.append({'class_name': class_name, 'seed': seed, 'error': record['error']})
    return {'config': stored_config(config), 'seeds': run_seeds(config), 'classes': classes, 'failed': failed,
            'in_progress': None}


def make_plan(config, resume, launch, device):
    """Rank 0: checks the run, creates (or reopens) the results folder, lists the jobs to run. Returns
    (the plan every process gets, the config with the precision decided, the earlier results.json of the
    folder or None)."""
    config, names, problems = start_run(config, device)
    earlier_attempt = os.path.join(config.results_dir, 'results.json') if config.results_dir else ''
    if not resume and launch.restart and os.path.isfile(earlier_attempt):
        resume = (config.results_dir, read_json(earlier_attempt))
        logger.info(f'torchrun restarted the processes (attempt {launch.restart + 1}): continuing {config.results_dir}')
    if resume:
        results_dir, earlier = resume
    else:
        results_dir, earlier = fresh_results_dir(config, names), None
    done = set(finished_entries(results_dir, earlier))
    jobs = plan_jobs(config, names, problems, done)
    if not resume:  # what --resume reads: the configuration, before any job has finished
        write_json_atomic(os.path.join(results_dir, 'results.json'), merged_results(config, names, problems, {}))
    for class_name, problem in problems.items():
        logger.error(f'error: class {class_name} skipped: {problem}')
    check_disk(config, results_dir, [(job['class_name'], job['seed']) for job in jobs],
               min(launch.world_size, len(jobs)))
    logger.info(f'sweep: {len(jobs)} jobs over {launch.world_size} processes'
                + (f' ({len(done)} done before)' if done else '') + f', results in {results_dir}/')
    return {'results_dir': results_dir, 'names': names, 'problems': problems, 'jobs': jobs}, config, earlier


def shared_plan(config, resume, launch, store):
    """(plan, config with the precision decided, earlier results or None) on every rank: rank 0 makes the
    plan and hands it out through the store; a failure there stops the other ranks too."""
    device = resolve_device(config.device)
    if launch.rank == 0:
        try:
            plan, config, earlier = make_plan(config, resume, launch, device)
        except BaseException as error:  # the others wait for the plan: tell them to stop
            store.set('plan', json.dumps({'error': f'{type(error).__name__}: {error}'}))
            raise
        plan['machine_choices'] = {name: getattr(config, name) for name in MACHINE_SETTINGS}
        store.set('plan', json.dumps(plan))
        return plan, config, earlier
    plan = json.loads(store.get('plan'))
    if 'error' in plan:
        raise RankZeroError(plan['error'])
    return plan, with_values(config, **plan['machine_choices']), None  # rank 0's choices


def take_jobs(config, plan, earlier, launch, store, device):
    """Runs jobs taken from the store, one at a time, until none is left; rank 0 keeps results.json
    following them."""
    results_dir, jobs = plan['results_dir'], plan['jobs']
    while True:
        index = store.add('next_job', 1) - 1
        if index >= len(jobs):
            return
        class_name, seed = jobs[index]['class_name'], jobs[index]['seed']
        logger.info(f'job {index + 1}/{len(jobs)}: {class_name} seed {seed} starts on {device}')
        started, finished = time.time(), {}

        def record(entry, failure, class_name=class_name, seed=seed):
            try:
                finished.update(write_job_file(results_dir, class_name, seed, entry, failure, launch.rank))
                return True
            except WriteFailed as error:  # --resume runs the job again, from its resume state
                logger.error(f'error: {error}; this job is not recorded')
                finished.update(status='not recorded', error=str(error))
                return False
        run_job(config, class_name, seed, device, results_dir, record, catch_all=True)
        logger.info(f"job {index + 1}/{len(jobs)}: {class_name} seed {seed} {finished['status']} in "
                    f'{time.time() - started:.1f} s' + (' (error above)' if finished['error'] else ''))
        if launch.rank == 0:  # results.json follows the sweep while it runs
            try:
                write_json_atomic(os.path.join(results_dir, 'results.json'), merged_results(
                    config, plan['names'], plan['problems'], read_job_files(results_dir), earlier))
            except WriteFailed as error:
                logger.warning(f'warning: {error}; it is written again after the next job')


def run_sweep(config, launch, resume=None):
    """This process's part of the sweep: takes jobs from the store until none is left; rank 0 then waits
    for the others and writes the merged results. Returns (results folder, failed jobs, jobs done): the
    counts of the whole sweep on rank 0, (.., 0, 0) on the others."""
    store = connect_store(launch)
    plan, config, earlier = shared_plan(config, resume, launch, store)
    device = rank_device(config, launch)
    results_dir = plan['results_dir']
    try:
        take_jobs(config, plan, earlier, launch, store, device)
        store.add('ranks_finished', 1)
        if launch.rank != 0:
            return results_dir, 0, 0
        while store.add('ranks_finished', 0) < launch.world_size:
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        logger.info(f'Interrupted. Finished jobs are in {results_dir}/{JOBS_DIR}/; the others continue where they '
                    f'stopped with the same torchrun options and:  main.py --resume {results_dir} (or in one '
                    f'process: {continue_command(results_dir)})')
        raise
    results = merged_results(config, plan['names'], plan['problems'], read_job_files(results_dir), earlier)
    deviations = deviations_from_paper(config)
    if not write_results_or_warn(results_dir, results, deviations):
        results['failed'].append({'class_name': '(results files)', 'seed': None,
                                  'error': f'the results files in {results_dir} could not be written'})
    drop_rank_prefix()  # the summary reads as a one-process run's
    end_run(results_dir, results, deviations, where_else=f'; one file per job in {JOBS_DIR}/')
    return results_dir, len(results['failed']), len(results['classes'])
