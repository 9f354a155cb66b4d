"""Runs of main.py, each with one file write stopped half-way, for the tests that kill a run there (SIGKILL: no
handler runs). Started once, it imports the project (seconds) and then forks a run per line read from stdin:

    {"name": NAME, "nth": N, "flag": FLAG, "log": LOG, "argv": [main.py's arguments]}

and answers with the run's process id. The N-th write of the file named NAME goes through replace_atomically as
every write does, but its temporary file is cut to half its size, FLAG is created, and the run sleeps until
it is killed. The run's output goes to LOG. Nothing has computed in this process before it forks, so each run
starts as a fresh `python main.py` would.
"""
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import localization  # noqa: E402
import main  # noqa: E402
import model  # noqa: E402
import runner.jobs  # noqa: E402,F401  (what main.py imports when it runs: before the fork, once)
import runner.sweep  # noqa: E402,F401
from base import atomic_files, resume_state  # noqa: E402
from reporting import plots  # noqa: E402

WRITERS = (atomic_files, model, resume_state, localization, plots)  # the modules that call replace_atomically


def pause_in_write(name, stop_at, flag):
    real_replace, writes = atomic_files.replace_atomically, []

    def replace_atomically(path, write):
        if os.path.basename(path) != name:
            return real_replace(path, write)
        writes.append(path)
        if len(writes) != stop_at:
            return real_replace(path, write)

        def half_written(part):
            write(part)
            with open(part, 'r+b') as handle:
                handle.truncate(os.path.getsize(part) // 2)
            open(flag, 'w').close()
            time.sleep(600)
        return real_replace(path, half_written)
    for module in WRITERS:
        module.replace_atomically = replace_atomically


def run(request):
    log = os.open(request['log'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    pause_in_write(request['name'], request['nth'], request['flag'])
    os._exit(main.main(request['argv']))


if __name__ == '__main__':
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the runs, once killed, are reaped by the kernel
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                run(request)
            finally:
                os._exit(1)
        print(pid, flush=True)
