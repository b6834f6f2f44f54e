"""Simple mistakes end in one line naming the value, the rule and the fix (exit 1), never a
traceback; messages say what happened, not something near it."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO

SMOKE = ["--config", "configs/mlm_base.py:smoke"]


def _run(module, *args, pythonpath=(), env=None):
  """`python -m module args` from the repository; `env` sets variables (None: unsets one)."""
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, pythonpath), str(REPO)]),
         **(env or {})}
  env = {k: v for k, v in env.items() if v is not None}
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=300, env=env)


def _last_line(out, status=1) -> str:
  assert out.returncode == status and "Traceback" not in out.stderr, out.stderr[-3000:]
  return out.stderr.strip().splitlines()[-1]


def _only_line(out, status=1) -> str:
  """The one line a command printed, stdout and stderr together (library chatter included)."""
  lines = (out.stdout + out.stderr).strip().splitlines()
  assert out.returncode == status and len(lines) == 1, out.stdout[-2000:] + out.stderr[-3000:]
  return lines[0]


def test_a_workdir_that_is_a_file(tmp_path):
  workdir = tmp_path / "notes.txt"
  workdir.write_text("mine")
  out = _run("lmssl.main", *SMOKE, "--workdir", workdir)
  assert _last_line(out) == (
      f"lmssl: error: --workdir {workdir} is a file, but a run needs a directory there; give "
      "--workdir a new or existing directory, or move the file away")
  out = _run("lmssl.main", *SMOKE, "--workdir", workdir / "run")
  assert _last_line(out) == (
      f"lmssl: error: --workdir {workdir}/run cannot be made: {workdir} is a file, not a "
      "directory; give --workdir a path whose parents are directories, or move the file away")
  assert workdir.read_text() == "mine"


@pytest.mark.parametrize("config, extra, last_line", [
    ("configs/nope.py", [], "lmssl: error: --config configs/nope.py: no such file (relative "
     "to {repo}); give an existing config file, e.g. --config configs/mlm_base.py:smoke "
     "(configs/ holds lmssl's own)"),
    ("configs/nope.py:smoke", ["--config.train.steps=3"], "lmssl: error: --config "
     "configs/nope.py: no such file (relative to {repo}); give an existing config file, e.g. "
     "--config configs/mlm_base.py:smoke (configs/ holds lmssl's own)"),
    ("{d}/bad.py", [], "lmssl: error: {d}/bad.py, line 2 is not valid Python: invalid syntax "
     "at 'return 1 +'; fix it there (--config {d}/bad.py must be a Python file defining "
     "get_config)"),
    ("{d}/bad.py:smoke", ["--config.train.steps=3"], "lmssl: error: {d}/bad.py, line 2 is not "
     "valid Python: invalid syntax at 'return 1 +'; fix it there (--config {d}/bad.py must "
     "be a Python file defining get_config)"),
])
def test_a_config_file_that_is_missing_or_not_python(tmp_path, config, extra, last_line):
  (tmp_path / "bad.py").write_text("def get_config(arg=None):\n  return 1 +\n")
  workdir = tmp_path / "run"
  out = _run("lmssl.main", "--config", config.format(d=tmp_path), "--workdir", workdir, *extra)
  assert _last_line(out) == last_line.format(d=tmp_path, repo=REPO)
  assert not workdir.exists()


_RULE = ("a config file defines get_config(arg) returning a ConfigDict (see "
         "configs/mlm_base.py)")


@pytest.mark.parametrize("text, line", [
    ("x = 1\n", "config file {f} has no get_config(); " + _RULE),
    ("def get_config(arg=''):\n  return 1 / 0\n", "config file {f} raised ZeroDivisionError: "
     "division by zero at line 2 ('return 1 / 0'); fix it there: " + _RULE),
    # A ValueError, which absl wraps in its own flag error (with ml_collections' traceback).
    ("def get_config(arg=''):\n  return int('ten')\n", "config file {f} raised ValueError: "
     "invalid literal for int() with base 10: 'ten' at line 2 (\"return int('ten')\"); fix it "
     "there: " + _RULE),
    ("import nosuchmodule\n", "config file {f} imports module 'nosuchmodule' at line 1 ('import "
     "nosuchmodule'), which cannot be imported here (No module named 'nosuchmodule'); install "
     "it, or remove the import"),
    ("def get_config(arg=''):\n  pass\n", "config file {f}: get_config() returned None (is its "
     "return statement missing?), not a ConfigDict; " + _RULE),
])
@pytest.mark.parametrize("mode", [[], ["--config.train.steps=3"], ["eval"]])
def test_a_config_file_that_fails_to_load_is_named_in_one_line(tmp_path, text, line, mode):
  """ml_collections loads the file while absl parses the flags, before main's own handler."""
  config = tmp_path / "mine.py"
  config.write_text(text)
  workdir = tmp_path / "run"
  out = _run("lmssl.main", *mode, "--config", config, "--workdir", workdir)
  assert _only_line(out) == "lmssl: error: " + line.format(f=config)
  assert not workdir.exists()


