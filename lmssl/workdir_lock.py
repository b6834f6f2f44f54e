"""One training run per workdir: a lock file, `WORKDIR/lock.json`, held while a run trains there.

The file says who holds it: {"host", "pid", "started" (ISO 8601 UTC), "heartbeat" (Unix
seconds, rewritten every HEARTBEAT_EVERY_S by a daemon thread), "token" (this hold's random
id), "machine" (boot id and PID namespace, so that a pid is only judged on the machine and
namespace it belongs to), "pid_start" (the process's start time in clock ticks, so that a
reused pid is not taken for the holder)}. A second run finds it and stops with one line naming
the holder and the fix.

A lock whose holder is gone is taken over:
  - same host (same hostname, boot and PID namespace): the pid no longer exists (or is a
    zombie, or is another process that reused the number). A live holder is never taken over,
    however old its heartbeat (a stopped, ^Z'd run may resume).
  - anywhere else (another host, shared storage): its heartbeat is older than STALE_AFTER_S.
  - a lock file that cannot be read as a lock: once its mtime is older than STALE_AFTER_S.

Local paths are race-free: the lock appears whole and only if absent (written under a
temporary name, then hard-linked into place, which fails if the name exists; O_CREAT|O_EXCL
where links are not supported), and taking over a stale lock, refreshing and releasing one all
happen under an flock on the workdir itself, so of two runs that find the same stale lock only
one moves it aside and creates its own. A URL (gs://...) has neither through etils.epath: there
the lock is written if absent, then read back after a pause, which catches most but not all
races (see docs/reliability.md).

Only the owner removes the lock: `release` removes the file only if it still holds its token.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import os
import secrets
import socket
import threading
import time

from lmssl import errors
from lmssl import files

NAME = "lock.json"
# How old another host's heartbeat must be before its lock counts as abandoned; the heartbeat
# is rewritten ten times as often, so a live run is never near it.
STALE_AFTER_S = 600.0
HEARTBEAT_EVERY_S = 60.0
# A URL has no create-if-absent: wait this long after writing, then read the lock back.
_URL_SETTLE_S = 2.0


def _read_first_line(path: str) -> str:
  try:
    with open(path, encoding="ascii") as f:
      return f.readline().strip()
  except OSError:
    return ""


def _machine() -> str:
  """This machine's boot and this process's PID namespace: pids mean the same only within it."""
  try:
    pid_ns = os.readlink("/proc/self/ns/pid")
  except OSError:
    pid_ns = ""
  return f"{_read_first_line('/proc/sys/kernel/random/boot_id')}/{pid_ns}"


def _pid_start(pid: int) -> str:
  """When process `pid` started (clock ticks since boot, Linux), "" where unknown."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return fields[19]  # field 22 of proc(5); fields[0] is field 3
  except (OSError, IndexError):
    return ""


