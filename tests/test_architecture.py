"""The organisation docs/architecture.md describes: the paper's method at the root, the machinery in folders by
layer, imports flowing one way (down), no two modules importing each other, short files and functions."""
import ast
import glob
import os
import subprocess
import sys

from conftest import REPO_ROOT

MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60
METHOD_FILES = ('main', 'config', 'model', 'freia_funcs', 'train', 'utils', 'localization')  # the design card's
# each part of the house and its floor: a module may import its own floor's and lower floors' modules only
FLOORS = {'config': 0, 'base': 1, 'image_data': 2, 'method': 3, 'reporting': 4, 'deployment': 4, 'runner': 5,
          'main': 6}


def project_modules():
    """{dotted module name: path} of the project's own modules: the root's .py files and those of its folders."""
    paths = glob.glob(os.path.join(REPO_ROOT, '*.py')) + glob.glob(os.path.join(REPO_ROOT, '*', '*.py'))
    modules = {}
    for path in sorted(paths):
        relative = os.path.relpath(path, REPO_ROOT)
        if relative.startswith(('tests', 'benchmarks')) or relative.endswith('__init__.py'):
            continue
        modules[relative[:-3].replace(os.sep, '.')] = path
    return modules


def part_of(module):
    """The part of the house a module belongs to: its folder, 'config', 'main', or 'method' (the root)."""
    if '.' in module:
        return module.split('.')[0]
    return module if module in ('config', 'main') else 'method'


def imported_modules(tree, names):
    """The project modules a module imports anywhere in its code, function-local imports included."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f'{node.module}.{alias.name}' for alias in node.names}  # from base import settings
    return found & names


def import_graph():
    modules = project_modules()
    return {name: imported_modules(ast.parse(open(path).read()), set(modules)) - {name}
            for name, path in modules.items()}


def test_the_root_holds_the_papers_method_only():
    root = sorted(os.path.basename(path)[:-3] for path in glob.glob(os.path.join(REPO_ROOT, '*.py')))
    assert root == sorted(METHOD_FILES), f'the root holds {root}; move the machinery into a folder by its layer'
    folders = {part_of(name) for name in project_modules()} - {'method', 'config', 'main'}
    assert folders <= set(FLOORS), f'folders without a floor in this test: {folders - set(FLOORS)}'


def test_imports_run_down_the_floors_and_never_across_parts_of_one_floor():
    upward = []
    for name, imports in import_graph().items():
        for imported in imports:
            here, there = part_of(name), part_of(imported)
            if FLOORS[there] > FLOORS[here] or (FLOORS[there] == FLOORS[here] and there != here):
                upward.append(f'{name} -> {imported}')
    assert not upward, f'imports against the layering: {upward}'


def test_the_layering_check_finds_an_upward_import():
    tree = ast.parse('def f():\n    from runner.jobs import run\n')
    imports = imported_modules(tree, {'runner.jobs', 'model'})
    assert imports == {'runner.jobs'} and FLOORS[part_of('runner.jobs')] > FLOORS[part_of('model')]
    assert imported_modules(ast.parse('from base import settings\n'), {'base.settings'}) == {'base.settings'}


def test_no_module_imports_main_and_no_two_modules_import_each_other():
    graph = import_graph()
    assert not [name for name, imports in graph.items() if 'main' in imports]
    cycles = []

    def visit(name, path):
        for imported in graph[name]:
            if imported in path:
                cycles.append(path[path.index(imported):] + [imported])
            else:
                visit(imported, path + [imported])
    for name in graph:
        visit(name, [name])
    assert not cycles, f'import cycles: {cycles[:3]}'


def test_files_and_functions_stay_short():
    long_files, long_functions = [], []
    for name, path in project_modules().items():
        text = open(path).read()
        lines = len(text.splitlines())
        if lines > MAX_FILE_LINES:
            long_files.append((name, lines))
        long_functions += [(name, node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(text))
                           if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                           and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long_files, f'files over {MAX_FILE_LINES} lines: {long_files}; split them by role'
    assert not long_functions, f'functions over {MAX_FUNCTION_LINES} lines: {long_functions}; name their steps'


def test_every_module_says_what_it_holds_in_its_first_line():
    for name, path in project_modules().items():
        docstring = ast.get_docstring(ast.parse(open(path).read()))
        assert docstring and len(docstring.splitlines()[0]) > 20, f'{name} needs a docstring saying what it holds'


def test_the_command_line_and_its_errors_load_no_torch():
    script = ('import sys\nimport main, base.settings, base.errors, base.launch, base.logs\n'
              'print(sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "torchvision")))')
    printed = subprocess.run([sys.executable, '-c', script], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout
    assert printed.strip() == '[]'


def test_every_file_is_in_the_architecture_page():
    page = open(os.path.join(REPO_ROOT, 'docs', 'architecture.md')).read()
    missing = [path for path in (os.path.relpath(p, REPO_ROOT) for p in project_modules().values())
               if f'`{os.path.basename(path)}`' not in page]
    assert not missing, f'docs/architecture.md does not describe {missing}'


def test_the_z_squared_score_is_computed_in_model_py_only():
    """The image score (mean z^2) has one home, model.py; the flow's loss (freia_funcs.nll_loss) aside."""
    found = []
    for name, path in project_modules().items():
        if name in ('model', 'freia_funcs'):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) and \
                    isinstance(node.right, ast.Constant) and node.right.value == 2 and 'z' in ast.unparse(node.left):
                found.append(f'{name}:{node.lineno}: {ast.unparse(node)}')
    assert not found, f'z^2 computed outside model.py: {found}; call model.view_scores or model.image_scores'
