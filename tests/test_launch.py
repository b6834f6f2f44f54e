"""launch/: the commands each script runs (read back from --dry-run, or recorded by stand-ins
for gcloud, sbatch, srun, nvidia-smi and python), its argument checks, and the restart loop of
`tpu.sh resilient` against a simulated preemption. No cloud or cluster is touched."""

import os
import pathlib
import re
import shlex
import shutil
import subprocess

import pytest

from conftest import REPO

LAUNCH = REPO / "launch"
BASH = shutil.which("bash")
SCRIPTS = ["common.sh", "tpu.sh", "gpu.sh", "slurm.sh", "slurm.sbatch"]
TPU = ["--name", "lmssl-v5e", "--zone", "us-west4-a"]
CONFIG = "configs/mlm_base.py:size=base"
GS = "gs://my-bucket/lmssl/run1"
# Passthrough arguments that only survive if every layer quotes them.
TRICKY = ["--config.train.steps=10", "--config.data.source=text:/data/my corpus/*.txt", "it's",
          'x"$HOME`', ""]
# What setup installs on every worker and run starts there (the images' python3 is too old).
VENV_PYTHON = "~/lmssl-venv/bin/python"
SSH_FLAGS = ["--ssh-flag=-oConnectTimeout=30", "--ssh-flag=-oServerAliveInterval=60",
             "--ssh-flag=-oServerAliveCountMax=5"]


def sh(script, *args, env=None, cwd=REPO, path=None):
  environ = dict(os.environ, **(env or {}))
  if path is not None:
    environ["PATH"] = str(path)
  return subprocess.run([BASH, str(LAUNCH / script), *args], cwd=cwd, env=environ,
                        capture_output=True, text=True, timeout=60)


def commands(result):
  """The commands a dry run printed, each split as a shell would."""
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), result.stdout
  return [shlex.split(line[2:]) for line in lines]


def usage_error(result, *needles):
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert result.stdout == ""
  for needle in needles:
    assert needle in result.stderr, result.stderr
  return result.stderr


def remote(cmd):
  """The --command of a gcloud tpu-vm (or queued-resources) ssh line."""
  assert cmd[:3] == ["gcloud", "compute", "tpus"] and cmd[4] == "ssh"
  assert cmd[3] in ("tpu-vm", "queued-resources")
  [command] = [a[len("--command="):] for a in cmd if a.startswith("--command=")]
  return command


def lmssl_args(words):
  """The arguments after `-m lmssl.main` in a split command line."""
  i = words.index("lmssl.main")
  assert words[i - 1] == "-m"
  return words[i + 1:]


def trainer(command):
  """The trainer's command line in a tpu.sh run's remote command, split: what follows the
  lock and `cd lmssl && `, up to the redirection of its output."""
  start = command.split(" && ", 1)[1]
  return shlex.split(re.split(r" 2>&1 \| | >> ", start)[0])


# -- tpu.sh, dry run ------------------------------------------------------------------------


def test_tpu_create():
  [cmd] = commands(sh("tpu.sh", "create", *TPU, "--accelerator-type", "v5litepod-16",
                      "--dry-run"))
  assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "lmssl-v5e",
                 "--zone=us-west4-a", "--accelerator-type=v5litepod-16",
                 "--version=v2-alpha-tpuv5-lite"]


@pytest.mark.parametrize("accel, version", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e")])
def test_tpu_create_default_version_and_options(accel, version):
  [cmd] = commands(sh("tpu.sh", "create", *TPU, f"--accelerator-type={accel}", "--spot",
                      "--project", "my-project", "--dry-run"))
  assert cmd[5:] == ["lmssl-v5e", "--zone=us-west4-a", "--project=my-project",
                     f"--accelerator-type={accel}", f"--version={version}", "--spot"]
  [cmd] = commands(sh("tpu.sh", "create", *TPU, "--accelerator-type", accel,
                      "--version", "my-runtime", "--dry-run"))
  assert cmd[-1] == "--version=my-runtime"


def test_tpu_queued_creates_then_polls():
  create, poll = commands(sh("tpu.sh", "queued", *TPU, "--accelerator-type", "v4-32", "--spot",
                             "--dry-run"))
  assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "lmssl-v5e",
                    "--node-id=lmssl-v5e", "--zone=us-west4-a", "--accelerator-type=v4-32",
                    "--runtime-version=tpu-ubuntu2204-base", "--spot"]
  assert poll == ["gcloud", "compute", "tpus", "queued-resources", "describe", "lmssl-v5e",
                  "--zone=us-west4-a", "--format=value(state.state)"]


def test_tpu_setup_copies_head_to_every_worker(tmp_path):
  pack, copy, clean, install = commands(sh("tpu.sh", "setup", *TPU, "--dry-run",
                                           env={"TMPDIR": str(tmp_path)}))
  tarball = f"{tmp_path}/lmssl-lmssl-v5e.tar.gz"
  assert pack == ["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={tarball}",
                  "HEAD"]
  assert copy == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "lmssl-v5e:lmssl.tar.gz",
                  "--zone=us-west4-a", "--worker=all"]
  assert clean == ["rm", "-f", tarball]
  assert "--worker=all" in install
  steps = [shlex.split(step) for step in remote(install).split(" && ")]
  assert steps[:4] == [["rm", "-rf", "lmssl"], ["mkdir", "lmssl"],
                       ["tar", "-xzf", "lmssl.tar.gz", "-C", "lmssl"], ["cd", "lmssl"]]


