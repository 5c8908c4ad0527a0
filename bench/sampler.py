"""A sampling profiler over every Python thread of a process, for the Stead worker.

py-spy is not installed here and pyinstrument samples only the thread that started it, but the
Temporal SDK runs workflow activations in a thread pool: a main-thread profile of the worker
misses all workflow code (sandbox, state, converters inside activations). This wrapper runs a
script as `__main__` with a daemon thread that takes `sys._current_frames()` every
`--interval` seconds and, when the script returns (the worker exits on SIGTERM), writes:

- self time: the innermost frame of each busy sample, by function;
- inclusive time: every function on a busy sample's stack (once per sample), by function;
- the same inclusive list restricted to Stead's own code;
- the busiest stacks, innermost last;

and every busy stack in the folded format of flame-graph tools beside it (`<out>.folded`).

The window can be chosen from outside: SIGUSR1 forgets what was sampled so far and starts
afresh, SIGUSR2 stops sampling and writes the report at once (a process that is then stopped
by a signal it does not survive keeps its report). Without them the report covers the whole
run and is written when the target returns.

A sample is *idle* when the thread waits (its innermost Python frame is a known blocking
call: the event loop's select, a pool worker waiting for work, a lock or condition wait);
idle samples are counted but not attributed. Under uvloop (the API) the loop is C code, so a
thread whose innermost frame is `asyncio.run` is idle or in the loop's own C code (sockets,
HTTP parsing): also counted apart. A thread waiting for the GIL is not told apart from one
running: percentages are of busy samples, a profile's shape rather than CPU time.

The sampler can only look when it holds the GIL, which a busy thread gives up at blocking
calls and every switch interval: the wrapper lowers the interval to 0.5 ms so that pure
Python work is sampled about as often as system calls are.

    python -m bench.sampler --out profile.txt [--interval 0.005] worker.py [args...]
    python -m bench.sampler --out profile.txt --module bench.bare
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
_STEAD_DIRS = ("activities/", "api/", "policies/", "sim/", "stead/", "store/", "workflows/")
# (file suffix, function) of innermost frames that mean "this thread is waiting".
_IDLE = {
    ("selectors.py", "select"),
    ("threading.py", "wait"),
    ("threading.py", "_wait_for_tstate_lock"),
    ("concurrent/futures/thread.py", "_worker"),
    ("queue.py", "get"),
    ("asyncio/runners.py", "run"),  # uvloop: waiting, or in the loop's C code
}
Frame = tuple[str, str, int]  # (file, qualified name, first line)


def _short(filename: str) -> str:
    if filename.startswith(str(REPO) + os.sep):
        return filename[len(str(REPO)) + 1 :]
    marker = "site-packages" + os.sep
    if marker in filename:
        return filename.split(marker, 1)[1]
    lib = f"{os.sep}lib{os.sep}python"
    if lib in filename:
        return "stdlib/" + filename.split(lib, 1)[1].split(os.sep, 1)[-1]
    return filename


def _stack(frame: FrameType | None) -> tuple[Frame, ...]:
    frames: list[Frame] = []
    while frame is not None:
        code = frame.f_code
        frames.append((_short(code.co_filename), code.co_qualname, code.co_firstlineno))
        frame = frame.f_back
    frames.reverse()
    return tuple(frames)


def _is_idle(stack: tuple[Frame, ...]) -> bool:
    if not stack:
        return True
    filename, qualname, _ = stack[-1]
    name = qualname.rsplit(".", 1)[-1]
    return any(filename.endswith(suffix) and name == func for suffix, func in _IDLE)


class Sampler(threading.Thread):
    def __init__(self, interval: float, out: Path) -> None:
        super().__init__(name="bench-sampler", daemon=True)
        self.interval = interval
        self.out = out
        self.stacks: Counter[tuple[Frame, ...]] = Counter()
        self.threads: Counter[str] = Counter()
        self.idle = 0
        self.samples = 0
        self.started = time.monotonic()
        self.elapsed = 0.0
        # Set by signal handlers (main thread), acted on by this thread: "start" or "dump".
        self.command: str | None = None
        self.written = False
        self._stop_event = threading.Event()

    def run(self) -> None:
        me = threading.get_ident()
        recording = True
        while not self._stop_event.wait(self.interval):
            command, self.command = self.command, None
            if command == "start":
                self._forget()
                recording = True
            elif command == "dump" and recording:
                recording = False
                self.write()
            if recording:
                self._sample(me)

    def _forget(self) -> None:
        self.stacks.clear()
        self.threads.clear()
        self.idle = self.samples = 0
        self.started = time.monotonic()

    def _sample(self, me: int) -> None:
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            stack = _stack(frame)
            self.samples += 1
            if _is_idle(stack):
                self.idle += 1
                continue
            self.stacks[stack] += 1
            self.threads[_thread_kind(names.get(ident, "?"))] += 1

    def write(self) -> None:
        self.elapsed = time.monotonic() - self.started
        self.out.with_suffix(".folded").write_text(folded(self))
        self.out.write_text(render(self))
        self.written = True

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def _thread_kind(name: str) -> str:
    # Pool threads are numbered (ThreadPoolExecutor-0_3): group them.
    return name.rsplit("_", 1)[0] if name[-1:].isdigit() else name


def _label(frame: Frame) -> str:
    return f"{frame[1]} ({frame[0]}:{frame[2]})"


def _top(counter: Counter[Frame], busy: int, limit: int) -> list[str]:
    return [
        f"{count / busy * 100:6.1f}%  {count:7d}  {_label(frame)}"
        for frame, count in counter.most_common(limit)
    ]


def folded(sampler: Sampler) -> str:
    """Busy stacks in the folded format flame-graph tools read (`a;b;c count`)."""
    return "".join(
        ";".join(_label(frame) for frame in stack) + f" {count}\n"
        for stack, count in sampler.stacks.most_common()
    )


def render(sampler: Sampler, limit: int = 40) -> str:
    busy = max(sum(sampler.stacks.values()), 1)
    self_time: Counter[Frame] = Counter()
    inclusive: Counter[Frame] = Counter()
    for stack, count in sampler.stacks.items():
        self_time[stack[-1]] += count
        for frame in set(stack):
            inclusive[frame] += count
    ours = Counter({f: c for f, c in inclusive.items() if f[0].startswith(_STEAD_DIRS)})
    lines = [
        f"samples: {sampler.samples} over {sampler.elapsed:.1f} s every"
        f" {sampler.interval * 1000:.1f} ms; idle {sampler.idle}, busy {busy}",
        "busy samples by thread: "
        + ", ".join(f"{name} {count}" for name, count in sampler.threads.most_common()),
        "",
        "== self time (innermost frame), % of busy samples ==",
        *_top(self_time, busy, limit),
        "",
        "== inclusive time (anywhere on the stack), % of busy samples ==",
        *_top(inclusive, busy, limit * 3),
        "",
        "== inclusive time, Stead's own code ==",
        *_top(ours, busy, limit * 2),
        "",
        "== busiest stacks (outermost first, last 12 frames) ==",
    ]
    for stack, count in sampler.stacks.most_common(15):
        lines.append(f"{count / busy * 100:6.1f}%  {count}")
        lines += [f"           {_label(frame)}" for frame in stack[-12:]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sampler")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=0.005)
    parser.add_argument("--switch-interval", type=float, default=0.0005)
    parser.add_argument("--module", action="store_true", help="the target is a module name")
    parser.add_argument("target")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    sys.argv = [options.target, *options.args]
    sys.setswitchinterval(options.switch_interval)
    sampler = Sampler(options.interval, options.out)
    signal.signal(signal.SIGUSR1, lambda *_: setattr(sampler, "command", "start"))
    signal.signal(signal.SIGUSR2, lambda *_: setattr(sampler, "command", "dump"))
    sampler.start()
    try:
        if options.module:
            runpy.run_module(options.target, run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, str(Path(options.target).resolve().parent))
            runpy.run_path(options.target, run_name="__main__")
    finally:
        sampler.stop()
        if not sampler.written:
            sampler.write()


if __name__ == "__main__":
    main()
