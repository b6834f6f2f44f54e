"""Interruptions lose nothing: a run stopped by SIGTERM and killed by SIGKILL at seeded random
steps, killed while a checkpoint commits, and failed by a full disk during a save, resumed
each time from its workdir, ends with the uninterrupted run's parameters and loss log, bit for
bit (CPU, same mesh). A workdir never mixes two runs, models or tokenizers."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from conftest import REPO
from conftest import load_config
from lmssl import checkpoint
from lmssl import errors
from lmssl import metrics as metrics_lib
from lmssl import preemption
from lmssl import train
from lmssl.data import sources
from lmssl.data import tokenizer as tokenizer_lib

STEPS = 24
# Checkpoints every 4 steps, so a kill loses steps that must be redone; dropout on, so the
# per-step random streams must resume too.
OVERRIDES = {"train.steps": STEPS, "train.warmup_steps": 3, "train.log_every": 1,
             "eval.every_steps": 12, "checkpoint.every_steps": 4, "checkpoint.keep": 50,
             "model.dropout": 0.1}
TIMING = ("tokens_per_s", "step_time_s", "eta_s", "mfu")  # wall-clock: differs run to run


def _config(cache: str, **changes):
  cfg = load_config("mlm_base", "smoke")
  for key, value in {**OVERRIDES, **changes}.items():
    section, field = key.split(".")
    cfg[section][field] = value
  cfg.data.cache_dir = cache
  return cfg


def _committed(workdir) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _params(workdir, step: int) -> dict:
  params = checkpoint.read_params(str(workdir / "checkpoints" / str(step)))
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _log(workdir) -> list[dict]:
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _assert_same_run(workdir, reference) -> None:
  params, log = reference[1:3]
  assert _log(workdir) == log  # every step's loss, grad_norm, lr, accuracy and evals, exactly
  got = _params(workdir, STEPS)
  assert got.keys() == params.keys()
  for key in params:
    np.testing.assert_array_equal(got[key], params[key], err_msg=key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(data cache, final parameters, metrics log, workdir) of the uninterrupted run."""
  root = tmp_path_factory.mktemp("reliability")
  cache, workdir = str(root / "cache"), root / "uninterrupted"
  train.train_and_evaluate(_config(cache), str(workdir))
  return cache, _params(workdir, STEPS), _log(workdir), workdir


def _start(workdir, cache: str, **env):
  """`lmssl.main` on the run's command line, through tests/fault_worker.py."""
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  stderr = open(workdir.parent / f"{workdir.name}.stderr", "w", encoding="utf-8")
  proc = subprocess.Popen(
      [sys.executable, str(REPO / "tests" / "fault_worker.py"), "--config",
       "configs/mlm_base.py:smoke", "--workdir", str(workdir), *flags,
       f"--config.data.cache_dir={cache}"],
      cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **env},
      stdout=subprocess.PIPE, stderr=stderr, text=True)
  watchdog = threading.Timer(300, proc.kill)
  watchdog.start()
  proc.watchdog, proc.stderr_file = watchdog, stderr
  return proc


def _finish(proc) -> tuple[int, str, str]:
  stdout = proc.stdout.read()
  proc.wait()
  proc.watchdog.cancel()
  proc.stderr_file.close()
  with open(proc.stderr_file.name, encoding="utf-8") as f:
    return proc.returncode, stdout, f.read()


def _wait_for_step(proc, step: int) -> None:
  """Reads the run's console until it reports step >= `step`."""
  seen = ""
  for line in proc.stdout:
    seen += line
    m = re.match(r"step (\d+)/\d+ \| loss", line)
    if m and int(m.group(1)) >= step:
      return
  raise AssertionError(f"the run ended before step {step}:\n{seen}")