def test_tpu_setup_installs_into_a_venv_with_a_current_python():
  """jax 0.10 needs Python 3.11; the Ubuntu 22.04 TPU images have 3.10. So
  setup makes a Python 3.12 venv with uv on every worker, installs into it, and run (and stop's
  process check) use its python, never the image's python3."""
  *_, install = commands(sh("tpu.sh", "setup", *TPU, "--dry-run"))
  steps = [shlex.split(step) for step in remote(install).split(" && ")][4:]
  assert steps == [
      ["python3", "-m", "pip", "install", "-q", "--user", "-U", "uv"],
      ["python3", "-m", "uv", "venv", "-q", "--clear", "--python", "3.12", "~/lmssl-venv"],
      ["python3", "-m", "uv", "pip", "install", "-q", "--python", VENV_PYTHON, "-e", ".",
       "jax[tpu]"]]
  [run] = commands(sh("tpu.sh", "run", *TPU, "--config", CONFIG, "--workdir", GS, "--dry-run"))
  assert trainer(remote(run))[:3] == [VENV_PYTHON, "-m", "lmssl.main"]
  assert "python3" not in remote(run)
  assert f"{VENV_PYTHON} -m lmssl.main" in remote(run)  # "~" unquoted: the worker expands it
  [stop] = commands(sh("tpu.sh", "stop", *TPU, "--dry-run"))
  [pattern] = set(re.findall(r"pkill(?: -9)? -f '([^']+)'", remote(stop)))
  assert re.search(pattern, "/home/me/lmssl-venv/bin/python -m lmssl.main --distributed")
  assert not re.search(pattern, "/usr/bin/python3 -m lmssl.main")


def test_tpu_run_passes_arguments_through_two_shells():
  [cmd] = commands(sh("tpu.sh", "run", *TPU, "--config", CONFIG, "--workdir", GS, "--dry-run",
                      "--", *TRICKY))
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lmssl-v5e"]
  assert "--zone=us-west4-a" in cmd and "--worker=all" in cmd
  assert all(flag in cmd for flag in SSH_FLAGS)
  command = remote(cmd)
  assert command.startswith("set -o pipefail; ")
  assert f"; cd lmssl && {VENV_PYTHON} -m lmssl.main " in command
  assert command.endswith(" 2>&1 | tee -a ~/lmssl.log")
  words = trainer(command)
  assert words[:3] == [VENV_PYTHON, "-m", "lmssl.main"]
  assert lmssl_args(words) == ["--distributed", "--config", CONFIG, "--workdir", GS, *TRICKY]


def test_tpu_run_detach_and_logs():
  [cmd] = commands(sh("tpu.sh", "run", *TPU, "--config", CONFIG, "--workdir", GS, "--detach",
                      "--dry-run"))
  command = remote(cmd)
  assert f"; cd lmssl && nohup {VENV_PYTHON} -m lmssl.main --distributed " in command
  assert command.endswith(" >> ~/lmssl.log 2>&1 < /dev/null &")
  [cmd] = commands(sh("tpu.sh", "logs", *TPU, "--dry-run"))
  assert "--worker=0" in cmd and remote(cmd) == "tail -n +1 -F ~/lmssl.log"
  [cmd] = commands(sh("tpu.sh", "logs", *TPU, "--worker=3", "--dry-run"))
  assert "--worker=3" in cmd


def _worker(tmp_path, command, **env):
  """Runs a tpu.sh run's remote command as a worker's shell would, in a fake home directory
  whose venv python is a stand-in that logs a line and waits for the file `release`."""
  (tmp_path / "lmssl").mkdir(exist_ok=True)
  (tmp_path / "lmssl-venv" / "bin").mkdir(parents=True, exist_ok=True)
  _fake(tmp_path / "lmssl-venv" / "bin", "python",
        'echo "trainer $$ started"; while [ ! -e ~/release ]; do sleep 0.05; done; '
        'echo "trainer $$ done"')
  return subprocess.Popen([BASH, "-c", command], cwd=tmp_path, text=True,
                          env=dict(os.environ, HOME=str(tmp_path), **env),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.skipif(shutil.which("flock") is None, reason="flock is not installed")
@pytest.mark.parametrize("detach", [False, True])
def test_tpu_run_twice_on_a_worker_starts_one_trainer_and_keeps_the_log(tmp_path, detach):
  """gcloud runs an ssh command again when its connection fails (status 255), so the same
  start can reach a worker twice: the second must refuse, saying why, and the log must keep
  what was written before (appended to, not truncated)."""
  [cmd] = commands(sh("tpu.sh", "run", *TPU, "--config", CONFIG, "--workdir", GS, "--dry-run",
                      *(["--detach"] if detach else [])))
  command = remote(cmd)
  log = tmp_path / "lmssl.log"
  log.write_text("an earlier run\n")
  first = _worker(tmp_path, command)
  for _ in range(200):  # until the first trainer runs (and holds the lock)
    if "started" in log.read_text():
      break
    subprocess.run(["sleep", "0.05"])
  if detach:
    assert first.wait(timeout=10) == 0  # returns at once; the trainer goes on
  second = _worker(tmp_path, command)
  out, err = second.communicate(timeout=10)
  assert second.returncode == 75, (out, err)
  assert err.count("\n") == 1
  assert "a trainer is already running on" in err and "~/lmssl.lock" in err
  assert "launch/tpu.sh stop" in err
  (tmp_path / "release").touch()
  if not detach:
    assert first.wait(timeout=10) == 0
  for _ in range(200):
    if "done" in log.read_text():
      break
    subprocess.run(["sleep", "0.05"])
  lines = log.read_text().splitlines()
  assert lines[0] == "an earlier run" and len(lines) == 3, lines
  assert lines[1].endswith("started") and lines[2].endswith("done")
  # The lock is free again: the next run starts.
  (tmp_path / "release").unlink()
  third = _worker(tmp_path, command)
  (tmp_path / "release").touch()
  assert third.wait(timeout=10) == 0


def test_tpu_stop_matches_the_trainer_but_not_itself():
  [run] = commands(sh("tpu.sh", "run", *TPU, "--config", CONFIG, "--workdir", GS, "--dry-run"))
  [stop] = commands(sh("tpu.sh", "stop", *TPU, "--dry-run"))
  assert "--worker=all" in stop
  stop_command = remote(stop)
  patterns = set(re.findall(r"pkill(?: -9)? -f '([^']+)'", stop_command))
  assert len(patterns) == 1
  pattern = patterns.pop()
  assert re.search(pattern, remote(run))  # the trainer's command line
  assert not re.search(pattern, stop_command)  # the shell that runs pkill


def test_tpu_delete():
  [cmd] = commands(sh("tpu.sh", "delete", *TPU, "--dry-run"))
  assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "lmssl-v5e",
                 "--zone=us-west4-a", "--quiet"]
  [cmd] = commands(sh("tpu.sh", "delete", *TPU, "--queued", "--dry-run"))
  assert cmd == ["gcloud", "compute", "tpus", "queued-resources", "delete", "lmssl-v5e",
                 "--zone=us-west4-a", "--force", "--quiet"]


