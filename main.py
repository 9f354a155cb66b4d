"""DifferNet (Rudolph, Wandt, Rosenhahn, WACV 2021): train on defect-free images, report image AUROC.

    python main.py                                   # the demo set, paper settings
    python main.py --dataset_path ../shared/data/mvtec --class_name bottle
    python main.py --help                            # every setting of config.py, overridable here

The story: read config.py and the command line, then run the command: training (runner/jobs.py runs the
(class, seed) jobs one after another; runner/sweep.py shares them out under torchrun), or scoring new images
with a checkpoint (deployment/scoring.py), or exporting one (deployment/export.py). Each job finds the class's images, builds the network with ImageNet AlexNet
weights, trains the flow, prints the AUROC after every meta epoch and writes results.json (docs/architecture.md).
"""
import argparse
import difflib
import logging
import re
import shlex
import signal
import sys

from base.errors import RunStopped, UserError
from base.launch import RankZeroError, prefix_stderr, torchrun_launch
from base.logs import configure_logging
from base.settings import AUTO_SETTINGS, build_config, config_comments, config_defaults, parse_value, resumed_config

logger = logging.getLogger(__name__)


class ConfigArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        match = re.search(r'unrecognized arguments: (--?[\w-]+)', message)
        if match:
            close = difflib.get_close_matches(match.group(1).lstrip('-'), config_defaults(), n=1)
            if close:
                message += f' (did you mean --{close[0]}?)'
        self.exit(2, f'{self.prog}: error: {message}\n')


def parse_command_line(argv):
    """Returns (config, other options). Every config.py value is an option `--name VALUE`."""
    parser = ConfigArgumentParser(
        prog='main.py', allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Train DifferNet and report image-level AUROC per meta epoch. '
                    'Every setting of config.py can be given here.')
    defaults = config_defaults()
    for name, comment in config_comments().items():
        default = defaults[name]

        def typed(text, default=default, name=name):
            if name in AUTO_SETTINGS and text.strip().lower() == 'auto':
                return 'auto'
            try:
                return parse_value(text, default)
            except (ValueError, SyntaxError):
                raise argparse.ArgumentTypeError(
                    f"--{name} expects {type(default).__name__} like {default!r}, got '{text}'") from None
        parser.add_argument(f'--{name}', type=typed, default=default, metavar='VALUE',
                            help=f'{comment} (default: {default!r})')
    parser.add_argument('--resume', metavar='RESULTS_DIR', default='',
                        help='continue an interrupted run exactly where it stopped, with its own config and seeds; '
                             'options that change no number (device, num_workers, feature_cache_dir, ...) apply, '
                             'others are refused')
    scoring = parser.add_argument_group('scoring new images (instead of training)')
    scoring.add_argument('--score', nargs='+', metavar='PATH', help='image files or folders (searched recursively)')
    scoring.add_argument('--checkpoint', metavar='FILE', help='a <class>_checkpoint.pt of a run, or an official '
                         'save_weights state dict (then img_size etc. come from the settings above)')
    scoring.add_argument('--threshold', type=float, metavar='X', help='anomalous when score > X (default: the '
                         'score at threshold_fpr on the defect-free images the checkpoint holds)')
    scoring.add_argument('--score_out', default='scores.csv', metavar='CSV', help='where the scores go (default: scores.csv)')
    scoring.add_argument('--maps', default='', metavar='DIR', help='also write a gradient-map PNG per image into DIR')
    scoring.add_argument('--export', metavar='FILE.onnx', help='write the checkpoint as an ONNX model of the scoring '
                         'path, with FILE.json beside it (docs/usage.md)')
    args = parser.parse_args(argv)
    config = build_config(**{name: getattr(args, name) for name in defaults})
    given = {word[2:].split('=')[0] for word in argv if word.startswith('--')}
    args.given = {name: getattr(config, name) for name in defaults if name in given}  # typed on the command line
    return config, args


def raise_keyboard_interrupt(signal_number, frame):
    raise KeyboardInterrupt


def run_command(argv, launch):
    """Runs the command of `argv`; returns (failed runs, runs done, the results folder or None)."""
    config, args = parse_command_line(argv)
    if args.export:
        if launch or args.score:
            raise UserError('--export runs alone in one process: python main.py --export FILE --checkpoint FILE')
        from deployment.export import export_command  # loads torch and onnxruntime: only for this command
        export_command(config, args)
        return 0, 1, None
    if args.score or args.checkpoint:
        if launch:
            raise UserError('--score runs in one process: python main.py --score ..., not under torchrun')
        from deployment.scoring import score_command  # the command's modules load torch: only now, not for --help
        score_command(config, args)
        return 0, 1, None
    from runner.jobs import run
    from runner.run_folder import load_run_to_resume
    from runner.sweep import run_sweep
    resume = None
    if args.resume:
        saved, previous = load_run_to_resume(args.resume)
        config, changes = resumed_config(saved, args.given, args.resume)
        resume = (args.resume, previous)
        logger.info('\n'.join([f'Resuming {args.resume} with its own configuration'] + changes))
    if launch:
        results_dir, n_failed, n_done = run_sweep(config, launch, resume)
        return (0, 1, results_dir) if launch.rank != 0 else (n_failed, n_done, results_dir)
    results_dir, n_failed, n_done = run(config, resume)
    return n_failed, n_done, results_dir


def main(argv=None):
    """Exit status: 0 all runs done, 1 some failed or a bug stopped the run, 2 nothing could run (user error),
    130 interrupted.

    Under torchrun with two or more processes the runs are a sweep (sweep.py): every process takes jobs;
    rank 0 merges and exits with the status of the whole sweep, the others with 0 (2 or 130 as above).
    """
    argv = sys.argv[1:] if argv is None else argv
    if '-h' in argv or '--help' in argv:
        parse_command_line(argv)  # prints the help and exits before torch is imported: about a second
    launch = torchrun_launch()
    configure_logging(launch.rank if launch else None)
    restore_output = prefix_stderr(launch) if launch else None
    previous_handler = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)  # SIGTERM stops like Ctrl-C
    try:
        n_failed, n_done, results_dir = run_command(argv, launch)
    except UserError as error:
        if not isinstance(error, RankZeroError):
            print(f'error: {error}', file=sys.stderr)
        return 2
    except RunStopped:  # its traceback and the line saying how to continue are printed
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if restore_output:
            restore_output()
    if n_failed:
        print(f'error: {n_failed} run(s) failed; see above and results.md; after fixing the cause, continue with: '
              f'python main.py --resume {shlex.quote(results_dir)}', file=sys.stderr)
        return 1 if n_done else 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
