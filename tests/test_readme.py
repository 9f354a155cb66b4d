"""README and CI stay in step: CI runs README's setup and test commands verbatim; every setting is documented."""
import os
import re

from conftest import REPO_ROOT
from main import config_comments


def read(name):
    with open(os.path.join(REPO_ROOT, name)) as handle:
        return handle.read()


def test_ci_runs_readme_commands_verbatim():
    readme_commands = set()
    for block in re.findall(r'```bash\n(.*?)```', read('README.md'), flags=re.S):
        readme_commands.update(line.strip() for line in block.splitlines() if line.strip())
    ci_commands = [line.strip() for line in read('.ci/run').splitlines()
                   if line.strip() and not line.startswith(('#', 'set ', 'cd '))]
    assert ci_commands == ['pip install -r requirements.txt', 'python -m pytest -q tests']
    assert set(ci_commands) <= readme_commands


def test_every_setting_in_readme_table():
    readme = read('README.md')
    for name in config_comments():
        assert f'| `{name}` |' in readme, name
