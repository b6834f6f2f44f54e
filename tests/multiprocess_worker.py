"""One process of a multi-process run for test_multiprocess.py: `python -m lmssl.main ARGS`,
recording the rows this host fed into each global batch (to $LMSSL_TEST_RECORD, .npz)."""

import atexit
import os
import sys

import numpy as np

from lmssl import main
from lmssl import sharding

_fed = []
_assemble = sharding.global_batch


def _recording(local, mesh):
  _fed.append({k: np.asarray(v) for k, v in local.items()})
  return _assemble(local, mesh)


def _save():
  np.savez(os.environ["LMSSL_TEST_RECORD"],
           **{f"{i}/{k}": v for i, batch in enumerate(_fed) for k, v in batch.items()})


if __name__ == "__main__":
  sharding.global_batch = _recording
  atexit.register(_save)
  sys.argv = ["lmssl.main", *sys.argv[1:]]
  main.run()