def test_an_exception_in_lmssl_code_a_config_file_calls_is_a_bug_in_lmssl(tmp_path):
  """The file passed lmssl's config code a value it should have refused with a UserError."""
  config = tmp_path / "mine.py"
  config.write_text("from lmssl import config\n"
                    "def get_config(arg=''):\n  return config.apply_variants(None, 'smoke', {})\n")
  out = _run("lmssl.main", "--config", config, "--workdir", tmp_path / "run")
  assert out.returncode == 1 and "Traceback" in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith("lmssl: this is a bug in lmssl (")


def test_derive_out_naming_a_file(tmp_path):
  out_file = tmp_path / "order"
  out_file.write_text("mine")
  # Without the tests' TF_CPP_MIN_LOG_LEVEL, as a user runs it: TensorFlow's start-up lines
  # (a CPU feature notice through absl's pre-init logging) must not come before lmssl's.
  out = _run("lmssl.data.derive", "--task", "order", "--source", "builtin", "--out", out_file,
             env={"TF_CPP_MIN_LOG_LEVEL": None, "TF_ENABLE_ONEDNN_OPTS": None})
  assert _only_line(out) == (
      f"lmssl: error: --out {out_file} is a file; it must be a directory (new or existing) for "
      "the train and dev files: choose another path, or move the file away")
  assert out_file.read_text() == "mine"


@pytest.mark.parametrize("key, value", [("train.batch_size", 0), ("train.batch_size", -1),
                                        ("eval.batch_size", 0)])
