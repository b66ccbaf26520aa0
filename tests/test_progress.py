"""Progress bars: a full bar on a terminal, a few lines per second in a log, nothing when disabled."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

from replaykit import progress
from replaykit.progress import LOG_REFRESH_SECONDS, progress_bar

REPO = Path(__file__).resolve().parents[1]
# Nested bars as the distillers draw them: an outer bar per class, an inner one per iteration
# whose postfix changes every iteration (plain tqdm redraws on each of those calls).
NESTED_BARS = textwrap.dedent("""
    import time
    from replaykit.progress import progress_bar
    for _ in progress_bar(range(3), desc="classes"):
        bar = progress_bar(total=400, desc="iterations", leave=False)
        for i in range(400):
            time.sleep(0.003)
            bar.update(1)
            bar.set_postfix(loss=i)
        bar.close()
    print("done", flush=True)
""")


def _nested_bars_command() -> list[str]:
    return [sys.executable, "-c", NESTED_BARS]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_log_file_gets_a_few_lines_per_second(tmp_path):
    log = tmp_path / "run.log"
    started = time.perf_counter()
    with open(log, "w") as handle:
        subprocess.run(_nested_bars_command(), stdout=handle, stderr=handle, env=_env(), check=True, timeout=120)
    seconds = time.perf_counter() - started
    written = log.read_bytes()  # bytes: text mode would turn tqdm's carriage returns into newlines
    assert b"done" in written and b"classes" in written  # the bar did report, just rarely
    # Count redraws too: some log viewers start a line at each carriage return.
    breaks = max(written.count(b"\n"), written.count(b"\r"))
    # 1200 inner iterations: a bar redrawing per iteration would write over 1200 of each.
    assert breaks <= 3 * seconds / LOG_REFRESH_SECONDS + 4, (breaks, seconds, written[-3000:])


def test_terminal_still_shows_the_bar(tmp_path):
    leader, follower = pty.openpty()
    # a fresh pty is 0 columns wide, and tqdm draws nothing in zero columns
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(_nested_bars_command(), stdout=follower, stderr=follower, env=_env())
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=120) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "iterations" in text and "400/400" in text and "3/3" in text
    assert text.count("\r") > 10  # redrawn in place, many times


def test_disabled_bar_writes_nothing_and_passes_items_through():
    out = io.StringIO()
    bar = progress_bar(range(5), enabled=False, file=out, desc="quiet")
    assert list(bar) == list(range(5))
    bar.update(1)
    bar.set_postfix(loss=0.5)
    bar.close()
    assert out.getvalue() == ""


def test_disabled_bar_does_not_import_tqdm():
    """A device process sets its memory cap after start-up; a late tqdm import would grow it past the cap."""
    code = ("import sys; from replaykit.progress import progress_bar; "
            "list(progress_bar(range(3), enabled=False)); assert 'tqdm' not in sys.modules, 'tqdm imported'")
    subprocess.run([sys.executable, "-c", code], env=_env(), check=True, timeout=120)


def test_without_tqdm_a_silent_bar_keeps_the_interface(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # makes `from tqdm.auto import tqdm` raise ImportError
    with progress_bar([1, 2], desc="x") as bar:
        assert list(bar) == [1, 2]
        bar.update(1)
        bar.set_postfix(loss=1.0)
    assert list(progress_bar(total=3)) == []


def test_is_terminal_is_false_for_files_and_closed_streams(tmp_path):
    with open(tmp_path / "f", "w") as handle:
        assert not progress.is_terminal(handle)
    closed = io.StringIO()
    closed.close()
    assert not progress.is_terminal(closed) and not progress.is_terminal(None)