def test_tpu_resilient_dry_run_prints_one_pass():
  cmds = commands(sh("tpu.sh", "resilient", *TPU, "--accelerator-type", "v5litepod-16",
                     "--spot", "--config", CONFIG, "--workdir", GS, "--dry-run", "--", "a b"))
  assert [c[:5] for c in cmds] == [
      ["gcloud", "compute", "tpus", "queued-resources", "create"],
      ["gcloud", "compute", "tpus", "queued-resources", "describe"],
      ["git", "-C", str(REPO), "archive", "--format=tar.gz"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
      ["rm", "-f", cmds[2][5][len("--output="):]],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
  assert "--spot" in cmds[0]
  assert lmssl_args(shlex.split(remote(cmds[-1]))) == [
      "--distributed", "--config", CONFIG, "--workdir", GS, "a b", "2>&1", "|", "tee", "-a",
      "~/lmssl.log"]


# -- tpu.sh, Multislice (--num-slices), dry run ---------------------------------------------

SLICES = [*TPU, "--num-slices", "2"]
QR_ALL = ["--node=all", "--worker=all"]


def test_tpu_multislice_queued_creates_n_nodes():
  create, poll = commands(sh("tpu.sh", "queued", *SLICES, "--accelerator-type", "v5litepod-16",
                             "--spot", "--project", "my-project", "--dry-run"))
  assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "lmssl-v5e",
                    "--node-count=2", "--node-prefix=lmssl-v5e", "--zone=us-west4-a",
                    "--project=my-project", "--accelerator-type=v5litepod-16",
                    "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]
  assert not any(a.startswith("--node-id") for a in create)
  assert poll[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "lmssl-v5e"]
  # One slice stays a single node; "--num-slices=01" is read as 1.
  [create, _] = commands(sh("tpu.sh", "queued", *TPU, "--num-slices=01", "--accelerator-type",
                            "v4-8", "--dry-run"))
  assert "--node-id=lmssl-v5e" in create and not any("--node-count" in a for a in create)


def test_tpu_multislice_setup_copies_to_every_worker_of_every_slice(tmp_path):
  pack, copy, clean, install = commands(sh("tpu.sh", "setup", *SLICES, "--dry-run",
                                           env={"TMPDIR": str(tmp_path)}))
  tarball = f"{tmp_path}/lmssl-lmssl-v5e.tar.gz"
  assert pack[:4] == ["git", "-C", str(REPO), "archive"] and clean == ["rm", "-f", tarball]
  assert copy == ["gcloud", "compute", "tpus", "queued-resources", "scp", tarball,
                  "lmssl-v5e:lmssl.tar.gz", "--zone=us-west4-a", *QR_ALL]
  assert install[:6] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "lmssl-v5e"]
  assert set(QR_ALL) <= set(install) and "--batch-size=all" in install
  assert remote(install).endswith(f"pip install -q --python {VENV_PYTHON} -e . 'jax[tpu]'")


def test_tpu_multislice_run_stop_logs_delete():
  [run] = commands(sh("tpu.sh", "run", *SLICES, "--config", CONFIG, "--workdir", GS,
                      "--dry-run", "--", *TRICKY))
  assert run[:6] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "lmssl-v5e"]
  assert set(QR_ALL) <= set(run) and "--batch-size=all" in run and "--zone=us-west4-a" in run
  assert all(flag in run for flag in SSH_FLAGS)
  command = remote(run)
  assert f"; cd lmssl && {VENV_PYTHON} -m lmssl.main --distributed " in command
  assert lmssl_args(trainer(command)) == ["--distributed", "--config", CONFIG, "--workdir", GS,
                                          *TRICKY]
  # The same trainer command as on one slice: the TPU runtime sets up the slices' coordination.
  [single] = commands(sh("tpu.sh", "run", *TPU, "--config", CONFIG, "--workdir", GS,
                         "--dry-run", "--", *TRICKY))
  assert remote(single) == command

  [stop] = commands(sh("tpu.sh", "stop", *SLICES, "--dry-run"))
  assert stop[:5] == ["gcloud", "compute", "tpus", "queued-resources", "ssh"]
  assert set(QR_ALL) <= set(stop) and "pkill -f" in remote(stop)
  [logs] = commands(sh("tpu.sh", "logs", *SLICES, "--worker", "3", "--dry-run"))
  assert logs[:5] == ["gcloud", "compute", "tpus", "queued-resources", "ssh"]
  assert "--node=0" in logs and "--worker=3" in logs and "--node=all" not in logs
  assert remote(logs) == "tail -n +1 -F ~/lmssl.log"
  [delete] = commands(sh("tpu.sh", "delete", *SLICES, "--dry-run"))
  assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "lmssl-v5e",
                    "--zone=us-west4-a", "--force", "--quiet"]


