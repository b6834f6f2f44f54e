"""One process of a multi-process run for test_multiprocess.py: `python -m lmssl.main ARGS`,
recording the rows this host fed into each global batch (to $LMSSL_TEST_RECORD, .npz)."""

import atexit
import os
import sys

import numpy as np

from lmssl import main
from lmssl import sharding

_fed = []


def recording(fed: list, assemble=sharding.global_batch):
  """`sharding.global_batch` that first appends the host's rows it is given to `fed`."""
  def record(local, mesh):
    fed.append({k: np.asarray(v) for k, v in local.items()})
    return assemble(local, mesh)
  return record


def _save():
  np.savez(os.environ["LMSSL_TEST_RECORD"],
           **{f"{i}/{k}": v for i, batch in enumerate(_fed) for k, v in batch.items()})


if __name__ == "__main__":
  sharding.global_batch = recording(_fed)
  atexit.register(_save)
  sys.argv = ["lmssl.main", *sys.argv[1:]]
  main.run()
