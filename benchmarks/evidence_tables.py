"""The tables of docs/results.md that come from the runs kept in docs/evidence/, written from those files.

    python benchmarks/evidence_tables.py --markdown          # print every table between its marker comments
    python benchmarks/evidence_tables.py --markdown --write  # and replace the marked tables in docs/*.md

A kept run is `<run>.results.json` (main.py's results), `<run>.time.txt` (its /usr/bin/time summaries) and
`<run>.machine.txt` (cpu, gpu, torch, date), all three written by benchmarks/evidence_runs.sh.
tests/test_evidence_tables.py fails when a page's table differs from what this prints. Standard library
only: it runs on a checkout without the data and imports nothing of the package.
"""
import argparse
import json
import os
import re
import statistics
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVIDENCE_DIR = os.path.join(REPO_ROOT, 'docs', 'evidence')
DOCS_DIR = os.path.join(REPO_ROOT, 'docs')


def start_marker(name):
    return f'<!-- evidence table: {name} (python benchmarks/evidence_tables.py --markdown) -->'


def end_marker(name):
    return f'<!-- /evidence table: {name} -->'


def load_runs(evidence_dir=EVIDENCE_DIR):
    """[{name, entry (the class's results), config, time (lines), machine {cpu, gpu, torch, date}}] by name."""
    runs = []
    for file_name in sorted(os.listdir(evidence_dir)):
        if not file_name.endswith('.results.json'):
            continue
        name = file_name[:-len('.results.json')]
        with open(os.path.join(evidence_dir, file_name)) as handle:
            results = json.load(handle)
        (entry,) = results['classes']  # one (class, seed) per kept run
        with open(os.path.join(evidence_dir, f'{name}.time.txt')) as handle:
            time_lines = handle.read().splitlines()
        machine = {}
        with open(os.path.join(evidence_dir, f'{name}.machine.txt')) as handle:
            for line in handle:
                key, _, value = line.partition(':')
                machine[key.strip()] = value.strip()
        runs.append(dict(name=name, entry=entry, config=results['config'], time=time_lines, machine=machine))
    return runs


def main_options(run):
    """The main.py options of the run, from its stored configuration (evidence_runs.sh adds --results_dir)."""
    config, entry = run['config'], run['entry']
    options = f"--dataset_path {config['dataset_path']} --class_name {entry['class_name']}"
    if config.get('n_train_images'):
        options += f" --n_train_images {config['n_train_images']}"
    options += f" --seed {entry['seed']}"
    if not config.get('save_checkpoint', True):
        options += ' --save_checkpoint false'
    return options


def duration_text(seconds):
    seconds = int(round(seconds))
    hours, minutes, seconds = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f'{hours} h {minutes} min {seconds} s' if hours else f'{minutes} min {seconds} s'


def peak_memory_gib(entry):
    """The job's own peak resident memory; runs from before it was measured per job hold the process's."""
    for key in ('job_peak_rss_gib', 'peak_rss_gib', 'process_peak_rss_gib'):
        if entry.get(key) is not None:
            return entry[key]
    raise KeyError(f"{entry['class_name']}: no peak memory in its results.json entry")


def wall_time(run):
    """The one /usr/bin/time summary of a run made by one process; else results.json's wall_time_s, marked."""
    elapsed = [line.split(': ', 1)[1] for line in run['time'] if 'Elapsed (wall clock)' in line]
    commands = [line for line in run['time'] if 'Command being timed' in line]
    if len(elapsed) == 1 and len(commands) == 1 and '--resume' not in commands[0]:
        *hours, minutes, seconds = elapsed[0].strip().split(':')
        return duration_text(int(hours[0] if hours else 0) * 3600 + int(minutes) * 60 + float(seconds))
    return duration_text(run['entry']['wall_time_s']) + ' †'


def images_text(entry):
    available = entry.get('train_subset_of')
    n_images = entry['n_train_images']
    return f'{n_images} of {available}' if available and available != n_images else f'{n_images} (all)'


def mean_std_text(values):
    if len(values) == 1:
        return f'{values[0]:.4f}'
    return f'{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}'


