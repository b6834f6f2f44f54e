"""The one error type for input a user can fix (config values, data files, workdirs).

`lmssl.main` prints such an error's message alone, with no traceback; its message names the
value, the rule it breaks and the fix.
"""


class UserError(ValueError):
  """Bad input, not a bug: the message says what to change."""
