"""Damaged run files, damaged for real on a copy of a trained run: eval, sample and resume name
the damage in one line, fall back to the newest intact checkpoint (moving a damaged one aside
only when resuming), or stop with one line naming the file and the fix."""

import json
import os
import re
import shutil

import pytest

from test_main import _run

SMOKE = ["--config", "configs/mlm_base.py:smoke", "--config.train.steps=4",
         "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A smoke MLM run with checkpoints at steps 2 and 4."""
  workdir = tmp_path_factory.mktemp("damaged") / "run"
  out = _run("lmssl.main", *SMOKE, "--workdir", str(workdir))
  assert out.returncode == 0, out.stderr[-3000:]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
  return workdir


@pytest.fixture
def run(trained, tmp_path):
  """A copy of the trained run, to damage."""
  return shutil.copytree(trained, tmp_path / "run")


def _eval(workdir):
  return _run("lmssl.main", "eval", "--workdir", str(workdir))


def _sample(workdir):
  return _run("lmssl.main", "sample", "--workdir", str(workdir), "--prompt",
              "The [MASK] of the city")


def _lmssl_lines(out):
  return [line for line in out.stderr.splitlines() if line.startswith("lmssl:")]


def _fails_in_one_line(out, line):
  """Exit 1 with `line` all of stderr (libraries' log lines too); stdout holds at most the
  run's start lines."""
  assert out.returncode == 1 and out.stderr.strip().splitlines() == [line], out.stderr[-3000:]
  assert all(not s.startswith("lmssl:") for s in out.stdout.splitlines()), out.stdout


def _truncate_state_data(step_dir, size):
  """Truncates every array data file of a checkpoint to `size` bytes. Which file holds the
  parameters (the part eval and sample read) differs from save to save, so all are cut."""
  files = [p for p in (step_dir / "state").glob("ocdbt.process_*/d/*") if p.stat().st_size > size]
  assert files, list((step_dir / "state").rglob("*"))
  for p in files:
    os.truncate(p, size)
  return files


def test_truncated_state_file_falls_back_and_resume_moves_it_aside(run):
  ckpts = run / "checkpoints"
  damaged = _truncate_state_data(ckpts / "4", 1000)
  said = (rf"lmssl: checkpoint {ckpts}/4 is damaged \(ValueError: OUT_OF_RANGE: .*"
          r'at local file "state/": .* is not valid for value of size 1000\): ')
  for out in (_eval(run), _sample(run)):
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    [line] = _lmssl_lines(out)
    assert re.fullmatch(said + re.escape(
        "left in place (resuming the run moves it aside); using step 2, the newest intact "
        "checkpoint"), line), line
    json.loads(out.stdout.strip().splitlines()[-1])  # eval's metrics, sample's fill-ins
  assert (ckpts / "4").is_dir() and all(p.stat().st_size == 1000 for p in damaged)  # as it was

  out = _run("lmssl.main", *SMOKE, "--workdir", str(run))
  assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
  [line] = _lmssl_lines(out)
  assert re.fullmatch(said + re.escape(f"moved aside to {ckpts}/4.damaged; using step 2, the "
                                       "newest intact checkpoint"), line), line
  assert f"resumed from step 2 in {ckpts}" in out.stdout
  assert "final: step 4" in out.stdout
  assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4", "4.damaged"]
  assert all((ckpts / "4.damaged" / p.relative_to(ckpts / "4")).stat().st_size == 1000
             for p in damaged)
  out = _eval(run)  # the step 4 saved anew is intact
  assert out.returncode == 0 and not _lmssl_lines(out), out.stderr[-3000:]
  assert json.loads(out.stdout)["checkpoint"] == f"{ckpts}/4"


def test_deleted_metadata_falls_back(run):
  ckpts = run / "checkpoints"
  (ckpts / "4" / "state" / "_METADATA").unlink()
  out = _eval(run)
  assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert _lmssl_lines(out) == [
      f"lmssl: checkpoint {ckpts}/4 is damaged (state/_METADATA is missing): left in place "
      "(resuming the run moves it aside); using step 2, the newest intact checkpoint"]
  evals = json.loads(out.stdout.strip().splitlines()[-1])
  assert evals["eval_loss"] > 0
  # The output names the checkpoint it evaluated, for scripts that read only that.
  assert (evals["checkpoint"], evals["step"]) == (f"{ckpts}/2", 2)


def test_truncated_checkpoint_metadata_is_said_in_lmssl_line_alone(run):
  """Orbax logs its own error line when it lists a step whose _CHECKPOINT_METADATA does not
  parse; lmssl names that damage itself, so stderr holds lmssl's line and nothing else."""
  ckpts = run / "checkpoints"
  os.truncate(ckpts / "4" / "_CHECKPOINT_METADATA", 20)
  damage = (f"lmssl: checkpoint {ckpts}/4 is damaged (_CHECKPOINT_METADATA is not JSON: "
            "Unterminated string starting at: line 1 column 20 (char 19)): ")
  out = _eval(run)
  assert out.returncode == 0 and out.stderr.strip().splitlines() == [
      damage + "left in place (resuming the run moves it aside); using step 2, the newest "
      "intact checkpoint"], out.stderr[-3000:]
  [metrics] = out.stdout.strip().splitlines()
  assert json.loads(metrics)["step"] == 2
  out = _run("lmssl.main", *SMOKE, "--workdir", str(run))
  assert out.returncode == 0 and out.stderr.strip().splitlines() == [
      damage + f"moved aside to {ckpts}/4.damaged; using step 2, the newest intact "
      "checkpoint"], out.stderr[-3000:]


def test_no_intact_checkpoint_stops_naming_the_directory(run):
  ckpts = run / "checkpoints"
  (ckpts / "4" / "state" / "_METADATA").unlink()
  os.truncate(ckpts / "2" / "_CHECKPOINT_METADATA", 10)
  line = (f"lmssl: error: no intact checkpoint in {ckpts}: damaged {ckpts}/4 (state/_METADATA "
          f"is missing); {ckpts}/2 (_CHECKPOINT_METADATA is not JSON: Unterminated string "
          "starting at: line 1 column 2 (char 1)); all left as they are. Start over in a new "
          "--workdir (or put back intact copies of them)")
  _fails_in_one_line(_eval(run), line)
  _fails_in_one_line(_run("lmssl.main", *SMOKE, "--workdir", str(run)), line)
  assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4"]


def test_truncated_config_json_is_named_with_the_fix(run):
  os.truncate(run / "config.json", 50)
  line = (f"lmssl: error: {run}/config.json is damaged (not JSON: Expecting property name "
          "enclosed in double quotes: line 5 column 1 (char 50)); restore it from a copy, or "
          "start over in a new --workdir")
  _fails_in_one_line(_eval(run), line)
  _fails_in_one_line(_sample(run), line)


def test_truncated_tokenizer_is_named_with_the_fix(run):
  """One line for sample, eval and the resumed run, which must not suggest setting
  data.tokenizer: the run cannot go on with another tokenizer."""
  os.truncate(run / "tokenizer.model", 100)
  for out in (_sample(run), _eval(run), _run("lmssl.main", *SMOKE, "--workdir", str(run))):
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr[-3000:]
    [line] = _lmssl_lines(out)
    assert line.startswith(f"lmssl: error: tokenizer {run}/tokenizer.model, which the run in "
                           f"{run} was trained with, cannot be read (")
    assert line.endswith("); restore it from a copy (the run cannot go on with another "
                         "tokenizer), or start over in a new --workdir")
    assert "--config" not in line
  assert (run / "tokenizer.model").stat().st_size == 100


def test_sample_refuses_another_runs_tokenizer(run, tokenizer_path):
  shutil.copy(tokenizer_path, run / "tokenizer.model")
  line = (f"lmssl: error: tokenizer {run}/tokenizer.model is not the one the checkpoints in "
          f"{run} were trained with (its pieces differ); put back that run's tokenizer (e.g. "
          "from a copy), or start over in a new --workdir")
  out = _sample(run)
  _fails_in_one_line(out, line)
  assert not out.stdout.strip()


def test_eval_without_checkpoints_names_the_workdir(run):
  shutil.rmtree(run / "checkpoints")
  _fails_in_one_line(_eval(run), (
      f"lmssl: error: --workdir {run} holds no checkpoint (no {run}/checkpoints/STEP "
      "directory); name the --workdir of a run that has saved one, or train this one first"))