def test_tpu_multislice_resilient_dry_run():
  cmds = commands(sh("tpu.sh", "resilient", *SLICES, "--accelerator-type", "v5litepod-16",
                     "--config", CONFIG, "--workdir", GS, "--dry-run", "--", "a b"))
  assert [c[3:5] for c in cmds if c[0] == "gcloud"] == [
      ["queued-resources", "create"], ["queued-resources", "describe"],
      ["queued-resources", "scp"], ["queued-resources", "ssh"], ["queued-resources", "ssh"]]
  assert "--node-count=2" in cmds[0]
  assert "'a b' 2>&1 | tee -a" in remote(cmds[-1])


def test_equals_form_matches_separate_values():
  spaced = sh("tpu.sh", "run", *TPU, "--config", CONFIG, "--workdir", GS, "--dry-run")
  joined = sh("tpu.sh", "run", "--name=lmssl-v5e", "--zone=us-west4-a", f"--config={CONFIG}",
              f"--workdir={GS}", "--dry-run")
  assert commands(spaced) == commands(joined)


# -- tpu.sh, usage errors --------------------------------------------------------------------


def test_tpu_run_refuses_a_local_workdir():
  err = usage_error(sh("tpu.sh", "run", *TPU, "--config", CONFIG, "--workdir", "/tmp/run1",
                       "--dry-run"), "--workdir must be gs://", "every worker",
                    "--allow-local-workdir")
  assert "same checkpoints" in err
  [cmd] = commands(sh("tpu.sh", "run", *TPU, "--config", CONFIG, "--workdir", "/tmp/run1",
                      "--allow-local-workdir", "--dry-run"))
  assert "--workdir /tmp/run1" in remote(cmd)
  usage_error(sh("tpu.sh", "resilient", *TPU, "--accelerator-type", "v4-8", "--config", CONFIG,
                 "--workdir", "/tmp/run1", "--allow-local-workdir", "--dry-run"),
              "--workdir must be gs://", "resilient")


@pytest.mark.parametrize("args, needles", [
    (["run", *TPU, "--config", CONFIG, "--dry-run"],
     ["missing --workdir", "gs://my-bucket"]),
    (["run", *TPU, "--workdir", GS, "--dry-run"], ["missing --config", "configs/mlm_base.py"]),
    (["run", *TPU, "--config", "configs/nope.py", "--workdir", GS, "--dry-run"],
     ["configs/nope.py not found"]),
    (["create", "--zone", "us-west4-a", "--accelerator-type", "v4-8", "--dry-run"],
     ["missing --name", "--name lmssl-v5e"]),
    (["create", "--name", "x", "--accelerator-type", "v4-8", "--dry-run"], ["missing --zone"]),
    (["create", *TPU, "--dry-run"], ["missing --accelerator-type", "v5litepod-16"]),
    (["create", *TPU, "--accelerator-type", "v5 lite", "--dry-run"], ["--accelerator-type"]),
    (["create", "--name", "My_TPU", "--zone", "z", "--accelerator-type", "v4-8", "--dry-run"],
     ["--name 'My_TPU'"]),
    (["create", *TPU, "--accelerator-type", "v4-8", "--bogus", "--dry-run"],
     ["unknown option --bogus"]),
    (["launch", *TPU, "--dry-run"], ["unknown command 'launch'"]),
    (["create", *TPU, "--dry-run", "extra"], ["unexpected argument 'extra'"]),
    (["stop", *TPU, "--dry-run", "--", "--config.x=1"], ["after -- are for run and resilient"]),
    (["run", *TPU, "--config", CONFIG, "--workdir"], ["--workdir needs a value"]),
    (["run", *TPU, "--config", CONFIG, "--workdir", "--dry-run"], ["--workdir needs a value"]),
    (["logs", *TPU, "--worker", "one", "--dry-run"], ["--worker must be an integer"]),
    (["resilient", *TPU, "--accelerator-type", "v4-8", "--config", CONFIG, "--workdir", GS,
      "--max-restarts", "-1", "--dry-run"], ["--max-restarts must be an integer", "'-1'"]),
    (["resilient", *TPU, "--accelerator-type", "v4-8", "--config", CONFIG, "--workdir", GS,
      "--detach", "--dry-run"], ["--detach does not go with resilient"]),
    (["create", *TPU, "--accelerator-type", "v5litepod-16", "--num-slices", "2", "--dry-run"],
     ["multislice needs queued resources: use `queued` or `resilient` with --num-slices"]),
    (["queued", *TPU, "--accelerator-type", "v4-8", "--num-slices", "0", "--dry-run"],
     ["--num-slices must be an integer of at least 1", "'0'"]),
    (["stop", *TPU, "--num-slices=x", "--dry-run"], ["--num-slices must be an integer", "'x'"]),
    (["setup", *TPU, "--num-slices", "--dry-run"], ["--num-slices needs a value"]),
    (["run", *TPU, "--num-slices", "2", "--config", CONFIG, "--workdir", "/tmp/run1",
      "--allow-local-workdir", "--dry-run"], ["--workdir must be gs://", "--num-slices 2"]),
    (["queued", *TPU, "--accelerator-type", "v3-32", "--num-slices", "2", "--dry-run"],
     ["--num-slices 2 needs a TPU generation with Multislice (v4 or later)",
      "--accelerator-type v3-32 is a v3", "drop --num-slices"]),
    (["resilient", *TPU, "--accelerator-type", "v2-8", "--num-slices=4", "--config", CONFIG,
      "--workdir", GS, "--dry-run"], ["--num-slices 4 needs", "v2-8 is a v2"]),
])
def test_tpu_usage_errors(args, needles):
  usage_error(sh("tpu.sh", *args), *needles)


