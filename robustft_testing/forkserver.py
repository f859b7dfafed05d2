"""Run fairseq's command-line tools for the tests without paying their start-up each time.

Every end-to-end test runs `fairseq-train` (or -validate, -generate, -preprocess, or one of our
`scripts/*.py`), and each such process spends about 6 CPU-seconds importing torch and fairseq before it
reads its first flag; the suite starts a few hundred of them. A fork server imports torch and fairseq
once (and nothing of the plugin, so a run without `--user-dir` stays a stock fairseq run), then forks one
child per command. The child is a fresh process in every way a test can observe: its own pid, working
directory, environment, stdout/stderr files, `sys.argv`, signal handlers and root logger; it imports
the tool's module itself (`fairseq_cli.train` configures the root logger on import, `fairseq_cli/train.py:18`,
so no `fairseq_cli` module is imported before the fork), the plugin through `--user-dir` as usual, and
exits through `atexit` (fairseq closes its tensorboard writers there, `fairseq/logging/progress_bar.py:420`).

What it cannot reproduce, and `usable` refuses so that the caller starts a real process instead: another
interpreter, or a change to a variable that Python or torch reads only at start-up (`STARTUP_ONLY`:
`PYTHONPATH`, `OMP_NUM_THREADS`, ...). Set `ROBUSTFT_TEST_NO_FORKSERVER=1` to start every command as a
new process.

Protocol: the server reads one JSON request per line on stdin ({"argv", "env", "cwd", "stdout",
"stderr"}) and answers {"returncode"} on its own copy of stdout once the child has exited.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import types
from pathlib import Path

# read by the interpreter or by torch when the process starts, so a child cannot take a new value
STARTUP_ONLY = (
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONHASHSEED",
    "PYTHONSAFEPATH",
    "PYTHONNOUSERSITE",
    "PYTHONWARNINGS",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONMALLOC",
    "PYTHONOPTIMIZE",
    "PYTHONDEVMODE",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "MKL_NUM_THREADS",
    "OMP_NUM_THREADS",
    "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD",
    "TORCH_FORCE_WEIGHTS_ONLY_LOAD",
    "LOGLEVEL",
)

# imported once by the server: the expensive part of every fairseq tool's start-up, with no side effect
# on what a run does (fairseq registers its own components on import in any case)
PRELOAD = (
    "torch",
    "numpy",
    "omegaconf",
    "hydra",
    "fairseq",
    "fairseq.checkpoint_utils",
    "fairseq.trainer",
    "fairseq.options",
    "fairseq.distributed",
    "fairseq.sequence_generator",
    "fairseq.logging.progress_bar",
    # torch.optim.Optimizer.__init__ is wrapped in torch._disable_dynamo, whose first call imports
    # torch._dynamo (torch/_compile.py): ~3 s of every run that builds an optimizer, more than a tiny
    # run's own work
    "torch._dynamo",
)


# --------------------------------------------------------------------------------------------- server
@functools.cache  # the client asks once per command; the metadata scan need not repeat
def _console_entry(script: str):
    """The function a venv console script (e.g. .../bin/fairseq-train) calls, from its package metadata."""
    from importlib.metadata import entry_points

    name = Path(script).name
    for ep in entry_points(group="console_scripts"):
        if ep.name == name:
            return ep.load
    return None


def _run_child(request: dict) -> int:
    """In the forked child: become the requested process, run it, return its exit status."""
    import logging
    import runpy

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    # a fresh root logger, as in a new interpreter: the tool's own module configures it on import
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)

    argv = list(request["argv"])
    code = 0
    try:
        if Path(argv[0]).name.startswith("python"):
            if argv[1] == "-m":
                sys.argv = [argv[2], *argv[3:]]
                sys.path[0] = os.getcwd()
                runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
            elif argv[1] == "-c":  # python -c CODE [ARG ...]: argv[0] is "-c", the path's head ""
                sys.argv = ["-c", *argv[3:]]
                sys.path[0] = ""
                main = types.ModuleType("__main__")
                sys.modules["__main__"] = main
                exec(compile(argv[2], "<string>", "exec"), main.__dict__)
            else:
                script = os.path.abspath(argv[1])
                sys.argv = [script, *argv[2:]]
                sys.path[0] = os.path.dirname(script)
                runpy.run_path(script, run_name="__main__")
        else:
            load = _console_entry(argv[0])
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            raise SystemExit(load()())  # what the generated console script does with the return value
    except SystemExit as exc:  # sys.exit's conventions: None is 0, an int is the status, else print it, 1
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return int(code) & 0xFF if code >= 0 else 1


def serve() -> None:
    """The server loop (`python -m robustft_testing.forkserver`)."""
    import importlib

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # nothing a preloaded module prints can corrupt the protocol
    for name in PRELOAD:
        importlib.import_module(name)
    assert threading.active_count() == 1, "the fork server must be single-threaded before it forks"
    proto.write(json.dumps({"ready": True, "threads": os.environ.get("OMP_NUM_THREADS")}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _run_child(request)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        proto.write(json.dumps({"returncode": code}) + "\n")


# --------------------------------------------------------------------------------------------- client
class ForkServer:
    """One server per test process (xdist worker), started on first use, stopped at exit."""

    def __init__(self, python: str, threads: str = "1"):
        self.python = python
        self.threads = threads
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()
        # the environment the server starts with: what a child inherits of the STARTUP_ONLY variables
        self.base_env = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONUNBUFFERED="1")

    def _start(self) -> None:
        env = self.base_env
        self.proc = subprocess.Popen(
            [self.python, "-m", "robustft_testing.forkserver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(Path(__file__).resolve().parents[1]),
            # its own process group: a test that signals the worker's group does not reach it (it would be
            # restarted, at the cost of its imports); it exits when the worker closes its stdin
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        hello = self.proc.stdout.readline()
        if not hello:
            raise RuntimeError("the fork server did not start (run `python -m robustft_testing.forkserver`)")
        atexit.register(self.close)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        self.proc = None

    def usable(self, argv: list[str], env: dict) -> bool:
        """Whether `argv` with `env` runs in a forked child exactly as in a new process."""
        if os.environ.get("ROBUSTFT_TEST_NO_FORKSERVER") == "1":
            return False
        first = Path(argv[0])
        if first.name.startswith("python"):
            if os.path.realpath(argv[0]) != os.path.realpath(self.python) or len(argv) < 2:
                return False
            if argv[1].startswith("-") and argv[1] not in ("-m", "-c"):
                return False
        elif first.parent.resolve() != Path(self.python).parent.resolve() or _console_entry(argv[0]) is None:
            return False
        return all(env.get(key) == self.base_env.get(key) for key in STARTUP_ONLY)

    def run(self, argv, env: dict, cwd=None, timeout: float | None = None) -> subprocess.CompletedProcess:
        argv = [str(a) for a in argv]
        with self.lock, tempfile.TemporaryDirectory(prefix="forkserver-") as tmp:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
            out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
            request = {"argv": argv, "env": dict(env), "cwd": str(cwd or os.getcwd()), "stdout": out, "stderr": err}
            server, requests, replies = self.proc, self.proc.stdin, self.proc.stdout
            requests.write(json.dumps(request) + "\n")
            requests.flush()
            if timeout is not None and not select.select([replies], [], [], timeout)[0]:
                os.killpg(server.pid, signal.SIGKILL)  # the server's session: the server and the run
                server.wait()
                self.proc = None
                raise subprocess.TimeoutExpired(argv, timeout)
            reply = replies.readline()
            if not reply:
                self.proc = None
                raise RuntimeError(f"the fork server died while running {argv}")
            code = json.loads(reply)["returncode"]
            read = lambda p: Path(p).read_text(errors="replace") if os.path.exists(p) else ""  # noqa: E731
            return subprocess.CompletedProcess(argv, code, read(out), read(err))


_SERVER: ForkServer | None = None


def run(argv, env: dict | None = None, cwd=None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd)`, through the fork server
    when the command allows it (a venv console script or `python script.py` / `python -m module` /
    `python -c code` with the server's interpreter), else as a new process."""
    global _SERVER
    env = dict(os.environ if env is None else env)
    if _SERVER is None:
        _SERVER = ForkServer(sys.executable)
    argv = [str(a) for a in argv]
    if _SERVER.usable(argv, env):
        return _SERVER.run(argv, env, cwd, timeout)
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


if __name__ == "__main__":
    serve()
