"""One run per workdir: two runs started at once in one workdir, one trains and the other stops
in one line naming the holder; a lock left by a dead run is taken over, by exactly one of the
runs that find it; the lock is gone however the run ends, and only its owner removes it."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO
from conftest import load_config
from lmssl import errors
from lmssl import workdir_lock

ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
SMOKE = ["--config", "configs/mlm_base.py:smoke"]
# "in use by another run: pid P on host H, started T (heartbeat N s ago); ..." as a pattern.
HELD = (r"workdir {dir} is in use by another run: pid {pid} on host {host}, started "
        r"\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(heartbeat \d+ s ago\); wait for it to end, stop "
        r"it, or use another --workdir")


def _cli(workdir, *args, **kw):
  return subprocess.Popen([sys.executable, "-m", "lmssl.main", *SMOKE, "--workdir",
                           str(workdir), *args], cwd=REPO, env=ENV, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _lock_of(workdir) -> dict | None:
  path = workdir / workdir_lock.NAME
  return json.loads(path.read_text()) if path.exists() else None


def test_two_runs_started_at_once_one_trains_the_other_names_it_and_nothing_is_wedged(tmp_path):
  workdir = tmp_path / "run"
  commands = [["--config.seed=0"], ["--config.seed=1", "--config.train.lr=0.01"]]
  procs = [_cli(workdir, *c) for c in commands]
  outs = [None, None]
  while None in outs:  # the first to end first: the refused one ends while the other trains
    for i, p in enumerate(procs):
      if outs[i] is None and p.poll() is not None:
        outs[i] = (p.returncode, *p.communicate())
        other = procs[1 - i]
        if p.returncode == 1 and other.poll() is None:  # the loser left the winner's lock
          assert _lock_of(workdir)["pid"] == other.pid
    time.sleep(0.05)
  codes = sorted(o[0] for o in outs)
  assert codes == [0, 1], [o[2][-2000:] for o in outs]
  winner = [o[0] for o in outs].index(0)
  loser_err = outs[1 - winner][2]
  assert "Traceback" not in loser_err
  assert re.fullmatch("lmssl: error: " + HELD.format(
      dir=re.escape(str(workdir)), pid=procs[winner].pid, host=re.escape(socket.gethostname())),
      loser_err.strip().splitlines()[-1]), loser_err[-2000:]
  # The workdir is the winner's alone: its settings, its checkpoints, no lock left.
  cfg = json.loads((workdir / "config.json").read_text())
  assert cfg["seed"] == winner and cfg["train"]["lr"] == (0.01 if winner else
                                                          load_config("mlm_base").train.lr)
  assert _lock_of(workdir) is None
  assert "final: step" in outs[winner][1]
  # Not wedged: the winner's command is accepted again (finds its run finished).
  again = _cli(workdir, *commands[winner])
  out, err = again.communicate(timeout=300)
  assert again.returncode == 0, err[-2000:]
  assert "resumed from step" in out and _lock_of(workdir) is None


def test_the_lock_is_gone_after_sigterm(tmp_path):
  workdir = tmp_path / "run"
  proc = _cli(workdir, "--config.train.steps=500", "--config.train.log_every=1")
  for line in proc.stdout:
    if re.match(r"step \d+/500 \| loss", line):
      break
  assert _lock_of(workdir)["pid"] == proc.pid
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-2000:]
  assert err.strip().splitlines()[-1].startswith("lmssl: received SIGTERM: stopped after step")
  assert _lock_of(workdir) is None


def test_the_lock_is_gone_after_a_user_error_and_a_refused_run_leaves_the_holders(tmp_path):
  from lmssl import train
  workdir = tmp_path / "run"
  cfg = load_config("mlm_base")
  cfg.data.source = f"text:{tmp_path}/missing/*.txt"
  with pytest.raises(errors.UserError, match="no files match"):
    train.train_and_evaluate(cfg, str(workdir))
  assert not workdir.exists()  # the run made it, and left it empty
  with workdir_lock.acquire(str(workdir)) as held:
    with pytest.raises(errors.UserError, match=HELD.format(
        dir=re.escape(str(workdir)), pid=os.getpid(), host=re.escape(socket.gethostname()))):
      train.train_and_evaluate(load_config("mlm_base"), str(workdir))
    assert _lock_of(workdir)["token"] == held.record["token"]
  assert os.listdir(workdir) == []


def _write_lock(workdir, **fields) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  record = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-01-01T00:00:00Z",
            "heartbeat": time.time(), "token": "theirs", "machine": workdir_lock._machine(),
            "pid_start": workdir_lock._pid_start(os.getpid()), **fields}
  (workdir / workdir_lock.NAME).write_text(json.dumps(record))


# A worker that takes the lock of each of its arguments' workdirs: round r starts at
# T0 + r * GAP, so the workers race for each. It prints "r won" or "r refused", then holds its
# locks until its stdin closes (a loser must find each winner alive).
WORKER = textwrap.dedent("""
    import sys, time
    from lmssl import errors, workdir_lock
    t0, gap, dirs = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
    held = []
    for r, d in enumerate(dirs):
      time.sleep(max(0.0, t0 + r * gap - time.time()))
      try:
        held.append(workdir_lock.acquire(d))
        print(r, "won", flush=True)
      except errors.UserError as e:
        print(r, "refused", e, flush=True)
    print("finished", flush=True)
    sys.stdin.read()
