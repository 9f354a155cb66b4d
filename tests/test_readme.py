"""README and docs/ stay true to the code: CI runs README's setup and test commands verbatim, every shown
`python main.py ...` command parses against the real argument parser, docs/configuration.md is the table
config.py generates, and README stays short.

`python tests/test_readme.py` prints the configuration table to paste into docs/configuration.md."""
import os
import re
import shlex

import pytest

from conftest import REPO_ROOT, doc_names, read_repo_file
from main import parse_command_line
from base.settings import build_config, config_comments, config_defaults, validate_config

README_MAX_BYTES = 10_500  # README stays about 10 KB; the details belong in docs/
PAGE_MAX_BYTES, DOCS_MAX_BYTES = 12_000, 70_000  # a docs page answers one question; together they stay readable
DIARY_WORDS = ('session', 'sitting', 'kill -STOP', 'kill -CONT')  # how runs were gathered belongs in git
README_SECTIONS = ['Two commands', 'Real data', 'Results', 'Configuration',
                   'Checkpoints, scoring, gradient maps', 'GPUs and clusters', 'Where the details are',
                   'Credits, license, citation']
TABLE_START, TABLE_END = '<!-- config table: generated from config.py -->', '<!-- /config table -->'
# where one machine's files lived; shown output uses ~/.cache/..., results/<run>/ instead
MACHINE_PATHS = ('/root/', '/work/', '/home/', '/tmp/', '/Users/')


def code_blocks(text):
    return re.findall(r'^[ \t]*```[\w-]*\n(.*?)^[ \t]*```', text, flags=re.S | re.M)


def main_py_commands(text):
    """[(command line, argv after main.py)] of every `python main.py ...` / `torchrun ... main.py ...` in the
    code blocks of `text`; backslash continuations joined, shell comments and a leading `$ ` dropped."""
    commands = []
    for block in code_blocks(text):
        for line in block.replace('\\\n', ' ').splitlines():
            line = line.strip().removeprefix('$ ')
            words = shlex.split(line, comments=True) if 'main.py' in line else []
            launcher = [i for i, word in enumerate(words[:-1] if words else [])
                        if word in ('python', 'python3', 'torchrun') or word.endswith('/torchrun')]
            positions = [i for i, word in enumerate(words) if os.path.basename(word) == 'main.py']
            if launcher and positions and launcher[0] < positions[0]:
                commands.append((line, words[positions[0] + 1:]))
    return commands


def inline_main_py_commands(text):
    """[(command, argv after main.py)] of the `python main.py ...` written inline (in tables and prose) outside
    code blocks; a span with a placeholder (NAME, VALUE, ...) is a pattern, not a command; `--help` exits."""
    prose = re.sub(r'^[ \t]*```.*?^[ \t]*```', '', text, flags=re.S | re.M)
    commands = []
    for span in re.findall(r'`([^`\n]+)`', prose.replace('\n', ' ')):
        words = span.split()
        if 'main.py' in words and words.index('main.py') > 0 and words[words.index('main.py') - 1] == 'python' \
                and not any(word in ('NAME', 'VALUE', '...', 'DIR', '--help') for word in words):
            commands.append((span, words[words.index('main.py') + 1:]))
    return commands


def benchmark_commands(text):
    """[(command, script path, options)] of every `python benchmarks/X.py ...` / `bash benchmarks/X.sh`
    in code blocks and inline code."""
    commands = []
    lines = [line for block in code_blocks(text) for line in block.replace('\\\n', ' ').splitlines()]
    prose = re.sub(r'^[ \t]*```.*?^[ \t]*```', '', text, flags=re.S | re.M)
    lines += re.findall(r'`([^`\n]+)`', prose.replace('\n', ' '))
    for line in lines:
        for script, rest in re.findall(r'(?:python|bash) (benchmarks/[\w.]+)([^#`|]*)', line):
            commands.append((line.strip(), script, re.findall(r'(?<!\S)(--[a-z_]+)', rest)))
    return commands


