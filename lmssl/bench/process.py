"""A command run to its end in a child process, measured: its output lines with the seconds at
which they came, its CPU seconds, the kernel's peak RSS of its largest process, and, sampled,
the peak of the RSS and of the anonymous memory summed over it and its descendants.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

# A child's ru_maxrss counts the RSS of the process it was forked from, as it was at the fork:
# Linux keeps the high-water mark across exec. Forked from the benchmark (which holds JAX) or a
# test worker (gigabytes), a command would report that as its own peak. So a small launcher
# forks it instead, waits for it, and writes its wait status and rusage to a pipe (argv[1]).
_LAUNCHER = """
import json, os, sys
fd = int(sys.argv[1])
pid = os.fork()
if pid == 0:
  os.close(fd)
  try:
    os.execvp(sys.argv[2], sys.argv[2:])
  finally:
    os._exit(127)
_, status, usage = os.wait4(pid, 0)
os.write(fd, json.dumps([status, usage.ru_maxrss, usage.ru_utime + usage.ru_stime]).encode())
"""


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
      tree = tree_status(self.pid, os.getpid())[1:]  # the launcher's descendants
      rss = sum(_kib(status.get("VmRSS")) for status in tree)
      anon = sum(_kib(status.get("RssAnon")) for status in tree)
      self.rss, self.anon = max(self.rss, rss), max(self.anon, anon)


def tree_status(pid: int, parent: int) -> list[dict]:
  """The /proc status fields of `pid`, a child of `parent`, and of its descendants. A listed
  process counts only while it is still that child (its Tgid is its pid, its PPid the parent):
  once it exits and is reaped, its pid may be reused at once by any process or thread on the
  machine (pid_max is 32,768 on this VM, and threads draw from the same numbers), whose memory
  is not the tree's."""
  out, todo = [], [(pid, parent)]
  while todo:
    pid, parent = todo.pop()
    status = dict(line.split(":", 1) for line in read(f"/proc/{pid}/status").splitlines()
                  if ":" in line)
    if status.get("Tgid", "").strip() != str(pid) or status.get("PPid", "").strip() != str(parent):
      continue
    out.append(status)
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
      todo.extend((int(c), pid) for c in read(str(task / "children")).split())
  return out


def _kib(field: str | None) -> int:
  return int(field.split()[0]) * 1024 if field else 0


def spawn(argv: list[str], log: pathlib.Path, env: dict) -> Spawned:
  """Runs `argv` with `env` to its end, its output timed line by line into `log` (stdout and
  stderr merged); fails with the log's tail if it fails."""
  start, lines = time.perf_counter(), []
  read_fd, write_fd = os.pipe()
  proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(write_fd), *argv],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                          errors="replace", pass_fds=(write_fd,))
  os.close(write_fd)
  sampler = _Sampler(proc.pid)
  sampler.start()
  with open(log, "w", encoding="utf-8") as f:
    f.write(f"$ {' '.join(argv)}\n")
    for line in proc.stdout:
      lines.append((time.perf_counter() - start, line.rstrip("\n")))
      f.write(f"[{lines[-1][0]:9.2f}s] {line}")
  proc.wait()
  sampler.done.set()
  sampler.join()
  with os.fdopen(read_fd, encoding="utf-8") as f:
    status, maxrss_kib, cpu_s = json.loads(f.read() or "[32512, 0, 0]")  # 32512: exit 127
  returncode = os.waitstatus_to_exitcode(status)
  seconds = time.perf_counter() - start
  if returncode:
    tail = "\n".join(line for _, line in lines[-15:])
    raise RuntimeError(f"{' '.join(argv[:3])} exited with {returncode}; the log is "
                       f"{log}:\n{tail}")
  # Linux counts ru_maxrss in KiB.
  return Spawned(seconds, lines, maxrss_kib * 1024, cpu_s, sampler.rss, sampler.anon)


def read(path: str) -> str:
  """A text file's content, or "" when it cannot be read (a /proc entry of a process gone)."""
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except OSError:
    return ""