# -- gpu.sh ----------------------------------------------------------------------------------


def test_gpu_dry_run():
  show, train = commands(sh("gpu.sh", "--config", CONFIG, "--workdir", "/data/runs/x y",
                            "--dry-run", "--", *TRICKY))
  assert show == ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader"]
  assert train[:3] == ["python", "-m", "lmssl.main"]
  assert lmssl_args(train) == ["--config", CONFIG, "--workdir", "/data/runs/x y",
                               "--config.model.dtype=bfloat16", *TRICKY]


def test_gpu_selected_devices_and_config_from_elsewhere(tmp_path):
  show, train = commands(sh("gpu.sh", "--config", "configs/clm_base.py", "--workdir", "/w",
                            "--gpus", "0,1", "--dry-run", cwd=tmp_path))
  assert show[1] == "--id=0,1"
  assert train[:2] == ["env", "CUDA_VISIBLE_DEVICES=0,1"]
  assert lmssl_args(train)[:2] == ["--config", f"{REPO}/configs/clm_base.py"]
  usage_error(sh("gpu.sh", "--config", CONFIG, "--workdir", "/w", "--gpus", "all",
                 "--dry-run"), "--gpus must be GPU indices")


@pytest.mark.parametrize("args, needles", [
    (["--config", CONFIG, "--dry-run"], ["missing --workdir", "--workdir /"]),
    (["--workdir", "/w", "--dry-run"], ["missing --config", "configs/mlm_base.py"]),
    (["--config", CONFIG, "--workdir", "/w", "--nodes", "2"], ["unknown option --nodes"]),
])
def test_gpu_usage_errors(args, needles):
  usage_error(sh("gpu.sh", *args), *needles)


def _fake(directory, name, body):
  path = pathlib.Path(directory) / name
  path.write_text(f"#!{BASH}\n{body}\n")
  path.chmod(0o755)


def test_gpu_runs_training_when_jax_sees_a_gpu(tmp_path):
  log = tmp_path / "calls"
  _fake(tmp_path, "nvidia-smi", 'echo "0, NVIDIA H100, 81559 MiB"')
  _fake(tmp_path, "python", f'printf "%s\\n" "$@" > {log}; exit 0')
  result = sh("gpu.sh", "--config", CONFIG, "--workdir", "/w", "--", "a b",
              path=f"{tmp_path}:{os.environ['PATH']}")
  assert result.returncode == 0, result.stderr
  assert "NVIDIA H100" in result.stdout
  assert log.read_text().splitlines() == ["-m", "lmssl.main", "--config", CONFIG, "--workdir", "/w",
                                          "--config.model.dtype=bfloat16", "a b"]


def test_gpu_stops_when_jax_sees_no_gpu(tmp_path):
  _fake(tmp_path, "nvidia-smi", "true")
  _fake(tmp_path, "python", "exit 1")  # jax.default_backend() != "gpu"
  result = sh("gpu.sh", "--config", CONFIG, "--workdir", "/w",
              path=f"{tmp_path}:{os.environ['PATH']}")
  assert result.returncode == 1
  assert result.stderr.count("\n") == 1 and "sees no GPU" in result.stderr
  # CUDA 13 first (JAX's default CUDA build), with the driver it needs; CUDA 12 for older ones.
  assert 'pip install -U "jax[cuda13]" (NVIDIA driver 580 or newer' in result.stderr
  assert '"jax[cuda12]" with an older driver' in result.stderr


@pytest.mark.parametrize("script", ["gpu.sh", "slurm.sh"])
def test_help_recommends_cuda13_with_cuda12_as_the_fallback(script):
  text = " ".join(sh(script, "--help").stdout.split())
  assert '"jax[cuda13]" (NVIDIA driver 580 or newer' in text and '"jax[cuda12]"' in text
  assert text.index("cuda13") < text.index("cuda12")


# -- slurm.sh and slurm.sbatch ---------------------------------------------------------------


def test_slurm_dry_run():
  [cmd] = commands(sh("slurm.sh", "--nodes", "2", "--gpus-per-node", "8", "--config", CONFIG,
                      "--workdir", "/shared/runs/x", "--partition", "gpu", "--time", "48:00:00",
                      "--sbatch-arg=--qos=high", "--dry-run", "--", *TRICKY))
  assert cmd == ["sbatch", "--nodes=2", "--gpus-per-node=8", "--partition=gpu", "--time=48:00:00",
                 "--qos=high", str(LAUNCH / "slurm.sbatch"), "--config", CONFIG,
                 "--workdir", "/shared/runs/x", "--", *TRICKY]
  [cmd] = commands(sh("slurm.sh", "--nodes", "1", "--gpus-per-node", "4", "--config", CONFIG,
                      "--workdir", GS, "--dry-run"))
  assert cmd == ["sbatch", "--nodes=1", "--gpus-per-node=4", str(LAUNCH / "slurm.sbatch"),
                 "--config", CONFIG, "--workdir", GS]


