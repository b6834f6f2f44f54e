"""The command lines: bad input ends in one line naming the fix; prepare writes the cache."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def _run(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_bad_config_value_is_one_clear_line_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  out = _run("lmssl.main", "--config", "configs/mlm_base.py:smoke", "--workdir", str(workdir),
             "--config.train.batch_size=30")
  assert out.returncode == 1
  assert "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      "lmssl: error: train.batch_size=30 is not divisible by 8 data shards (mesh data x fsdp, "
      "and 1 processes); use a multiple of 8")
  assert not workdir.exists()


@pytest.mark.parametrize("args, last_line", [
    (["--config.train.stepz=5"], "lmssl: error: --config.train.stepz names no setting: the "
     "config has no 'stepz' (did you mean 'steps'?); lmssl/config.py lists every setting"),
    (["--config.trian.steps=5"], "lmssl: error: --config.trian.steps names no setting: the "
     "config has no 'trian' (did you mean 'train'?); lmssl/config.py lists every setting"),
    (["--config.train.steps=ten"], "lmssl: error: flag --config.train.steps=ten: invalid "
     "literal for int() with base 10: 'ten'"),
    (["--config=configs/mlm_base.py:smoke,tiny"], "lmssl: error: unknown config variant "
     "'tiny'; known: ['size', 'smoke']"),
    (["--config.data.source=text:{d}/data/*.txt"], "lmssl: error: {d}/data/b.txt is not UTF-8 "
     "text (byte 0: b'\\x89PNG'); convert it, e.g. `iconv -f latin1 -t utf-8`"),
    (["--config.data.source=text:{d}/data/e.txt"], "lmssl: error: {d}/data/e.txt is empty; "
     "remove it or narrow the glob"),
    (["--config.model.attention=splash"], "lmssl: error: model.attention='splash' cannot run "
     "here: it runs on tpu only, and this run's devices are cpu; use "
     "--config.model.attention=auto (picks xla here) or xla"),
    (["--config.train.lr=-1"], "lmssl: error: train.lr=-1.0 must be a finite number above 0 "
     "(the peak learning rate that warmup reaches); use e.g. 1e-4"),
    (["--config.train.lr=nan"], "lmssl: error: train.lr=nan must be a finite number above 0 "
     "(the peak learning rate that warmup reaches); use e.g. 1e-4"),
    (["--config.train.batch_size=0"], "lmssl: error: train.batch_size=0 must be at least 1 "
     "(sequences per step, over all devices); use a multiple of 8"),
    (["--config.data.seq_len=0"], "lmssl: error: data.seq_len=0 is too short: a masked-LM row "
     "([CLS] token [SEP]) needs at least 3 positions; use a longer seq_len (128 is typical)"),
    (["--config.model.dtype=float12"], "lmssl: error: model.dtype='float12' is not known; use "
     "one of ['float32', 'bfloat16', 'float16']"),
])
def test_bad_input_on_the_command_line_is_one_line_and_writes_nothing(tmp_path, args,
                                                                       last_line):
  data = tmp_path / "data"
  data.mkdir()
  (data / "a.txt").write_text("Some text.\n\nMore text.\n")
  (data / "b.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")  # not text
  (data / "e.txt").write_text("\n \n")
  workdir = tmp_path / "run"
  out = _run("lmssl.main", "--config", "configs/mlm_base.py:smoke", "--workdir", str(workdir),
             *[a.format(d=tmp_path) for a in args])
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  lines = out.stderr.strip().splitlines()
  assert lines[-1] == last_line.format(d=tmp_path) or lines[-2:] == [
      last_line.format(d=tmp_path), "Pass --helpfull to see every flag."], out.stderr[-1000:]
  assert not workdir.exists() or not any(workdir.iterdir())


def test_missing_data_names_the_glob(tmp_path):
  out = _run("lmssl.main", "--config", "configs/clm_base.py:smoke", "--workdir",
             str(tmp_path / "run"), f"--config.data.source=text:{tmp_path}/nothing/*.txt")
  assert out.returncode == 1 and "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("lmssl: error: data source 'text:") and "no files match" in last


def test_prepare_cli_writes_tokenizer_and_cached_examples(tmp_path):
  out = _run("lmssl.data.prepare", "--config", "configs/mlm_base.py:smoke", "--workdir",
             str(tmp_path / "run"), f"--config.data.cache_dir={tmp_path / 'cache'}")
  assert out.returncode == 0, out.stderr
  # Importing TensorFlow printed its oneDNN notice twice, through absl's pre-init logging,
  # before lmssl's first line.
  assert "oneDNN" not in out.stderr and "absl::InitializeLog" not in out.stderr, out.stderr
  lines = dict(line.split(": ", 1) for line in out.stdout.strip().splitlines())
  assert lines["tokenizer"] == str(tmp_path / "run" / "tokenizer.model")
  assert lines["prepared"].startswith(str(tmp_path / "cache" / "prepared"))
  with open(os.path.join(lines["prepared"], "meta.json"), encoding="utf-8") as f:
    meta = json.load(f)
  assert meta["seq_len"] == 64 and meta["splits"]["train"]["num_examples"] > 0


def test_a_partial_multi_process_setting_stops_before_anything_is_written(tmp_path):
  workdir = tmp_path / "run"
  out = _run("lmssl.main", "--config", "configs/mlm_base.py:smoke", "--workdir", str(workdir),
             "--coordinator=127.0.0.1:8476", "--process_id=1")
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      "lmssl: error: a multi-process run needs all of --coordinator, --num_processes, "
      "--process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); "
      "--num_processes is missing. On Cloud TPU VMs and SLURM use --distributed instead, which "
      "finds them itself")
  assert not workdir.exists()
