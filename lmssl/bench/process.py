"""A command run to its end in a child process, measured: its output lines with the seconds at
which they came, its CPU seconds, the kernel's peak RSS of its largest process, and, sampled,
the peak of the RSS and of the anonymous memory summed over it and its descendants.
"""

import dataclasses
import os
import pathlib
import subprocess
import threading
import time


@dataclasses.dataclass
class Spawned:
  seconds: float
  lines: list  # (seconds since start, line) of its merged stdout and stderr
  peak_rss_bytes: int  # the process's and its waited-for children's, the largest
  cpu_s: float  # user + system seconds of the process and its waited-for children
  tree_rss_bytes: int = 0  # sampled: the peak of the RSS summed over the process and its children
  anon_bytes: int = 0  # sampled: the same for anonymous memory (no mapped files)


class _Sampler(threading.Thread):
  """Polls a process tree's memory. Its RSS counts the pages of memory-mapped shards that rows
  were read from: the page cache, which the kernel reclaims at will. Its anonymous RSS is the
  memory the processes hold themselves."""

  def __init__(self, pid: int, every: float = 0.2):
    super().__init__(daemon=True)
    self.pid, self.every, self.done = pid, every, threading.Event()
    self.rss = self.anon = 0

  def run(self) -> None:
    while not self.done.wait(self.every):
      rss = anon = 0
      for pid in _tree(self.pid):
        status = dict(line.split(":", 1) for line in read(f"/proc/{pid}/status").splitlines()
                      if ":" in line)
        rss += _kib(status.get("VmRSS"))
        anon += _kib(status.get("RssAnon"))
      self.rss, self.anon = max(self.rss, rss), max(self.anon, anon)


def _tree(pid: int) -> list[int]:
  """`pid` and its descendants, from /proc's per-thread lists of children."""
  out, todo = [], [pid]
  while todo:
    out.append(todo.pop())
    for task in pathlib.Path(f"/proc/{out[-1]}/task").glob("*"):
      todo.extend(int(c) for c in read(str(task / "children")).split())
  return out


def _kib(field: str | None) -> int:
  return int(field.split()[0]) * 1024 if field else 0


def spawn(argv: list[str], log: pathlib.Path, env: dict) -> Spawned:
  """Runs `argv` with `env` to its end, its output timed line by line into `log` (stdout and
  stderr merged); fails with the log's tail if it fails."""
  start, lines = time.perf_counter(), []
  proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                          text=True, errors="replace")
  sampler = _Sampler(proc.pid)
  sampler.start()
  with open(log, "w", encoding="utf-8") as f:
    f.write(f"$ {' '.join(argv)}\n")
    for line in proc.stdout:
      lines.append((time.perf_counter() - start, line.rstrip("\n")))
      f.write(f"[{lines[-1][0]:9.2f}s] {line}")
  _, status, usage = os.wait4(proc.pid, 0)
  sampler.done.set()
  sampler.join()
  proc.returncode = os.waitstatus_to_exitcode(status)
  seconds = time.perf_counter() - start
  if proc.returncode:
    tail = "\n".join(line for _, line in lines[-15:])
    raise RuntimeError(f"{' '.join(argv[:3])} exited with {proc.returncode}; the log is "
                       f"{log}:\n{tail}")
  # Linux counts ru_maxrss in KiB.
  return Spawned(seconds, lines, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime,
                 sampler.rss, sampler.anon)


def read(path: str) -> str:
  """A text file's content, or "" when it cannot be read (a /proc entry of a process gone)."""
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except OSError:
    return ""