def machine_labels(runs):
    """{(cpu, gpu, torch): short label}: the CPU's name without its family and model, numbered if two differ."""
    labels = {}
    for run in runs:
        machine = run['machine']
        key = (machine['cpu'], machine.get('gpu', 'none'), machine['torch'])
        if key not in labels:
            label = machine['cpu'].split(' (')[0].split(',')[0]
            taken = sum(1 for other in labels.values() if other.split(' #')[0] == label)
            labels[key] = f'{label} #{taken + 1}' if taken else label
    return labels


def runs_table(runs):
    labels = machine_labels(runs)
    rows = ['| run | `python main.py` options | last AUROC | max AUROC (meta epoch) | wall time | peak memory '
            '| machine | date |', '|---|---|---|---|---|---|---|---|']
    for run in runs:
        entry, machine = run['entry'], run['machine']
        label = labels[(machine['cpu'], machine.get('gpu', 'none'), machine['torch'])]
        rows.append(f"| `{run['name']}` | `{main_options(run)}` | {entry['last_auroc']:.4f} | "
                    f"{entry['max_auroc']:.4f} ({entry['max_auroc_epoch']}) | {wall_time(run)} | "
                    f"{peak_memory_gib(entry):.2f} GiB | {label} | {machine['date']} |")
    rows.append('')
    rows.append('Machines: ' + '; '.join(f"{label}: {cpu}, {'no GPU' if gpu == 'none' else gpu}, torch {torch}"
                                          for (cpu, gpu, torch), label in labels.items()) + '.')
    rows.append('Wall time: the `/usr/bin/time -v` summary in `<run>.time.txt`; † where the run has no single one '
                '(continued with `--resume`, or its summary is missing): `wall_time_s` of results.json, an upper '
                'bound. Peak memory: `peak_rss_gib`.')
    return '\n'.join(rows)


def few_shot_table(runs):
    groups = {}
    for run in runs:
        entry = run['entry']
        groups.setdefault((entry['class_name'], entry['n_train_images']), []).append(entry)
    rows = ['| class | training images | seeds | last AUROC | max AUROC |', '|---|---|---|---|---|']
    for (class_name, _), entries in sorted(groups.items()):
        seeds = ', '.join(str(entry['seed']) for entry in sorted(entries, key=lambda entry: entry['seed']))
        rows.append(f"| {class_name} | {images_text(entries[0])} | {seeds} | "
                    f"{mean_std_text([entry['last_auroc'] for entry in entries])} | "
                    f"{mean_std_text([entry['max_auroc'] for entry in entries])} |")
    rows.append('')
    rows.append('Mean ± sample standard deviation over the seeds; 24 x 8 epochs, config.py as it is otherwise.')
    return '\n'.join(rows)


def tables(evidence_dir=EVIDENCE_DIR):
    """{name: markdown table} of every table the pages take from docs/evidence."""
    runs = load_runs(evidence_dir)
    return {'runs': runs_table(runs), 'few-shot': few_shot_table(runs)}


def marked_tables(text):
    """{name: the text between the markers of that table} of a page."""
    pattern = r'<!-- evidence table: ([\w-]+) [^\n]*-->\n(.*?)\n<!-- /evidence table: \1 -->'
    return {name: body for name, body in re.findall(pattern, text, flags=re.S)}


def replace_tables(text, written):
    for name, table in written.items():
        pattern = re.escape(start_marker(name)) + r'\n(?:.*?\n)?' + re.escape(end_marker(name))
        text = re.sub(pattern, lambda _: f'{start_marker(name)}\n{table}\n{end_marker(name)}', text, flags=re.S)
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--markdown', action='store_true', help='print the tables with their markers')
    parser.add_argument('--write', action='store_true', help='replace the marked tables in docs/*.md')
    args = parser.parse_args()
    if not (args.markdown or args.write):
        parser.error('give --markdown (print) and/or --write (update docs/*.md)')
    written = tables()
    if args.markdown:
        for name, table in written.items():
            print(f'{start_marker(name)}\n{table}\n{end_marker(name)}\n')
    if args.write:
        for file_name in sorted(os.listdir(DOCS_DIR)):
            path = os.path.join(DOCS_DIR, file_name)
            if not file_name.endswith('.md'):
                continue
            with open(path) as handle:
                text = handle.read()
            updated = replace_tables(text, written)
            if updated != text:
                with open(path, 'w') as handle:
                    handle.write(updated)
                print(f'wrote {os.path.relpath(path, REPO_ROOT)}', file=sys.stderr)


if __name__ == '__main__':
    main()