def check_command(argv):
    """Parses `argv` as main.py does and checks the values as a run would; raises on any mistake."""
    try:
        config, _ = parse_command_line(argv)
    except SystemExit as stop:
        raise AssertionError(f'main.py refuses these arguments (exit {stop.code})') from None
    # a placeholder class list or dataset folder need not exist here; every other value must be valid
    values = vars(config) | {'class_name': 'some_class'}
    validate_config(build_config(**values))


def configuration_table():
    defaults = config_defaults()
    rows = ['| name | default | meaning |', '|---|---|---|']
    for name, comment in config_comments().items():
        rows.append(f"| `{name}` | `{defaults[name]!r}` | {comment.replace('|', chr(92) + '|')} |")
    return '\n'.join(rows)


def test_ci_runs_readme_commands_verbatim():
    readme_commands = set()
    for block in re.findall(r'```bash\n(.*?)```', read_repo_file('README.md'), flags=re.S):
        readme_commands.update(line.strip() for line in block.splitlines() if line.strip())
    ci_commands = [line.strip() for line in read_repo_file('.ci/run').splitlines()
                   if line.strip() and not line.startswith(('#', 'set ', 'cd '))]
    assert ci_commands == ['pip install -r requirements.txt', 'python -m pytest -q tests']
    assert set(ci_commands) <= readme_commands


def test_readme_is_short():
    size = len(read_repo_file('README.md').encode())
    assert size <= README_MAX_BYTES, f'README.md is {size} bytes; move details into docs/'


def test_docs_pages_are_short_and_no_diary():
    sizes = {name: os.path.getsize(os.path.join(REPO_ROOT, name)) for name in doc_names() if name != 'README.md'}
    assert not {name: size for name, size in sizes.items() if size > PAGE_MAX_BYTES}, sizes
    assert sum(sizes.values()) <= DOCS_MAX_BYTES, f'docs/*.md hold {sum(sizes.values())} bytes; merge or cut'
    for name in doc_names():
        text = read_repo_file(name).lower()
        found = [word for word in DIARY_WORDS if word.lower() in text]
        assert not found, f'{name} mentions {found}: say what a user does, not how a run was gathered'


def test_readme_sections_in_order():
    prose = re.sub(r'^[ \t]*```.*?^[ \t]*```', '', read_repo_file('README.md'), flags=re.S | re.M)  # shown output has headings too
    headings = re.findall(r'^## (.+)$', prose, flags=re.M)
    assert headings == README_SECTIONS


def heading_anchors(text):
    """The anchors GitHub gives the headings of a markdown text."""
    prose = re.sub(r'^[ \t]*```.*?^[ \t]*```', '', text, flags=re.S | re.M)
    return {re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')
            for heading in re.findall(r'^#+ (.+)$', prose, flags=re.M)}


def test_readme_links_to_existing_files():
    targets = re.findall(r'\]\(([^)#\s]+)', read_repo_file('README.md'))
    assert 'docs/configuration.md' in targets and 'docs/bottle_gradient_map.png' in targets


@pytest.mark.parametrize('name', doc_names())
def test_links_lead_to_files_and_headings_that_exist(name):
    for target, anchor in re.findall(r'\]\(([^)#\s]*)(?:#([^)\s]+))?\)', read_repo_file(name)):
        if '://' in target:
            continue
        path = os.path.normpath(os.path.join(REPO_ROOT, os.path.dirname(name), target or os.path.basename(name)))
        assert os.path.exists(path), f'{name} links to {target}, which does not exist'
        if anchor:
            with open(path) as handle:
                assert anchor in heading_anchors(handle.read()), f'{name} links to {target}#{anchor}: no such heading'


def test_configuration_md_is_the_table_config_py_generates():
    text = read_repo_file('docs/configuration.md')
    assert TABLE_START in text and TABLE_END in text
    written = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()
    assert written == configuration_table(), (
        'docs/configuration.md differs from config.py; paste the output of `python tests/test_readme.py`')


def test_every_setting_in_configuration_md():
    text = read_repo_file('docs/configuration.md')
    for name in config_comments():
        assert f'| `{name}` |' in text, name


