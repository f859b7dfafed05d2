"""The tests' fork server (robustft_testing/forkserver.py) runs a command the way a new process would: same
stdout, stderr, exit status, working directory, environment, argv, root logger and atexit handlers as
`subprocess.run` of the same command; what it cannot reproduce is started as a real process."""

import os
import subprocess
import sys

import pytest

from robustft_testing import forkserver
from tests.fairseq_helpers import BIN

# starts the server process: deselected by -m 'not e2e'
pytestmark = pytest.mark.e2e

SCRIPT = """
import atexit, logging, os, sys
print("argv", sys.argv[1:], os.path.basename(sys.argv[0]), repr(os.path.basename(sys.path[0])), __name__)
print("cwd", os.getcwd())
print("env", os.environ.get("FORKSERVER_PROBE"), "HOME" in os.environ)
print("root handlers", len(logging.getLogger().handlers), logging.getLogger().level)
print("fairseq_cli imported", any(m.startswith("fairseq_cli") for m in sys.modules))
print("plugin imported", "robustft" in sys.modules or "robustft_common" in sys.modules)
print("to stderr", file=sys.stderr)
atexit.register(lambda: open(sys.argv[1], "w").write("atexit ran"))
sys.exit(int(sys.argv[2]))
"""


@pytest.mark.parametrize("form", ["script", "-c"])
@pytest.mark.parametrize("status", [0, 3])
def test_forked_script_equals_a_new_process(tmp_path, status, form):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "HOME"}
    env.update(FORKSERVER_PROBE="yes", OMP_NUM_THREADS="1")
    runs = {}
    for how in ("fork", "new"):
        marker = tmp_path / f"atexit-{how}"
        program = [str(script)] if form == "script" else ["-c", SCRIPT]
        argv = [sys.executable, *program, str(marker), str(status)]
        if how == "fork":
            assert forkserver._SERVER is None or forkserver._SERVER.usable(argv, env)
            runs[how] = forkserver.run(argv, env=env, cwd=tmp_path)
        else:
            runs[how] = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path)
        assert marker.read_text() == "atexit ran"
    fork, new = runs["fork"], runs["new"]
    assert fork.returncode == new.returncode == status
    assert fork.stdout.replace("atexit-fork", "atexit-new") == new.stdout
    assert fork.stderr == new.stderr == "to stderr\n"
    assert "env yes False" in fork.stdout  # the request's environment only, as env= gives a new process
    assert "root handlers 0 30" in fork.stdout  # a fresh root logger (fairseq's import configured the server's)
    assert "plugin imported False" in fork.stdout  # the server never imports the plugin


def test_fairseq_train_error_status_and_output_match_a_new_process(tmp_path):
    argv = [BIN / "fairseq-train", tmp_path / "missing", "--arch", "roberta_base", "--cpu", "--batch-size", "8"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    fork = forkserver.run(argv, env=env, cwd=tmp_path)
    new = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert fork.returncode == new.returncode != 0
    last = lambda text: text.strip().splitlines()[-1]  # noqa: E731
    assert last(fork.stderr) == last(new.stderr)
    assert "| INFO | fairseq_cli.train |" in fork.stdout and "| INFO | fairseq_cli.train |" in new.stdout


def test_startup_only_settings_start_a_real_process():
    server = forkserver.ForkServer(sys.executable)
    argv = [str(BIN / "fairseq-train"), "--help"]
    assert server.usable(argv, dict(server.base_env))
    assert not server.usable(argv, dict(server.base_env, PYTHONPATH="/elsewhere"))
    assert not server.usable(argv, dict(server.base_env, OMP_NUM_THREADS="2"))
    assert not server.usable(["/usr/bin/python3", "x.py"], dict(server.base_env))  # another interpreter
    assert not server.usable([sys.executable, "-X", "importtime", "x.py"], dict(server.base_env))  # a start-up option
    assert not server.usable(["/usr/bin/env"], dict(server.base_env))


def test_timeout_kills_the_run_and_the_next_run_starts_a_new_server(tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import time\ntime.sleep(60)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with pytest.raises(subprocess.TimeoutExpired):
        forkserver.run([sys.executable, str(script)], env=env, cwd=tmp_path, timeout=3)
    probe = tmp_path / "ok.py"
    probe.write_text("print('alive')\n")
    assert forkserver.run([sys.executable, str(probe)], env=env, cwd=tmp_path, timeout=60).stdout == "alive\n"