def test_a_run_interrupted_again_and_again_ends_as_the_uninterrupted_one(reference, tmp_path):
  cache = reference[0]
  workdir = tmp_path / "run"
  rng = np.random.default_rng(1234)
  faults = [str(f) for f in rng.permutation(["TERM", "INT", "KILL", "KILL", "KILL_IN_SAVE"])]
  history = []
  for fault in faults:
    latest = _committed(workdir)[-1] if (workdir / "checkpoints").is_dir() else 0
    if fault == "KILL_IN_SAVE":  # the next checkpoint this run would commit
      every = OVERRIDES["checkpoint.every_steps"]
      target = (latest // every + 1) * every
      proc = _start(workdir, cache, LMSSL_TEST_KILL_IN_SAVE=str(target))
    else:
      target = latest + int(rng.integers(1, 3))
      proc = _start(workdir, cache)
      _wait_for_step(proc, target)  # the run is a step or two further by now, maybe saving
      proc.send_signal(getattr(signal, "SIG" + fault.split("_")[0]))
    code, _, err = _finish(proc)
    committed = _committed(workdir)
    if fault in ("TERM", "INT"):  # Ctrl-C stops as SIGTERM does
      assert code == 128 + getattr(signal, "SIG" + fault), err[-2000:]
      m = re.fullmatch(
          rf"lmssl: received SIG{fault}: stopped after step (\d+) of {STEPS}, saved in "
          rf"{re.escape(str(workdir))}/checkpoints; run the same command to resume from there",
          err.strip().splitlines()[-1])
      assert m, err[-2000:]
      stopped = int(m.group(1))
      assert target < stopped < STEPS and committed[-1] == stopped  # finished step, saved it
    else:
      assert code == -signal.SIGKILL, err[-2000:]
      stopped = committed[-1] if committed else 0
    if fault == "KILL_IN_SAVE":  # written but never renamed into place: not a checkpoint
      assert target not in committed and committed[-1] == latest
      assert any(p.name.startswith(f"{target}.orbax-checkpoint-tmp")
                 for p in (workdir / "checkpoints").iterdir())
    logged = max(row["step"] for row in _log(workdir))  # steps the next run redoes: lost
    history.append((fault, latest, stopped, logged - stopped))

  code, out, err = _finish(_start(workdir, cache))
  assert code == 0, err[-3000:]
  assert f"resumed from step {history[-1][2]}" in out
  print("\n(fault, resumed from, last checkpoint, steps lost):", history)
  _assert_same_run(workdir, reference)


def test_ctrl_c_once_asks_for_a_stop_twice_stops_now_and_handlers_are_restored():
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  with preemption.Watch() as watch:
    assert not watch.requested(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert watch.requested(2) and watch.reason() == "received SIGINT"
    assert watch.exit_status() == 130
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_disk_filling_up_during_a_save_keeps_the_last_checkpoint(reference, tmp_path,
                                                                     monkeypatch):
  from orbax.checkpoint._src.handlers import json_checkpoint_handler
  cache, workdir = reference[0], tmp_path / "run"
  handler = json_checkpoint_handler.JsonCheckpointHandler
  write = handler._save_fn

  async def full_at_step_8(self, x, directory):
    if "/checkpoints/8.orbax-checkpoint-tmp" in str(directory):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return await write(self, x, directory)

  monkeypatch.setattr(handler, "_save_fn", full_at_step_8)
  with pytest.raises(errors.UserError, match=(
      rf"^could not write a checkpoint in {re.escape(str(workdir))}/checkpoints: No space left "
      rf"on device \(.*/checkpoints/8\.orbax-checkpoint-tmp/meta.*\); the last committed "
      r"checkpoint, step 4, is intact\. Free space there \(or lower checkpoint\.keep\), then "
      r"run the same command to resume$")):
    train.train_and_evaluate(_config(cache), str(workdir))
  assert _committed(workdir) == [4]
  monkeypatch.setattr(handler, "_save_fn", write)  # space again
  train.train_and_evaluate(_config(cache), str(workdir))
  _assert_same_run(workdir, reference)


def test_a_resumed_log_drops_later_rows_and_a_line_cut_short(tmp_path):
  rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)]
  text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo'  # killed mid-write
  (tmp_path / "metrics.jsonl").write_text(text)
  writer = metrics_lib.Writer(str(tmp_path), start_step=3)
  writer.write(4, {"loss": 0.5})
  writer.close()
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    assert [json.loads(line) for line in f] == rows[:3] + [{"step": 4, "loss": 0.5}]
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.0}\n')
  with pytest.raises(errors.UserError, match=r"metrics\.jsonl:1 is not a JSON row"):
    metrics_lib.Writer(str(tmp_path), start_step=3)


