"""Real multi-process training: two processes joined by jax.distributed over localhost (gloo CPU
collectives, 4 devices each) train as one process with 8 devices does, each reading only its
own rows; their checkpoint restores in one process on another mesh, on the same data."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from conftest import load_config
from multiprocess_worker import recording
from lmssl import checkpoint
from lmssl import sharding
from lmssl import train

MESH_222 = dict(mesh__data=2, mesh__fsdp=2, mesh__tensor=2)
MESH_811 = dict(mesh__data=8, mesh__fsdp=1, mesh__tensor=1)
COMMON = dict(train__log_every=1, checkpoint__every_steps=2)


def _flags(overrides):
  return [f"--config.{k.replace('__', '.')}={v}" for k, v in overrides.items()]


def _config(overrides):
  cfg = load_config("mlm_base", "smoke")
  for key, value in overrides.items():
    section, field = key.split("__")
    setattr(cfg[section], field, value)
  return cfg


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_two(workdir, record, overrides):
  """`python -m lmssl.main` as processes 0 and 1 of 2, 4 CPU devices each, started."""
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  coordinator = f"127.0.0.1:{_free_port()}"
  return [subprocess.Popen(
      [sys.executable, str(REPO / "tests" / "multiprocess_worker.py"), "--config",
       "configs/mlm_base.py:smoke", "--workdir", str(workdir), f"--coordinator={coordinator}",
       "--num_processes=2", f"--process_id={i}", *_flags(overrides)],
      cwd=REPO, env={**env, "LMSSL_TEST_RECORD": str(record / f"process{i}.npz")},
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


def _two_processes(workdir, record, overrides, ok=True, procs=None):
  """[(returncode, stdout, stderr)] of `_start_two`'s processes (with `ok`, both must
  succeed)."""
  procs = procs or _start_two(workdir, record, overrides)
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=480))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  if ok:
    for p, (_, err) in zip(procs, outs):
      assert p.returncode == 0, err[-3000:]
  return [(p.returncode, *out) for p, out in zip(procs, outs)]


def _batches(path):
  with np.load(path) as z:
    out = {}
    for name in z.files:
      i, key = name.split("/")
      out.setdefault(int(i), {})[key] = z[name]
  return [out[i] for i in sorted(out)]


def _in_process(workdir, overrides, monkeypatch):
  """Trains in this (8-device) process; returns the batches it fed, as the worker records."""
  fed = []
  with monkeypatch.context() as m:
    m.setattr(sharding, "global_batch", recording(fed))
    train.train_and_evaluate(_config(overrides), str(workdir))
  return fed


def _losses(workdir):
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _params(workdir):
  """(latest step, its parameters as numpy), whatever mesh and processes wrote them."""
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  return steps[-1], checkpoint.read_params(str(workdir / "checkpoints" / str(steps[-1])))


def _assert_close(params_a, params_b):
  leaves_a, leaves_b = jax.tree.leaves(params_a), jax.tree.leaves(params_b)
  assert len(leaves_a) == len(leaves_b)
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  cache = dict(data__cache_dir=str(root / "cache"))
  outs = _two_processes(root / "two", root, {**COMMON, **MESH_222, **cache})
  return root, cache, outs


def test_two_processes_train_like_one_and_read_only_their_rows(runs, monkeypatch):
  root, cache, outs = runs
  one = _in_process(root / "one", {**COMMON, **MESH_222, **cache}, monkeypatch)
  hosts = [_batches(root / f"process{i}.npz") for i in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == len(one) == 4 + 2 * 2  # train steps + 2 evals
  for fed0, fed1, whole in zip(*hosts, one):
    for key in whole:  # host 0 fed rows 0..3 of each batch of 8, host 1 rows 4..7: nothing else
      assert fed0[key].shape[0] == fed1[key].shape[0] == whole[key].shape[0] // 2
      np.testing.assert_array_equal(np.concatenate([fed0[key], fed1[key]]), whole[key])

  two_losses, one_losses = _losses(root / "two"), _losses(root / "one")
  assert sorted(two_losses) == [1, 2, 3, 4]
  np.testing.assert_allclose([two_losses[s] for s in range(1, 5)],
                             [one_losses[s] for s in range(1, 5)], rtol=1e-6)
  step_two, params_two = _params(root / "two")
  step_one, params_one = _params(root / "one")
  assert step_two == step_one == 4
  _assert_close(params_two, params_one)

  (_, out0, _), (_, out1, err1) = outs
  # Each process reports itself; only process 0 prints the run's progress.
  assert "process 0/2: 4 local / 8 global devices (cpu, attention xla), mesh {'data': 2, " \
         "'fsdp': 2, 'tensor': 2}; reads rows [0, 4) of each global batch of 8" in out0
  assert "process 1/2: 4 local / 8 global devices (cpu, attention xla), mesh {'data': 2, " \
         "'fsdp': 2, 'tensor': 2}; reads rows [4, 8) of each global batch of 8" in err1
  assert "step 4/4" in out0
  # (Its stdout holds only gloo's own connection chatter.)
  assert not re.search(r"step \d|model:|final:|outputs in|process \d", out1), out1


def test_two_process_checkpoint_continues_in_one_process_on_another_mesh(runs, monkeypatch):
  root, cache, _ = runs
  # Both runs go on from step 4 to 6 in one process on a (8, 1, 1) mesh: the one written by
  # two processes on (2, 2, 2), and the one written by one (the previous test's).
  if not (root / "one" / "checkpoints" / "4").is_dir():
    _in_process(root / "one", {**COMMON, **MESH_222, **cache}, monkeypatch)
  more = {**COMMON, **MESH_811, **cache, "train__steps": 6,
          "checkpoint__allow_config_change": True}  # a longer run than the one in the workdir
  from_two = _in_process(root / "two", more, monkeypatch)
  from_one = _in_process(root / "one", more, monkeypatch)
  assert len(from_two) == len(from_one) == 2 + 2  # steps 5, 6 + the final eval
  for a, b in zip(from_two, from_one):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])  # the same data order after the restore
  two_losses, one_losses = _losses(root / "two"), _losses(root / "one")
  assert sorted(two_losses) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([two_losses[s] for s in (5, 6)], [one_losses[s] for s in (5, 6)],
                             rtol=1e-6)
  step_two, params_two = _params(root / "two")
  step_one, params_one = _params(root / "one")
  assert step_two == step_one == 6
  _assert_close(params_two, params_one)


def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(runs, tmp_path):
  # JAX's preemption service (its own SIGTERM notifier) carries the notice to the other
  # process; both reach the agreed step, save it together and exit as a stop, not a finish.
  workdir = tmp_path / "run"
  procs = _start_two(workdir, tmp_path, {
      "train__steps": 200, "train__log_every": 1, "checkpoint__every_steps": 1000,
      "eval__every_steps": 1000, **runs[1]})
  for line in procs[0].stdout:  # process 0 prints the progress
    if line.startswith("step 3/200"):
      break
  procs[1].send_signal(signal.SIGTERM)
  (code0, _, err0), (code1, _, err1) = _two_processes(None, None, None, ok=False, procs=procs)
  assert code0 == code1 == 128 + signal.SIGTERM, err0[-2000:] + err1[-2000:]
  last = {err.strip().splitlines()[-1] for err in (err0, err1)}
  assert len(last) == 1, last  # the same step on both
  m = re.fullmatch(r"lmssl: a preemption notice reached one of the processes: stopped after "
                   rf"step (\d+) of 200, saved in {re.escape(str(workdir))}/checkpoints; run "
                   r"the same command to resume from there", last.pop())
  assert m and 3 < int(m.group(1)) < 200
  committed = [p.name for p in (workdir / "checkpoints").iterdir()]
  assert committed == [m.group(1)]  # the one checkpoint: the stop's, committed
  _, params = _params(workdir)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_when_process_0_cannot_prepare_the_data_every_process_stops_and_says_so(tmp_path):
  outs = _two_processes(tmp_path / "run", tmp_path, {
      "data__source": f"text:{tmp_path}/missing/*.txt", "data__cache_dir": str(tmp_path)},
      ok=False)
  (code0, _, err0), (code1, _, err1) = outs
  assert code0 == code1 == 1 and "Traceback" not in err0 + err1
  assert err0.strip().splitlines()[-1].startswith(
      f"lmssl: error: data source 'text:{tmp_path}/missing/*.txt': no files match")
  assert err1.strip().splitlines()[-1] == (
      "lmssl: error: process 0 could not prepare the data; its own error says why")
  assert not (tmp_path / "run" / "checkpoints").exists()
