"""`python -m lmssl.main ARGS`, for test_reliability.py, with one fault armed from the
environment:

  LMSSL_TEST_KILL_IN_SAVE=STEP  the process kills itself (SIGKILL) while committing checkpoint
                                STEP: after all of its files are written, before the rename
                                that makes it a checkpoint.
"""

import os
import signal
import sys


def arm_kill_in_save(step: str) -> None:
  from orbax.checkpoint._src.path import atomicity
  cls = atomicity.AtomicRenameTemporaryPath
  finalize = cls.finalize

  async def killed_while_committing(self, *args, **kwargs):
    final = self.get_final()
    if final.name == step and final.parent.name == "checkpoints":
      os.kill(os.getpid(), signal.SIGKILL)
    return await finalize(self, *args, **kwargs)

  cls.finalize = killed_while_committing


if __name__ == "__main__":
  if os.environ.get("LMSSL_TEST_KILL_IN_SAVE"):
    arm_kill_in_save(os.environ["LMSSL_TEST_KILL_IN_SAVE"])
  from lmssl import main
  sys.argv[0] = "lmssl"
  main.run()