""")


def _worker(*args) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", WORKER, *map(str, args)], cwd=REPO, env=ENV,
                          text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def _results(proc) -> list[str]:
  lines = []
  for line in proc.stdout:
    if line.strip() == "finished":
      return lines
    lines.append(line.split(None, 2)[1])
  raise AssertionError(f"worker ended early: {lines}")


def _dead_pid() -> int:
  proc = subprocess.Popen(["true"])
  proc.wait()
  return proc.pid


def test_stale_locks_are_taken_over_and_live_ones_refused(tmp_path):
  # A run that holds the lock, then is killed with SIGKILL: refused while it lives, taken
  # over once it is dead.
  held = _worker(0, 0, tmp_path / "killed")
  assert _results(held) == ["won"]
  pattern = HELD.format(dir=re.escape(str(tmp_path / "killed")), pid=held.pid,
                        host=re.escape(socket.gethostname()))
  with pytest.raises(errors.UserError, match=f"^{pattern}$"):
    workdir_lock.acquire(str(tmp_path / "killed"))
  held.kill()
  held.wait()
  held.stdin.close()
  held.stdout.close()
  workdir_lock.acquire(str(tmp_path / "killed")).release()
  assert not (tmp_path / "killed" / workdir_lock.NAME).exists()

  old = time.time() - workdir_lock.STALE_AFTER_S - 60
  sleeper = subprocess.Popen(["sleep", "60"])
  try:
    cases = {  # name: (lock fields, taken over?)
        "dead_pid": (dict(pid=_dead_pid(), pid_start=""), True),
        "live_pid_old_heartbeat": (dict(pid=sleeper.pid, heartbeat=old,
                                        pid_start=workdir_lock._pid_start(sleeper.pid)), False),
        "reused_pid": (dict(pid=sleeper.pid, pid_start="1"), True),  # same number, other start
        "other_host_old": (dict(host="elsewhere", pid=sleeper.pid, heartbeat=old), True),
        "other_host_fresh": (dict(host="elsewhere", pid=_dead_pid()), False),
    }
    for name, (fields, taken) in cases.items():
      workdir = tmp_path / name
      _write_lock(workdir, **fields)
      if taken:
        lock = workdir_lock.acquire(str(workdir))
        assert _lock_of(workdir)["pid"] == os.getpid() and _lock_of(workdir)["token"] != "theirs"
        lock.release()
        assert sorted(os.listdir(workdir)) == [], name  # nothing set aside is left
      else:
        with pytest.raises(errors.UserError) as refused:
          workdir_lock.acquire(str(workdir))
        assert re.fullmatch(HELD.format(dir=re.escape(str(workdir)), pid=fields["pid"],
                                        host=re.escape(fields.get("host",
                                                                  socket.gethostname())))
                            + ("; a lock from another host is taken over once its heartbeat is "
                               "600 s old" if "host" in fields else ""),
                            str(refused.value)), str(refused.value)
        assert _lock_of(workdir)["token"] == "theirs", name
  finally:
    sleeper.kill()
    sleeper.wait()

  # A file that is not a lock: refused while new (it may be a lock being written), taken over
  # once old.
  path = tmp_path / "garbage" / workdir_lock.NAME
  path.parent.mkdir()
  path.write_text("{")
  with pytest.raises(errors.UserError, match="holds a lock file that is not a lock"):
    workdir_lock.acquire(str(path.parent))
  os.utime(path, (old, old))
  workdir_lock.acquire(str(path.parent)).release()


def test_two_runs_taking_over_the_same_stale_lock_one_wins(tmp_path):
  rounds, gap = 16, 0.1
  dirs = [tmp_path / f"r{r}" for r in range(rounds)]
  for r, workdir in enumerate(dirs):  # half left by a dead local pid, half by a silent host
    _write_lock(workdir, **(dict(pid=_dead_pid(), pid_start="") if r % 2 else
                            dict(host="elsewhere", heartbeat=0.0)))
  start = time.time() + 3.0  # after every worker has imported
  workers = [_worker(start, gap, *dirs) for _ in range(3)]
  try:
    results = [_results(w) for w in workers]
    for r, workdir in enumerate(dirs):
      outcomes = [res[r] for res in results]
      assert sorted(outcomes) == ["refused", "refused", "won"], (r, outcomes)
      assert _lock_of(workdir)["pid"] == workers[outcomes.index("won")].pid
      assert os.listdir(workdir) == [workdir_lock.NAME]
  finally:
    for w in workers:
      w.stdin.close()
      w.wait()
      w.stdout.close()


def test_the_heartbeat_is_refreshed_and_only_the_owner_removes_the_lock(tmp_path):
  lock = workdir_lock.acquire(str(tmp_path), heartbeat_every_s=0.05)
  first = _lock_of(tmp_path)["heartbeat"]
  deadline = time.time() + 10
  while _lock_of(tmp_path)["heartbeat"] == first and time.time() < deadline:
    time.sleep(0.05)
  assert _lock_of(tmp_path)["heartbeat"] > first
  # Taken over meanwhile (as if its heartbeat had stopped for long): it stops beating and
  # leaves the new holder's lock.
  with workdir_lock._guard(str(tmp_path)):  # as a takeover does
    _write_lock(tmp_path, token="theirs", host="elsewhere")
  time.sleep(0.3)
  assert lock.lost
  lock.release()
  assert _lock_of(tmp_path)["token"] == "theirs" and _lock_of(tmp_path)["host"] == "elsewhere"


def test_in_a_multi_process_job_process_0_locks_and_every_process_stops_when_it_cannot(tmp_path):
  workdir = tmp_path / "run"
  _write_lock(workdir)  # held by this test's process: alive, fresh
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    coordinator = f"127.0.0.1:{s.getsockname()[1]}"
  env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "lmssl.main", *SMOKE, "--workdir", str(workdir),
       f"--coordinator={coordinator}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
      for i in range(2)]
  (code0, err0), (code1, err1) = [(p.communicate(timeout=300)[1], p.returncode)[::-1]
                                   for p in procs]
  assert code0 == code1 == 1 and "Traceback" not in err0 + err1, (err0[-2000:], err1[-2000:])
  assert re.fullmatch("lmssl: error: " + HELD.format(
      dir=re.escape(str(workdir)), pid=os.getpid(), host=re.escape(socket.gethostname())),
      err0.strip().splitlines()[-1]), err0[-2000:]
  assert err1.strip().splitlines()[-1] == (
      "lmssl: error: process 0 could not lock the workdir; its own error says why")
  assert os.listdir(workdir) == [workdir_lock.NAME] and _lock_of(workdir)["token"] == "theirs"
