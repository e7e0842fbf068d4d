"""Progress line for long runs: documents/s, tokens/s, bytes and ETA.

On a terminal the line is redrawn in place twice a second; in a log file (CI, Slurm) a full line is printed
every `log_interval` seconds so the log stays readable.
"""
import sys
import time


def human(n: float, unit="") -> str:
    for prefix in ("", "k", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.1f}{prefix}{unit}" if prefix else f"{n:.0f}{unit}"
        n /= 1000.0
    return f"{n}{unit}"


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    def __init__(self, total_bytes: int, stream=None, log_interval: float = 10.0, enabled: bool = True):
        self.total_bytes = max(total_bytes, 1)
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.interval = 0.5 if self.tty else log_interval
        self.enabled = enabled
        self.start = self.last_print = time.monotonic()
        self.bytes = self.docs = self.tokens = 0

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.bytes / elapsed
        eta = duration((self.total_bytes - self.bytes) / rate) if rate > 0 else "?"
        return (f"{100.0 * self.bytes / self.total_bytes:5.1f}% {human(self.bytes, 'B')}/"
                f"{human(self.total_bytes, 'B')} | {human(self.docs)} docs ({human(self.docs / elapsed)}/s) | "
                f"{human(self.tokens)} tokens ({human(self.tokens / elapsed)}/s) | "
                f"elapsed {duration(elapsed)} ETA {eta}")

    def update(self, bytes_done=None, docs=0, tokens=0):
        if bytes_done is not None:
            self.bytes = min(bytes_done, self.total_bytes)
        self.docs += docs
        self.tokens += tokens
        now = time.monotonic()
        if self.enabled and now - self.last_print >= self.interval:
            self.last_print = now
            self._emit()

    def _emit(self):
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K")
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled and self.tty:
            self._emit()
            self.stream.write("\n")
            self.stream.flush()
