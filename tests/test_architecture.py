"""The organisation docs/architecture.md describes: imports flow one way, files and functions stay short."""
import ast
import glob
import os
import subprocess
import sys

from conftest import REPO_ROOT

MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60


def project_modules():
    """{module name: parsed tree} of the project's own modules (the repository root's .py files)."""
    return {os.path.splitext(os.path.basename(path))[0]: ast.parse(open(path).read())
            for path in sorted(glob.glob(os.path.join(REPO_ROOT, '*.py')))}


def imported_modules(tree, names):
    """The project modules a module imports anywhere in its code, function-local imports included."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split('.')[0])
    return found & names


def import_graph():
    modules = project_modules()
    return {name: imported_modules(tree, set(modules)) - {name} for name, tree in modules.items()}


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


def test_the_cycle_check_finds_a_cycle():
    tree = ast.parse('def f():\n    from b import x\n')
    assert imported_modules(tree, {'a', 'b'}) == {'b'}  # a function-local import counts


def test_files_and_functions_stay_short():
    long_files, long_functions = [], []
    for name, tree in project_modules().items():
        lines = len(open(os.path.join(REPO_ROOT, f'{name}.py')).read().splitlines())
        if lines > MAX_FILE_LINES:
            long_files.append((name, lines))
        long_functions += [(name, node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
                           if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                           and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long_files, f'files over {MAX_FILE_LINES} lines: {long_files}; split them by role'
    assert not long_functions, f'functions over {MAX_FUNCTION_LINES} lines: {long_functions}; name their steps'


def test_the_command_line_and_its_errors_load_no_torch():
    script = ('import sys\nimport main, settings, errors, launch\n'
              'print(sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "torchvision")))')
    printed = subprocess.run([sys.executable, '-c', script], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout
    assert printed.strip() == '[]'


def test_every_file_is_in_the_architecture_page():
    page = open(os.path.join(REPO_ROOT, 'docs', 'architecture.md')).read()
    missing = [name for name in project_modules() if f'`{name}.py`' not in page]
    assert not missing, f'docs/architecture.md does not describe {missing}'