@pytest.mark.parametrize("change, needles", [
    ({"--nodes": "two"}, ["--nodes must be an integer", "'two'"]),
    ({"--nodes": "0"}, ["--nodes must be an integer of at least 1"]),
    ({"--nodes": "1.5"}, ["--nodes must be an integer"]),
    ({"--gpus-per-node": "x"}, ["--gpus-per-node must be an integer"]),
    ({"--workdir": "runs/x"}, ["--workdir must be an absolute path", "every node"]),
    ({"--time": "two days"}, ["--time must be a SLURM time limit"]),
    ({"--exclusive": "yes"}, ["unknown option --exclusive"]),
])
def test_slurm_usage_errors(change, needles):
  options = {"--nodes": "2", "--gpus-per-node": "8", "--config": CONFIG, "--workdir": "/shared/x",
             **change}
  usage_error(sh("slurm.sh", *(a for kv in options.items() for a in kv), "--dry-run"), *needles)


def test_slurm_missing_workdir_names_the_flag():
  usage_error(sh("slurm.sh", "--nodes", "2", "--gpus-per-node", "8", "--config", CONFIG,
                 "--dry-run"), "missing --workdir", "--workdir /shared/")
  usage_error(sh("slurm.sh", "--gpus-per-node", "8", "--config", CONFIG, "--workdir", "/x",
                 "--dry-run"), "missing --nodes", "--nodes 2")


def test_sbatch_directives():
  lines = (LAUNCH / "slurm.sbatch").read_text().splitlines()
  assert lines[0] == "#!/usr/bin/env bash"
  # sbatch reads #SBATCH lines only up to the first command.
  header = []
  for line in lines[1:]:
    if line.strip() and not line.startswith("#"):
      break
    if line.startswith("#SBATCH"):
      header.append(line.split()[1])
  keys = {d.split("=")[0] for d in header}
  assert {"--nodes", "--ntasks-per-node", "--gpus-per-node", "--exclusive", "--time", "--output",
          "--requeue", "--open-mode"} <= keys
  assert "--ntasks-per-node=1" in header and "--open-mode=append" in header