@pytest.mark.parametrize('name', doc_names())
def test_every_shown_command_parses(name):
    for line, argv in main_py_commands(read_repo_file(name)):
        try:
            check_command(argv)
        except Exception as error:
            raise AssertionError(f'{name}: {line}\n{error}') from None


@pytest.mark.parametrize('name', doc_names())
def test_every_inline_command_parses(name):
    for line, argv in inline_main_py_commands(read_repo_file(name)):
        try:
            check_command(argv)
        except Exception as error:
            raise AssertionError(f'{name}: `{line}`\n{error}') from None


@pytest.mark.parametrize('name', doc_names())
def test_benchmark_commands_name_scripts_and_options_that_exist(name):
    for line, script, options in benchmark_commands(read_repo_file(name)):
        path = os.path.join(REPO_ROOT, script)
        assert os.path.isfile(path), f'{name}: {line}: no {script}'
        source = open(path).read()
        for option in options:
            assert f"'{option}'" in source, f'{name}: {line}: {script} has no option {option}'


def test_inline_and_benchmark_commands_are_found():
    text = ('| a | `python main.py --class_name bottle --seed 0` | `python main.py --NAME VALUE` |\n'
            '```bash\npython benchmarks/speed.py --components breakdown \\\n    --flow_kernels default\n```\n'
            'run `bash benchmarks/evidence_runs.sh` or `python benchmarks/views.py --repeats 3`\n')
    assert inline_main_py_commands(text) == [('python main.py --class_name bottle --seed 0',
                                              ['--class_name', 'bottle', '--seed', '0'])]
    assert [(script, options) for _, script, options in benchmark_commands(text)] == [
        ('benchmarks/speed.py', ['--components', '--flow_kernels']), ('benchmarks/evidence_runs.sh', []),
        ('benchmarks/views.py', ['--repeats'])]
    total = sum(len(inline_main_py_commands(read_repo_file(name))) + len(benchmark_commands(read_repo_file(name))) for name in doc_names())
    assert total >= 10


def test_commands_are_found_in_readme_and_docs():
    readme = [argv for _, argv in main_py_commands(read_repo_file('README.md'))]
    assert [] in readme  # the demo: plain `python main.py`
    assert any('--score' in argv for argv in readme)
    assert sum(len(main_py_commands(read_repo_file(name))) for name in doc_names()) >= 8


def test_command_check_rejects_mistakes_and_reads_launchers():
    text = ('```bash\n'
            'torchrun --nproc_per_node 8 main.py --class_name all --seeds 0,1,2  # a comment\n'
            'srun torchrun --nnodes 2 --rdzv_backend c10d main.py \\\n    --dataset_path /data/<run> --meta_epochs 2\n'
            '$ python main.py --meta_epoch 2\n'
            'python main.py --dropout 1.5\n'
            'python benchmarks/speed.py --full_run pool16\n'
            '```\n'
            'python main.py --outside_a_block 1\n')
    commands = main_py_commands(text)
    assert [argv for _, argv in commands] == [
        ['--class_name', 'all', '--seeds', '0,1,2'], ['--dataset_path', '/data/<run>', '--meta_epochs', '2'],
        ['--meta_epoch', '2'], ['--dropout', '1.5']]
    check_command(commands[0][1])
    check_command(commands[1][1])
    with pytest.raises(AssertionError):
        check_command(commands[2][1])  # unknown option
    with pytest.raises(Exception):
        check_command(commands[3][1])  # a value no run accepts
    with pytest.raises(AssertionError):
        check_command(['--meta_epochs', 'two'])  # wrong type


def test_shown_output_has_no_machine_paths():
    for name in doc_names():
        text = read_repo_file(name)
        for path in MACHINE_PATHS:
            assert path not in text, f'{name} shows {path}...; use ~/.cache/..., results/<run>/ or ../shared/...'


if __name__ == '__main__':
    print(TABLE_START)
    print(configuration_table())
    print(TABLE_END)