def test_a_batch_size_below_one_on_one_device(tmp_path, key, value):
  """The tests' 8 forced devices hide it: on one, any size splits, so the fix is a size."""
  workdir = tmp_path / "run"
  out = _run("lmssl.main", *SMOKE, "--workdir", workdir, f"--config.{key}={value}",
             env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
  assert _only_line(out) == (f"lmssl: error: {key}={value} must be at least 1 (sequences per "
                             "step, over all devices); use e.g. 32")
  assert not workdir.exists()


def _hf_dir(path, config_text: str):
  path.mkdir()
  (path / "config.json").write_text(config_text)
  (path / "model.safetensors").write_bytes(b"\0" * 16)
  (path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\n")
  return path


def test_hf_source_without_the_hf_extra(tmp_path):
  # What lmssl sees on a machine without the extra: these packages cannot be imported.
  stubs = tmp_path / "stubs"
  for name in ("torch", "transformers", "safetensors"):
    (stubs / name).mkdir(parents=True)
    (stubs / name / "__init__.py").write_text(f"raise ImportError(\"No module named '{name}'\")\n")
  hf_dir = _hf_dir(tmp_path / "bert", json.dumps({"model_type": "bert"}))
  workdir = tmp_path / "run"
  out = _run("lmssl.main", *SMOKE, "--workdir", workdir,
             f"--config.init.params_from=hf:{hf_dir}", pythonpath=[stubs])
  assert _last_line(out) == (
      f"lmssl: error: init.params_from=hf:{hf_dir} reads a HuggingFace model folder, which needs "
      "the `hf` extra: torch cannot be imported here (No module named 'torch'); install it with "
      "pip install 'lmssl[hf]' (after `pip install torch` for your platform), or convert the "
      f"folder where it is installed (python -m lmssl.convert from-hf --hf_dir {hf_dir} "
      "--workdir RUN) and set init.params_from=RUN")
  assert not workdir.exists()


def test_hf_source_with_only_transformers_missing(tmp_path):
  """torch and tokenizers import; transformers, which reads the folder's tokenizer, does not.
  The run names that package at its start, before the workdir is made. A converted run would
  need transformers too (for the same tokenizer), so that is not offered."""
  stubs = tmp_path / "stubs"
  stubs.mkdir()
  (stubs / "transformers.py").write_text("raise ImportError(\"No module named 'transformers'\")\n")
  hf_dir = _hf_dir(tmp_path / "bert", json.dumps({"model_type": "bert"}))
  workdir = tmp_path / "run"
  out = _run("lmssl.main", *SMOKE, "--workdir", workdir,
             f"--config.init.params_from=hf:{hf_dir}", pythonpath=[stubs])
  assert _only_line(out) == (
      f"lmssl: error: init.params_from=hf:{hf_dir} reads a HuggingFace model folder, which needs "
      "the `hf` extra: transformers cannot be imported here (No module named 'transformers'); "
      "install it with pip install 'lmssl[hf]' (after `pip install torch` for your platform)")
  assert not workdir.exists()


@pytest.mark.parametrize("config_text, last_line", [
    ("{not json", "{path} is not valid JSON (Expecting property name enclosed in double quotes: "
     "line 1 column 2 (char 1)); it must be the model's HuggingFace config.json, as "
     "save_pretrained writes it"),
    ('{"hidden_size": 64, "vocab_size": 6}', "{path} has no model_type (it holds "
     "['hidden_size', 'vocab_size']); it must be the model's HuggingFace config.json, with "
     "model_type one of ['bert', 'gpt2', 'llama', 'mistral', 'modernbert', 'qwen2']"),
    ("[1, 2]", "{path} has no model_type (it holds a JSON list); it must be the model's "
     "HuggingFace config.json, with model_type one of ['bert', 'gpt2', 'llama', 'mistral', "
     "'modernbert', 'qwen2']"),
    # No config.json: named by the setting train takes, not convert's --hf_dir.
    (None, "{dir} has no config.json, so it is not a local HuggingFace model folder (config.json "
     "plus model.safetensors or pytorch_model.bin, as save_pretrained writes them); name such a "
     "folder"),
])
def test_an_invalid_hf_config_json(tmp_path, config_text, last_line):
  hf_dir = _hf_dir(tmp_path / "bert", config_text or "{}")
  if config_text is None:
    (hf_dir / "config.json").unlink()
  workdir = tmp_path / "run"
  out = _run("lmssl.main", *SMOKE, "--workdir", workdir, f"--config.init.params_from=hf:{hf_dir}")
  assert _last_line(out) == f"lmssl: error: init.params_from=hf:{hf_dir}: " + last_line.format(
      path=hf_dir / "config.json", dir=hf_dir)
  assert not workdir.exists()


def test_metrics_jsonl_that_is_a_directory(tmp_path):
  """The run fails before its first checkpoint, so it takes back what it wrote (config.json,
  tokenizer.model, checkpoints/): once the directory is moved away, the workdir holds no run,
  and a command with other settings starts one."""
  workdir = tmp_path / "run"
  (workdir / "metrics.jsonl").mkdir(parents=True)
  args = [*SMOKE, "--workdir", workdir, "--config.train.steps=1",
          f"--config.data.cache_dir={tmp_path / 'cache'}"]
  out = _run("lmssl.main", *args)
  assert _last_line(out) == (
      f"lmssl: error: {workdir}/metrics.jsonl is a directory, but lmssl reads or writes a file "
      "of that name in the workdir; move the directory away (or use another --workdir) and run "
      "again")
  assert os.listdir(workdir) == ["metrics.jsonl"]
  assert not any((workdir / "metrics.jsonl").iterdir())
  (workdir / "metrics.jsonl").rmdir()
  out = _run("lmssl.main", *args, "--config.seed=5")
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads((workdir / "config.json").read_text())["seed"] == 5


@pytest.mark.parametrize("source, suggestion", [
    ("text:{d}", "text:{d}/*.txt"),
    ("text:{d}/", "text:{d}/*.txt"),
    ("jsonl:{d}:body", "jsonl:{d}/*.jsonl:body"),
])
def test_a_directory_given_as_a_text_source(tmp_path, source, suggestion):
  data = tmp_path / "corpus"
  data.mkdir()
  (data / "a.txt").write_text("Some text.\n\nMore text.\n")
  workdir = tmp_path / "run"
  source = source.format(d=data)
  out = _run("lmssl.main", *SMOKE, "--workdir", workdir, f"--config.data.source={source}")
  pattern = source.split(":")[1]
  assert _last_line(out) == (
      f"lmssl: error: data source {source!r}: {pattern} is a directory; name its files with a "
      f"glob, e.g. {suggestion.format(d=data)}")
  assert not workdir.exists() or not any(workdir.iterdir())


def test_prepare_cli_says_bad_input_in_one_line(tmp_path):
  out = _run("lmssl.data.prepare", *SMOKE, "--workdir", tmp_path / "run",
             f"--config.data.source=text:{tmp_path}")
  assert _last_line(out) == (f"lmssl: error: data source 'text:{tmp_path}': {tmp_path} is a "
                             f"directory; name its files with a glob, e.g. text:{tmp_path}/*.txt")


def test_prepare_cli_says_a_bad_config_file_or_workdir_in_one_line(tmp_path):
  config = tmp_path / "bad.py"
  config.write_text("x = 1\n")
  out = _run("lmssl.data.prepare", "--config", config, "--workdir", tmp_path / "run")
  assert _only_line(out) == (f"lmssl: error: config file {config} has no get_config(); a config "
                             "file defines get_config(arg) returning a ConfigDict (see "
                             "configs/mlm_base.py)")
  blocking = tmp_path / "file"
  blocking.write_text("x")
  out = _run("lmssl.data.prepare", *SMOKE, "--workdir", blocking / "run")
  assert _only_line(out) == (f"lmssl: error: --workdir {blocking / 'run'} cannot be used: "
                             f"{blocking} is a file, not a directory; give --workdir a new or "
                             "existing directory, or move the file away")
  assert not (tmp_path / "run").exists() and blocking.read_text() == "x"


def test_rebuilding_invalid_prepared_data_says_it_rebuilds(tmp_path):
  args = [*SMOKE, "--workdir", tmp_path / "run", f"--config.data.cache_dir={tmp_path / 'c'}"]
  first = _run("lmssl.data.prepare", *args)
  assert first.returncode == 0, first.stderr[-3000:]
  prepared = dict(line.split(": ", 1) for line in first.stdout.splitlines())["prepared"]
  meta = os.path.join(prepared, "meta.json")
  with open(meta, "r+", encoding="utf-8") as f:
    f.truncate(20)
  [tokens] = glob.glob(str(tmp_path / "c" / "shards" / "*" / "train.tokens"))
  os.truncate(tokens, os.path.getsize(tokens) - 2)
  again = _run("lmssl.data.prepare", *args)
  assert again.returncode == 0, again.stderr[-3000:]
  [warning] = [line for line in again.stderr.splitlines() if "prepared data" in line]
  assert warning.split("] ", 1)[1].startswith(
      f"prepared data {prepared} is unusable ({meta} is not valid JSON (")
  assert warning.endswith("); rebuilding it now")
  [redo] = [line for line in again.stderr.splitlines() if "damaged" in line]
  assert redo.split("] ", 1)[1] == (f"shard {os.path.dirname(tokens)} is unfinished or damaged; "
                                    "preparing it again")
  assert json.loads(open(meta, encoding="utf-8").read())["format"] == "packed"


@pytest.fixture(scope="module")
def clm_run(tmp_path_factory):
  """A 2-step causal LM with a 32-position context, and the command that trained it."""
  root = tmp_path_factory.mktemp("clm")
  args = ["--config", "configs/clm_base.py:smoke", "--workdir", root / "run",
          "--config.train.steps=2", "--config.model.max_len=32", "--config.data.seq_len=32",
          f"--config.data.cache_dir={root / 'cache'}"]
  out = _run("lmssl.main", *args)
  assert out.returncode == 0, out.stderr[-3000:]
  return root / "run", args


def test_a_prompt_longer_than_the_context(clm_run):
  workdir, _ = clm_run
  out = _run("lmssl.main", "sample", "--workdir", workdir, "--prompt", " ".join(["word"] * 60))
  last = _last_line(out)
  assert last.startswith("lmssl: error: the longest prompt (") and last.endswith(
      " tokens) is longer than the model's context, model.max_len=32 learned positions, which "
      "must hold the prompt and the new tokens together; shorten the prompt to fewer than 32 "
      "tokens"), last


def test_a_failed_config_change_leaves_the_original_command_working(clm_run, tmp_path):
  """A resumed run with changed settings that fails before its first checkpoint leaves
  config.json as it was, so the command that made the run still resumes it."""
  workdir = tmp_path / "run"
  shutil.copytree(clm_run[0], workdir)
  args = [str(workdir) if a == clm_run[0] else a for a in clm_run[1]]
  before = (workdir / "config.json").read_text()
  out = _run("lmssl.main", *args, "--config.checkpoint.allow_config_change=True",
             "--config.train.steps=4", "--config.train.lr=1e30")  # not finite at step 3
  assert _last_line(out).startswith("lmssl: error: step 3: ")
  assert (workdir / "config.json").read_text() == before
  out = _run("lmssl.main", *args)
  assert out.returncode == 0, out.stderr[-3000:]


_SLOW_PREPARE = """
import sys, time
from lmssl.data import prepare
real = prepare.prepare
def slow(*args, **kwargs):
  print("preparing", flush=True)
  time.sleep(120)
  return real(*args, **kwargs)
prepare.prepare = slow
from lmssl import main
sys.argv[0] = "lmssl"
main.run()
"""


def test_sigterm_during_data_preparation_says_nothing_was_trained(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  proc = subprocess.Popen(
      [sys.executable, "-c", _SLOW_PREPARE, *SMOKE, "--workdir", str(tmp_path / "run"),
       f"--config.data.cache_dir={tmp_path / 'cache'}"], cwd=REPO, env=env, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    for line in proc.stdout:
      if line.strip() == "preparing":
        break
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr[-3000:]
  assert stderr.strip().splitlines()[-1] == (
      "lmssl: received SIGTERM during data preparation: stopped, before any training step, so "
      "nothing was trained or saved; run the same command to start again (data finished "
      "preparing is reused)")


def test_an_unexpected_exception_is_reported_as_a_bug_in_lmssl(tmp_path):
  """A traceback appears only for a bug, and then the last line says so."""
  code = ("import lmssl.main as m\n"
          "def broken(mode):\n"
          "  raise TypeError('an internal mistake')\n"
          "m._run = broken\n"
          "m.run()\n")
  out = subprocess.run([sys.executable, "-c", code, "--workdir", str(tmp_path / "run")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1
  assert "Traceback" in out.stderr and "TypeError: an internal mistake" in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      "lmssl: this is a bug in lmssl (TypeError above), not in your command or data; please "
      "report it with the traceback and the command")