def test_sbatch_script_runs_one_distributed_process_per_node(tmp_path):
  """slurm.sh's sbatch arguments reach srun inside the job intact (stand-ins for both)."""
  submitted, launched = tmp_path / "sbatch.argv", tmp_path / "srun.argv"
  _fake(tmp_path, "sbatch", f'printf "%s\\n" "$@" > {submitted}')
  _fake(tmp_path, "srun", f'printf "%s\\n" "$@" > {launched}')
  path = f"{tmp_path}:{os.environ['PATH']}"
  result = sh("slurm.sh", "--nodes", "2", "--gpus-per-node", "8", "--config", CONFIG,
              "--workdir", "/shared/x", "--", *TRICKY, path=path)
  assert result.returncode == 0, result.stderr
  argv = submitted.read_text().split("\n")[:-1]
  script = argv.index(str(LAUNCH / "slurm.sbatch"))
  assert argv[:script] == ["--nodes=2", "--gpus-per-node=8"]
  result = sh("slurm.sbatch", *argv[script + 1:], path=path,
              env={"SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "2"})
  assert result.returncode == 0, result.stderr
  assert "job 42" in result.stderr
  srun = launched.read_text().split("\n")[:-1]
  assert srun[:5] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", "python", "-m", "lmssl.main"]
  assert srun[5:] == ["--distributed", "--config", CONFIG, "--workdir", "/shared/x",
                      "--config.model.dtype=bfloat16", *TRICKY]


def test_sbatch_script_outside_slurm():
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  result = subprocess.run([BASH, str(LAUNCH / "slurm.sbatch"), "--config", CONFIG, "--workdir",
                           "/x"], env=env, capture_output=True, text=True, timeout=60)
  usage_error(result, "not inside a SLURM job", "sbatch")
  [cmd] = commands(sh("slurm.sbatch", "--config", CONFIG, "--workdir", "/x", "--dry-run",
                      "--", "a b"))
  assert cmd[0] == "srun" and lmssl_args(cmd)[-2:] == ["--config.model.dtype=bfloat16", "a b"]
  usage_error(sh("slurm.sbatch", "--config", CONFIG, "--dry-run"), "missing --workdir")


# -- every script ----------------------------------------------------------------------------


@pytest.fixture
def bare_path(tmp_path):
  """A PATH with only what the scripts need before they look for their tool."""
  for tool in ("bash", "dirname"):
    os.symlink(shutil.which(tool), tmp_path / tool)
  return tmp_path


@pytest.mark.parametrize("script, args, tool, where", [
    ("tpu.sh", ["create", *TPU, "--accelerator-type", "v4-8"], "gcloud",
     "https://cloud.google.com/sdk/docs/install"),
    ("tpu.sh", ["delete", *TPU], "gcloud", "Google Cloud CLI"),
    ("gpu.sh", ["--config", CONFIG, "--workdir", "/w"], "nvidia-smi", "NVIDIA driver"),
    ("slurm.sh", ["--nodes", "2", "--gpus-per-node", "8", "--config", CONFIG, "--workdir", "/w"],
     "sbatch", "SLURM"),
])
def test_missing_tool(bare_path, script, args, tool, where):
  err = usage_error(sh(script, *args, path=bare_path), f"{tool} not found on PATH", where,
                    "--dry-run")
  assert err.count("\n") == 1


@pytest.mark.parametrize("script", ["tpu.sh", "gpu.sh", "slurm.sh", "slurm.sbatch"])
def test_help(script):
  result = sh(script, "--help")
  assert result.returncode == 0 and result.stdout.startswith("usage:")
  assert "--config" in result.stdout and "--workdir" in result.stdout


def test_tpu_without_a_command_prints_usage():
  result = sh("tpu.sh")
  assert result.returncode == 2 and "usage:" in result.stderr


def test_readme_dry_run_example_is_what_the_script_prints():
  """The README's example is the script's output, so it shows the guarded start: the lock,
  the log appended to, the ssh connect timeout."""
  text = (LAUNCH / "README.md").read_text()
  block = text.split("```console\n", 1)[1].split("```", 1)[0]
  command, printed = block.split("\n+ ", 1)
  args = shlex.split(command.removeprefix("$ ").replace("\\\n", " "))
  assert args[0] == "launch/tpu.sh"
  assert sh("tpu.sh", *args[1:]).stdout == "+ " + printed
  assert "flock -n 9" in printed and "| tee -a ~/lmssl.log" in printed
  assert "--ssh-flag=-oConnectTimeout=30" in printed


def test_docs_state_what_gcloud_does_not_an_unsourced_worker_limit():
  """gcloud's queued-resources ssh batches workers, 64 by default; --batch-size=all makes one
  batch of all of them (it warns above 100). No cap of 64 under --batch-size=all exists there."""
  readme = " ".join((LAUNCH / "README.md").read_text().split())
  script = " ".join((LAUNCH / "tpu.sh").read_text().split())
  for text in (readme, script):
    assert "at most 64" not in text and "64 or fewer" not in text
  assert "64 by default" in readme and "--batch-size=all" in readme


def test_required_python_is_what_the_dependencies_need():
  """requires-python and the README's Quickstart state the Python that the pinned jax floor
  needs (checked against the installed jax when it is that floor release)."""
  importlib_metadata = pytest.importorskip("importlib.metadata")
  pyproject = (REPO / "pyproject.toml").read_text()
  floor = re.search(r'^requires-python = ">=(3\.\d+)"$', pyproject, re.M)[1]
  assert f"With Python {floor}+" in (REPO / "README.md").read_text()
  jax_floor = re.search(r'"jax>=([0-9.]+)"', pyproject)[1]
  installed = importlib_metadata.metadata("jax")
  if not installed["Version"].startswith(jax_floor + "."):
    pytest.skip(f"installed jax {installed['Version']} is not the floor release {jax_floor}")
  assert installed["Requires-Python"] == f">={floor}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
  result = subprocess.run([BASH, "-n", str(LAUNCH / script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck():
  result = subprocess.run(["shellcheck", "-x", *(f"launch/{s}" for s in SCRIPTS)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout


# -- tpu.sh resilient against a simulated preemption ------------------------------------------

# A stand-in for gcloud that keeps a queued resource's state in files: create makes it ACTIVE
# and its node(s) READY (one per --node-id, or --node-count named after --node-prefix), delete
# removes them, and the training ssh exits with the next status in `run_results`; a 255 also
# marks the slice preempted, as a spot reclaim would, and "255:NODE" preempts just that node.
FAKE_GCLOUD = r"""
cd "$FAKE_STATE"
printf '%s\n' "$*" >> calls
not_found() {
  echo "ERROR: (gcloud.compute.tpus.$1.describe) NOT_FOUND: Resource '$2' was not found." >&2
  exit 1
}
case "$*" in
  *" describe "*)
    if [[ -s describe_errors ]]; then  # a scripted failure, e.g. the API being unavailable
      head -n 1 describe_errors >&2; sed -i 1d describe_errors; exit 1
    fi ;;
esac
case "$*" in
  "compute tpus queued-resources describe"*) cat qr 2>/dev/null || not_found queued-resources "$5";;
  "compute tpus tpu-vm describe"*) cat "node-$5" 2>/dev/null || not_found tpu-vm "$5" ;;
  "compute tpus queued-resources create"*)
    if [[ -e qr ]]; then
      echo "ERROR: (gcloud.compute.tpus.queued-resources.create) ALREADY_EXISTS: $5" >&2
      exit 1
    fi
    echo ACTIVE > qr
    for arg; do
      case $arg in
        --node-id=*) echo READY > "node-${arg#*=}" ;;
        --node-count=*) count=${arg#*=} ;;
        --node-prefix=*) prefix=${arg#*=} ;;
      esac
    done
    for ((i = 0; i < ${count:-0}; i++)); do echo READY > "node-$prefix-$i"; done ;;
  "compute tpus queued-resources delete"*) rm -f qr node-* ;;
  *"-m lmssl.main"*)
    status=$(head -n 1 run_results); sed -i 1d run_results
    case $status in
      255) echo SUSPENDED > qr; for node in node-*; do echo PREEMPTED > "$node"; done ;;
      255:*) echo PREEMPTED > "node-${status#*:}"; status=255 ;;
    esac
    exit "$status" ;;
esac
"""


def _resilient(tmp_path, run_results, *extra, describe_errors=(), existing=False):
  """`existing`: the queued resource is there (ACTIVE, READY) before the script starts."""
  state = tmp_path / "state"
  state.mkdir()
  (state / "run_results").write_text("".join(f"{r}\n" for r in run_results))
  (state / "describe_errors").write_text("".join(f"{e}\n" for e in describe_errors))
  if existing:
    (state / "qr").write_text("ACTIVE\n")
    (state / "node-lmssl-v5e").write_text("READY\n")
  _fake(tmp_path, "gcloud", FAKE_GCLOUD)
  result = sh("tpu.sh", "resilient", *TPU, "--accelerator-type", "v5litepod-16", "--spot",
              "--config", CONFIG, "--workdir", GS, "--poll", "0", *extra,
              path=f"{tmp_path}:{os.environ['PATH']}",
              env={"FAKE_STATE": str(state), "TMPDIR": str(tmp_path)})
  events = []  # the calls that change the slice or train on it, in order
  for call in (state / "calls").read_text().splitlines():
    if "-m lmssl.main" in call:
      events.append("run")
    elif call.startswith("compute tpus queued-resources ") and \
        call.split()[3] in ("create", "delete"):
      events.append(call.split()[3])
  return result, events


def test_resilient_recreates_a_preempted_slice_and_resumes(tmp_path):
  result, events = _resilient(tmp_path, [255, 0])
  assert result.returncode == 0, result.stderr
  assert events == ["create", "run", "delete", "create", "run"]
  assert "restart 1 of 10" in result.stderr and "training finished" in result.stderr


def test_resilient_does_not_retry_a_failing_run_on_a_healthy_slice(tmp_path):
  result, events = _resilient(tmp_path, [1])
  assert result.returncode == 1
  assert "not preempted" in result.stderr and GS in result.stderr
  assert events == ["create", "run"]


def test_resilient_gives_up_after_max_restarts(tmp_path):
  result, events = _resilient(tmp_path, [255, 255, 255], "--max-restarts", "1")
  assert result.returncode == 1
  assert "giving up after 1 restarts" in result.stderr
  assert events == ["create", "run", "delete", "create", "run", "delete"]


def test_resilient_multislice_recreates_when_one_slice_is_preempted(tmp_path):
  """Two slices; the second one's node is preempted while the queued resource still reads
  ACTIVE: every node is checked, so the whole queued resource is recreated."""
  result, events = _resilient(tmp_path, ["255:lmssl-v5e-1", 0], "--num-slices", "2")
  assert result.returncode == 0, result.stderr
  assert events == ["create", "run", "delete", "create", "run"]
  assert "lmssl-v5e-1 PREEMPTED" in result.stderr and "restart 1 of 10" in result.stderr
  calls = (tmp_path / "state" / "calls").read_text().splitlines()
  assert "compute tpus tpu-vm describe lmssl-v5e-1 --zone=us-west4-a --format=value(state)" \
      in calls
  runs = [c for c in calls if "-m lmssl.main" in c]
  assert len(runs) == 2
  assert all(c.startswith("compute tpus queued-resources ssh lmssl-v5e ") and
             "--node=all --worker=all" in c for c in runs)


def test_resilient_runs_again_when_a_retried_start_finds_the_trainer_running(tmp_path):
  """gcloud retried a dropped connection and the worker refused a second trainer (75): the
  first one is cut off from this terminal, so stop it and run again, as after a lost ssh."""
  result, events = _resilient(tmp_path, [75, 0])
  assert result.returncode == 0, result.stderr
  assert events == ["create", "run", "run"]
  assert "lost the connection to a healthy slice" in result.stderr
  calls = (tmp_path / "state" / "calls").read_text()
  assert "pkill -f" in calls


UNAVAILABLE = ("ERROR: (gcloud.compute.tpus.queued-resources.describe) UNAVAILABLE: The "
               "service is currently unavailable.")


def test_resilient_retries_a_describe_error_that_is_not_not_found(tmp_path):
  """A transient describe failure says nothing about the resource: read as "missing", the
  loop would create it again and die on ALREADY_EXISTS. Only NOT_FOUND means missing."""
  result, events = _resilient(tmp_path, [0], describe_errors=[UNAVAILABLE, UNAVAILABLE],
                              existing=True)
  assert result.returncode == 0, result.stderr
  assert events == ["run"]
  assert "UNAVAILABLE" in result.stderr and "try 1 of 5" in result.stderr
  # NOT_FOUND still reads as missing: the resource is created.
  fresh = tmp_path / "fresh"
  fresh.mkdir()
  result, events = _resilient(fresh, [0])
  assert result.returncode == 0, result.stderr
  assert events == ["create", "run"]


def test_resilient_gives_up_when_describe_keeps_failing(tmp_path):
  result, events = _resilient(tmp_path, [0], describe_errors=[UNAVAILABLE] * 9, existing=True)
  assert result.returncode == 1
  assert events == []
  last = result.stderr.splitlines()[-1]
  assert last.startswith("launch/tpu.sh: error: gcloud compute tpus queued-resources describe "
                         "lmssl-v5e failed 5 times (ERROR:")
  assert "UNAVAILABLE" in last and "run the same command again" in last
  calls = (tmp_path / "state" / "calls").read_text().splitlines()
  assert sum(" describe " in c for c in calls) == 5


def test_delete_retries_describe_and_never_guesses(tmp_path):
  """delete without --queued asks whether a queued resource of that name exists: a transient
  error is retried, not taken as "no" (which would delete the wrong kind of resource)."""
  state = tmp_path / "state"
  state.mkdir()
  (state / "describe_errors").write_text(UNAVAILABLE + "\n")
  (state / "qr").write_text("ACTIVE\n")
  _fake(tmp_path, "gcloud", FAKE_GCLOUD)
  result = sh("tpu.sh", "delete", *TPU, "--poll", "0", path=f"{tmp_path}:{os.environ['PATH']}",
              env={"FAKE_STATE": str(state)})
  assert result.returncode == 0, result.stderr
  calls = (state / "calls").read_text().splitlines()
  assert calls[-1].startswith("compute tpus queued-resources delete lmssl-v5e")
