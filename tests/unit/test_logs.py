"""Quiet consoles: the known false-alarm Ray line is dropped from stderr, nothing else is
(cellfoundry.logs.drop_stderr_lines), in a child process of its own."""

from __future__ import annotations

import subprocess
import sys

NOISE = (
    "[2026-12-03 13:32:24,083 E 31408 31408] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(IngestChunks))' and ID: '56bbad6c4cb3266fbd31c57a01000000' has "
    "constructor arguments in the object store and max_restarts > 0. If the arguments in the "
    "object store go out of scope or are lost, the actor restart will fail."
)
OURS = NOISE.replace("MapWorker(MapBatches(IngestChunks))", "ScreenActor")

CHILD = f"""
import os, sys
from cellfoundry.logs import drop_stderr_lines
assert drop_stderr_lines()
os.write(2, b"before\\n" + {NOISE!r}.encode() + b"\\n")  # as Ray's C++ core worker writes
os.write(2, {OURS!r}.encode() + b"\\n")
sys.stderr.write("\\rprogress 50%")  # a bar's partial line passes at once
print("python line", file=sys.stderr)
if sys.argv[1:]:
    raise SystemExit(sys.argv[1])
"""


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, timeout=60)
    # bytes decoded by hand: text mode would turn the bar's "\r" into a newline
    return subprocess.CompletedProcess(done.args, done.returncode, "", done.stderr.decode())


def test_only_the_known_ray_data_false_alarm_is_dropped() -> None:
    done = _run()
    assert done.returncode == 0, done.stderr
    assert "MapWorker" not in done.stderr
    assert done.stderr.split("\n") == ["before", OURS, "\rprogress 50%python line", ""]


def test_what_is_written_just_before_exit_still_arrives() -> None:
    """A crash's last words (SystemExit's message, a traceback) pass the pipe before exit."""
    done = _run("fatal: the last line")
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == "fatal: the last line"
    crash = subprocess.run(
        [sys.executable, "-c", "from cellfoundry.logs import drop_stderr_lines as d\n"
         "d()\nraise RuntimeError('a real error')"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert crash.returncode == 1 and "Traceback" in crash.stderr
    assert crash.stderr.splitlines()[-1] == "RuntimeError: a real error"


def test_it_can_be_turned_off() -> None:
    import os

    env = {**os.environ, "CELLFOUNDRY_RAW_STDERR": "1"}
    done = subprocess.run(
        [sys.executable, "-c", "from cellfoundry.logs import drop_stderr_lines as d; "
         "print(d())"], capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.stdout.strip() == "False"


def test_tqdm_bars_are_off_without_a_terminal() -> None:
    """Each redraw of a bar would be a line of its own in a log file."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    code = (
        "from cellfoundry.logs import no_bars_without_terminal as n\n"
        "n()\nfrom tqdm import tqdm\nfor _ in tqdm(range(3), desc='bar'): pass\n"
        "import os; print(os.environ['TQDM_DISABLE'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1" and "bar" not in done.stderr
