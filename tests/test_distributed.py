"""Start-up settings of a multi-process run and how meshes lie across hosts (the real
two-process run is test_multiprocess.py)."""

import jax
import numpy as np
import pytest

from lmssl import config
from lmssl import distributed
from lmssl import errors
from lmssl import sharding


def test_flags_come_before_the_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert distributed.settings(environ=env) == ("10.0.0.2:8476", 4, 3)
  assert distributed.settings("h:1", 2, 0, environ=env) == ("h:1", 2, 0)
  assert distributed.settings(process_id=1, environ=env) == ("10.0.0.2:8476", 4, 1)
  assert distributed.settings(environ={}) == (None, None, None)


@pytest.mark.parametrize("args, env, message", [
    (("10.0.0.2", 2, 0), {}, "coordinator '10.0.0.2' is not HOST:PORT; give process 0's address "
     "and a free port, e.g. --coordinator=10.0.0.2:8476"),
    (("h:1", 2, 2), {}, r"process_id 2 is outside \[0, 2\); number the processes 0..1"),
    (("h:1", 0, 0), {}, "num_processes 0 must be at least 1"),
    ((), {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not an integer; set it to "
     "the number --num_processes takes, or unset it"),
])
def test_bad_settings_name_the_value_and_the_fix(args, env, message):
  with pytest.raises(errors.UserError, match=message):
    distributed.settings(*args, environ=env)


def test_a_partial_multi_process_setting_is_refused_before_joining(monkeypatch):
  for name in distributed.ENV:
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(errors.UserError, match="a multi-process run needs all of --coordinator, "
                     "--num_processes, --process_id .*; --num_processes, --process_id are "
                     "missing. On Cloud TPU VMs and SLURM use --distributed instead"):
    distributed.initialize("127.0.0.1:1234")
  distributed.initialize()  # a single process: nothing to join
  assert jax.process_count() == 1


@pytest.mark.parametrize("shape, hosts, outer", [
    ((8, 1, 1), 2, (2, 1, 1)),
    ((2, 2, 2), 2, (2, 1, 1)),
    ((4, 2, 1), 4, (4, 1, 1)),
    ((2, 4, 1), 4, (2, 2, 1)),  # data 2 < 4 hosts: fsdp takes the rest across hosts
    ((1, 8, 1), 2, (1, 2, 1)),
])
def test_only_data_then_fsdp_cross_hosts(shape, hosts, outer):
  assert sharding.across_hosts(shape, hosts) == outer


@pytest.mark.parametrize("shape, hosts", [((1, 1, 8), 2), ((2, 1, 4), 4), ((6, 1, 1), 4)])
def test_a_mesh_that_cannot_span_the_hosts_says_how_to_fix_it(shape, hosts):
  with pytest.raises(errors.UserError, match=f"cannot span {hosts} hosts: the data axis "
                     r"\(then fsdp\) is what crosses hosts.*--config.mesh.data=-1"):
    sharding.across_hosts(shape, hosts)


def test_one_host_reads_every_row_and_the_mesh_divides_the_devices():
  mesh_cfg = config.base_config().mesh
  mesh_cfg.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(mesh_cfg)
  np.testing.assert_array_equal(sharding.host_rows(mesh, 16), np.arange(16))
  mesh_cfg.update(data=3, fsdp=1, tensor=1)
  with pytest.raises(errors.UserError, match="does not divide 8 devices"):
    sharding.make_mesh(mesh_cfg)


class FakeDevice:
  """Enough of a jax.Device for laying out meshes: ids, host, slice, platform."""

  def __init__(self, id, process_index, slice_index=0, platform="gpu"):
    self.id, self.process_index, self.slice_index = id, process_index, slice_index
    self.platform = platform
    self.device_kind = f"fake {platform}"

  def __repr__(self):
    return f"d{self.id}"


def _owner(grid, attr):
  return np.vectorize(lambda d: getattr(d, attr))(grid)


@pytest.mark.parametrize("shape", [(2, 2, 2), (4, 1, 2), (8, 1, 1)])
def test_two_hosts_split_the_data_axis_and_keep_the_rest_local(shape):
  devices = [FakeDevice(i, i // 4) for i in range(8)]
  host = _owner(sharding.device_grid(shape, devices), "process_index")
  half = shape[0] // 2
  assert (host[:half] == 0).all() and (host[half:] == 1).all()


def test_hosts_beyond_the_data_axis_take_fsdp_and_own_contiguous_rows():
  devices = [FakeDevice(i, i // 2) for i in range(8)]  # 4 hosts of 2
  host = _owner(sharding.device_grid((2, 4, 1), devices), "process_index")
  # Batch row blocks follow (data, fsdp) order: hosts own consecutive pairs of blocks.
  np.testing.assert_array_equal(host.reshape(-1), [0, 0, 1, 1, 2, 2, 3, 3])


def test_slices_not_hosts_are_the_outer_network():
  # Two slices of 2 hosts each (hosts 0, 2 in slice 0; 1, 3 in slice 1): a slice is one fast
  # network, so the data axis splits by slice, not by host order.
  devices = [FakeDevice(i, i // 2, slice_index=(i // 2) % 2) for i in range(8)]
  grid = sharding.device_grid((2, 2, 2), devices)
  slice_of = _owner(grid, "slice_index")
  assert (slice_of[0] == 0).all() and (slice_of[1] == 1).all()


# What srun gives each task of a 2-node job step, one task per node, 8 GPUs on each.
SLURM_STEP = {"SLURM_JOB_ID": "42", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "2",
              "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
              "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_NTASKS_PER_NODE": "1",
              "SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}


@pytest.mark.parametrize("change, ids", [
    ({}, list(range(8))),  # one task per node: every GPU, not just GPU SLURM_LOCALID (0)
    ({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, [0, 1, 2, 3]),  # CUDA numbers the visible ones 0..
    ({"CUDA_VISIBLE_DEVICES": "GPU-1a2b,GPU-3c4d"}, [0, 1]),
    ({"CUDA_VISIBLE_DEVICES": None}, list(range(8))),  # SLURM_GPUS_ON_NODE says how many
    ({"SLURM_STEP_TASKS_PER_NODE": None, "SLURM_TASKS_PER_NODE": "1(x2)"}, list(range(8))),
    ({"SLURM_STEP_TASKS_PER_NODE": None}, list(range(8))),  # SLURM_NTASKS_PER_NODE=1
    ({"SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_NTASKS": "16"}, None),  # a task per GPU
    ({"SLURM_STEP_TASKS_PER_NODE": "8,1", "SLURM_NODEID": "1"}, list(range(8))),
    ({"SLURM_STEP_TASKS_PER_NODE": "8,1", "SLURM_NODEID": "0"}, None),
    ({"SLURM_STEP_TASKS_PER_NODE": None, "SLURM_NTASKS_PER_NODE": None}, None),  # unknown
    ({"CUDA_VISIBLE_DEVICES": None, "SLURM_GPUS_ON_NODE": None}, None),  # a CPU job
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles", "SLURM_GPUS_ON_NODE": None}, None),
    ({"JAX_LOCAL_DEVICE_IDS": "0,1"}, None),  # JAX reads it itself
    ({"SLURM_PROCID": None}, None),  # not a SLURM step JAX would detect
])
def test_one_process_per_slurm_node_drives_all_of_its_gpus(change, ids):
  env = {k: v for k, v in {**SLURM_STEP, **change}.items() if v is not None}
  assert distributed.slurm_local_device_ids(env) == ids


def test_initialize_passes_the_slurm_device_ids_to_jax(monkeypatch):
  """Without the ids, JAX's SLURM detection sets local_device_ids=[SLURM_LOCALID] = [0]."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
  monkeypatch.setattr(jax.config, "update", lambda *a: None)
  for name in distributed.ENV:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.delenv("JAX_LOCAL_DEVICE_IDS", raising=False)
  for name, value in SLURM_STEP.items():
    monkeypatch.setenv(name, value)
  distributed.initialize(auto=True)
  [(args, kwargs)] = calls
  assert args == (None, None, None) and kwargs == {"local_device_ids": list(range(8))}
  monkeypatch.delenv("SLURM_JOB_ID")  # not under SLURM: JAX's own choice
  distributed.initialize(auto=True)
  assert calls[-1][1] == {"local_device_ids": None}