def _is_zombie(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
      return f.read().rsplit(")", 1)[1].split()[0] == "Z"
  except (OSError, IndexError):
    return False


def _alive(pid: int, pid_start: str) -> bool:
  """Whether process `pid` on this machine is still the one that took the lock."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # exists, another user's
  if _is_zombie(pid):
    return False
  now = _pid_start(pid)
  return not (pid_start and now and now != pid_start)


def _record(token: str, now: float) -> dict:
  pid = os.getpid()
  started = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
  return {"host": socket.gethostname(), "pid": pid,
          "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"), "heartbeat": now, "token": token,
          "machine": _machine(), "pid_start": _pid_start(pid)}


def stale_reason(held: dict | None, age_s: float, now: float | None = None,
                 stale_after_s: float = STALE_AFTER_S) -> str:
  """Why the lock `held` (None: unreadable, `age_s` old by its mtime) is abandoned, "" if it is
  not."""
  now = time.time() if now is None else now
  if held is None:
    return f"unreadable and {age_s:.0f} s old" if age_s > stale_after_s else ""
  same_machine = (held.get("host") == socket.gethostname()
                  and held.get("machine") == _machine())
  if same_machine:
    if _alive(int(held.get("pid", -1)), str(held.get("pid_start", ""))):
      return ""
    return f"its process {held.get('pid')} is gone"
  beat = now - float(held.get("heartbeat", 0))
  return f"its heartbeat is {beat:.0f} s old" if beat > stale_after_s else ""


def _describe(workdir: str, held: dict | None, now: float, stale_after_s: float) -> str:
  where = os.path.join(workdir, NAME)
  if held is None:
    return (f"workdir {workdir} holds a lock file that is not a lock ({where}, written less "
            f"than {stale_after_s:.0f} s ago); if no run is training there, delete it, else "
            "use another --workdir")
  beat = now - float(held.get("heartbeat", now))
  elsewhere = "" if held.get("host") == socket.gethostname() else (
      f"; a lock from another host is taken over once its heartbeat is {stale_after_s:.0f} s "
      "old")
  return (f"workdir {workdir} is in use by another run: pid {held.get('pid')} on host "
          f"{held.get('host')}, started {held.get('started')} (heartbeat {max(beat, 0):.0f} s "
          f"ago); wait for it to end, stop it, or use another --workdir{elsewhere}")


def _parse(text: str) -> dict | None:
  try:
    held = json.loads(text)
  except ValueError:
    return None
  ok = isinstance(held, dict) and all(k in held for k in ("host", "pid", "token", "heartbeat"))
  return held if ok else None


@contextlib.contextmanager
def _guard(workdir: str):
  """An exclusive flock on the workdir directory itself, for the duration: serializes taking
  over, refreshing and releasing locks among processes on this machine and on file systems
  that share flocks. Where flock is not supported, nothing."""
  try:
    fd = os.open(workdir, os.O_RDONLY)
  except OSError:
    yield
    return
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
      pass
    yield
  finally:
    os.close(fd)  # drops the flock


def _read_local(path: str) -> tuple[bool, dict | None, float]:
  """(exists, the lock or None if unreadable, age by mtime in seconds)."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
      age = time.time() - os.fstat(f.fileno()).st_mtime
  except FileNotFoundError:
    return False, None, 0.0
  return True, _parse(text), age


def _write_tmp(path: str, record: dict) -> str:
  tmp = f"{os.path.join(os.path.dirname(path), '.' + NAME)}.tmp-{os.getpid()}-{record['token']}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
    f.flush()
    os.fsync(f.fileno())
  return tmp


def _create_local(path: str, record: dict) -> bool:
  """Puts `record` at `path`, whole, if nothing is there; False if something is."""
  tmp = _write_tmp(path, record)
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  except OSError as e:  # a file system without hard links
    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
      raise
  finally:
    os.unlink(tmp)
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
  return True


class Lock:
  """A held workdir lock: refreshes its heartbeat until `release`."""

  def __init__(self, workdir: str, record: dict, heartbeat_every_s: float):
    self.workdir, self.record = workdir, record
    self.path = os.path.join(workdir, NAME)
    self.lost = False  # set when the file no longer holds this lock's token
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._beat, args=(heartbeat_every_s,), daemon=True,
                                    name="lmssl-workdir-lock")
    self._thread.start()

  def __enter__(self) -> "Lock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def _beat(self, every_s: float) -> None:
    while not self._done.wait(every_s):
      try:
        self.refresh()
      except OSError:
        pass  # a transient storage error: the next beat tries again
      if self.lost:
        return

  def _mine(self) -> bool:
    if files.is_url(self.workdir):
      try:
        held = _parse(files.read_text(self.path))
      except FileNotFoundError:
        return False
      return held is not None and held.get("token") == self.record["token"]
    _, held, _ = _read_local(self.path)
    return held is not None and held.get("token") == self.record["token"]

  def refresh(self) -> None:
    """Rewrites the heartbeat, if the lock is still this one."""
    record = {**self.record, "heartbeat": time.time()}
    if files.is_url(self.workdir):
      if not self._mine():
        self.lost = True
        return
      files.write_atomically(self.path, json.dumps(record, indent=2))
      self.record = record
      return
    with _guard(self.workdir):
      if not self._mine():
        self.lost = True
        return
      tmp = _write_tmp(self.path, record)
      os.replace(tmp, self.path)
      self.record = record

  def release(self) -> None:
    """Stops the heartbeat and removes the lock file if it is still this lock's."""
    if self._done.is_set():
      return
    self._done.set()
    if threading.current_thread() is not self._thread:
      self._thread.join()
    if self.lost:
      return
    if files.is_url(self.workdir):
      if self._mine():
        files.at(self.path).unlink(missing_ok=True)
      return
    with _guard(self.workdir):
      if self._mine():
        os.unlink(self.path)