def _files(workdir) -> dict:
  """{path: (size, mtime)} under `workdir`: to show a refused run wrote nothing."""
  return {str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in workdir.rglob("*") if p.is_file()}


@pytest.fixture
def finished(reference, tmp_path):
  """A copy of the uninterrupted run's workdir."""
  workdir = tmp_path / "run"
  shutil.copytree(reference[3], workdir)
  return workdir


def test_a_workdir_holding_another_runs_settings_is_refused_unless_told(reference, finished):
  cache, before = reference[0], _files(finished)
  with pytest.raises(errors.UserError, match=(
      rf"^workdir {re.escape(str(finished))} holds a run with other settings \(seed: 0 -> 1; "
      r"train\.lr: 0\.0001 -> 0\.001\); use a new --workdir, resume with that run's settings "
      r"\(its config\.json\), or set --config\.checkpoint\.allow_config_change=True to "
      r"continue it with these$")):
    train.train_and_evaluate(_changed(cache, seed=1, lr=1e-3), str(finished))
  assert _files(finished) == before
  # Told to: the run goes on with the new settings (here two more steps) from its checkpoint.
  cfg = _config(cache, **{"train.steps": STEPS + 2})
  cfg.checkpoint.allow_config_change = True
  final = train.train_and_evaluate(cfg, str(finished))
  assert final["step"] == STEPS + 2 and _committed(finished)[-1] == STEPS + 2


def _changed(cache, seed, lr):
  cfg = _config(cache, **{"train.lr": lr})
  cfg.seed = seed
  return cfg


def test_a_checkpoint_of_another_model_is_refused_naming_the_parameters(reference, finished):
  before = _files(finished)
  cfg = _config(reference[0])
  cfg.model.num_layers = 3
  cfg.checkpoint.allow_config_change = True  # past the settings check, to the checkpoint's
  with pytest.raises(errors.UserError, match=(
      rf"^checkpoint {re.escape(str(finished))}/checkpoints/{STEPS} is of another model "
      r"\(\['transformer'\]\['layers'\]\['attn'\]\['key'\]\['bias'\]: \(2, 2, 32\) in the "
      r"checkpoint vs \(3, 2, 32\); .*; and 13 more\); resume with the model settings of the run "
      r"that wrote it \(its config\.json\), or train this model in a new --workdir$")):
    train.train_and_evaluate(cfg, str(finished))
  assert _files(finished) == before


def test_a_tokenizer_that_is_not_the_checkpoints_is_refused(reference, finished, tmp_path):
  docs = sources.read_documents("builtin", _config(reference[0]).data)
  other = tmp_path / "other.model"  # same size, another model type: other pieces
  tokenizer_lib.train(docs[:2000], str(other), 500, "bpe", max_sentences=100_000)
  shutil.copy(other, finished / "tokenizer.model")
  before = _files(finished)
  with pytest.raises(errors.UserError, match=(
      rf"^tokenizer {re.escape(str(finished))}/tokenizer\.model is not the one the checkpoints "
      rf"in {re.escape(str(finished))}/checkpoints were trained with \(its pieces differ\); "
      r"resume with that run's tokenizer, or train this one in a new --workdir$")):
    train.train_and_evaluate(_config(reference[0]), str(finished))
  assert _files(finished) == before
  # Fine-tuning from that run with a tokenizer other than its own: refused before any write.
  cfg = load_config("cls_finetune", "smoke")
  cfg.init.params_from, cfg.data.tokenizer = str(reference[3]), str(other)
  with pytest.raises(errors.UserError, match=(
      rf"^data\.tokenizer={re.escape(str(other))} is not the tokenizer the parameters in "
      rf"init\.params_from={re.escape(str(reference[3]))} were trained with "
      rf"\({re.escape(str(reference[3]))}/tokenizer\.model\); leave data\.tokenizer empty to "
      r"use that one$")):
    train.train_and_evaluate(cfg, str(tmp_path / "finetune"))
  assert not (tmp_path / "finetune").exists()
