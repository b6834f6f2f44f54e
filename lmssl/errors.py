"""The one error type for input a user can fix (config values, data files, workdirs).

`lmssl.main` prints such an error's message alone, with no traceback; its message names the
value, the rule it breaks and the fix.
"""


def first(items: list[str], limit: int) -> str:
  """The first `limit` of `items` joined by "; ", then how many more there are."""
  more = f"; and {len(items) - limit} more" if len(items) > limit else ""
  return "; ".join(items[:limit]) + more


class UserError(ValueError):
  """Bad input, not a bug: the message says what to change."""


class Stopped(Exception):
  """The run stopped early on request (SIGTERM, Ctrl-C, a preemption notice) after saving a
  checkpoint to resume from; `exit_status` is what the process should exit with."""

  def __init__(self, message: str, exit_status: int):
    super().__init__(message)
    self.exit_status = exit_status