def acquire(workdir: str, *, stale_after_s: float = STALE_AFTER_S,
            heartbeat_every_s: float = HEARTBEAT_EVERY_S) -> Lock:
  """The lock of `workdir` (created if need be), or an errors.UserError naming its holder."""
  workdir = files.absolute(workdir)
  files.at(workdir).mkdir(parents=True, exist_ok=True)
  if files.is_url(workdir):
    return _acquire_url(workdir, stale_after_s, heartbeat_every_s)
  path = os.path.join(workdir, NAME)
  token = secrets.token_hex(8)
  for _ in range(100):  # each pass either returns or saw the lock change under it
    record = _record(token, time.time())
    if _create_local(path, record):
      return Lock(workdir, record, heartbeat_every_s)
    exists, held, age = _read_local(path)
    if not exists:
      continue  # released in between: try again
    now = time.time()
    if not stale_reason(held, age, now, stale_after_s):
      raise errors.UserError(_describe(workdir, held, now, stale_after_s))
    # Abandoned. Move it aside under the guard, and only if it is still the very lock judged
    # stale: of several runs that found it, the first moves it and creates its own lock; the
    # others then find that one.
    with _guard(workdir):
      again, now_held, _ = _read_local(path)
      if again and now_held == held:
        aside = f"{os.path.join(workdir, '.' + NAME)}.stale-{token}"
        try:
          os.rename(path, aside)
        except FileNotFoundError:
          continue
        # Where flock is not shared, another run may have swapped in its own lock meanwhile:
        # then that one goes back, unless yet another appeared, and this run tries again.
        moved = _read_local(aside)[1]
        if moved != held:
          with contextlib.suppress(FileExistsError):
            os.link(aside, path)
          os.unlink(aside)
          continue
        os.unlink(aside)
        record = _record(token, time.time())
        if _create_local(path, record):
          return Lock(workdir, record, heartbeat_every_s)
  raise errors.UserError(f"could not lock workdir {workdir}: its {NAME} keeps changing; "
                         "another run is starting there, so use another --workdir")


def _acquire_url(workdir: str, stale_after_s: float, heartbeat_every_s: float) -> Lock:
  """Best effort (see the module's doc): epath offers no create-if-absent for a URL."""
  path = os.path.join(workdir, NAME)
  target = files.at(path)
  try:
    held = _parse(target.read_text(encoding="utf-8"))
    exists = True
  except FileNotFoundError:
    held, exists = None, False
  if exists:
    now = time.time()
    # An unreadable lock counts as old: a URL's object appears only once wholly uploaded.
    if not stale_reason(held, stale_after_s + 1, now, stale_after_s):
      raise errors.UserError(_describe(workdir, held, now, stale_after_s))
    target.unlink(missing_ok=True)
  record = _record(secrets.token_hex(8), time.time())
  files.write_atomically(path, json.dumps(record, indent=2))
  time.sleep(_URL_SETTLE_S)  # a run writing at the same moment overwrites ours, or we theirs
  try:
    held = _parse(target.read_text(encoding="utf-8"))
  except FileNotFoundError:
    held = None
  if held is None or held.get("token") != record["token"]:
    raise errors.UserError(_describe(workdir, held, time.time(), stale_after_s))
  return Lock(workdir, record, heartbeat_every_s)
