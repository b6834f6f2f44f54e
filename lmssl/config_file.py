"""The --config file of a command, loaded by ml_collections while absl parses the flags: before
the command's own error handling runs, so what goes wrong with the file is told here, in one
line naming the file and the fix. Missing or unreadable, not valid Python, no get_config, an
exception raised inside it (its type, message and line), a module it imports that is not
installed. An exception raised inside lmssl's own code is not the file's fault: it passes on,
for the command to report as lmssl's bug.
"""

import logging as py_logging
import os
import sys
import traceback

from absl import flags
import ml_collections

from lmssl import errors

_EXAMPLE = "e.g. --config configs/mlm_base.py:smoke (configs/ holds lmssl's own)"
_RULE = "a config file defines get_config(arg) returning a ConfigDict (see configs/mlm_base.py)"
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def parse_flags(argv):
  """flags.FLAGS(argv), as app.run(main, flags_parser=parse_flags) wants it; a --config file
  that cannot be loaded ends the process with one line. Any other error passes on as raised."""
  path = path_in(argv)
  absl_logger = py_logging.getLogger("absl")
  absl_logger.addFilter(_returned_none_record)  # said below, in lmssl's line
  try:
    parsed = flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    message = load_error(e, path)
    if message is None:
      raise
    sys.exit(f"lmssl: error: {message}")
  finally:
    absl_logger.removeFilter(_returned_none_record)
  value = flags.FLAGS["config"].value
  if type(value).__name__ == "_ErrorConfig":  # ml_collections keeps a load error until first use
    message = load_error(vars(value)["_error"], path)
  else:
    message = _not_a_config(value, path) if flags.FLAGS["config"].present else None
  if message is not None:
    sys.exit(f"lmssl: error: {message}")
  return parsed


def _returned_none_record(record: py_logging.LogRecord) -> bool:
  return "returned None, did you forget a return statement" not in record.getMessage()


def _not_a_config(value, path: str) -> str | None:
  """Why `value`, returned by the config file's get_config, is not a config; None if it is."""
  if isinstance(value, ml_collections.ConfigDict):
    return None
  hint = " (is its return statement missing?)" if value is None else ""
  what = "None" if value is None else type(value).__name__
  return (f"config file {path}: get_config() returned {what}{hint}, not a "
          f"ConfigDict; {_RULE}")


def path_in(argv) -> str:
  """The --config file named in `argv`, without its :variants."""
  for i, arg in enumerate(argv):
    name, eq, value = arg.lstrip("-").partition("=")
    if name == "config" and arg.startswith("-"):
      value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
      return value.split(":", 1)[0] or "FILE"
  return "FILE"


def load_error(e: BaseException, path: str) -> str | None:
  """One line on why the config file `path` could not be loaded, from what loading it raised
  (`e`, or the exception `e` wraps: absl and ml_collections re-raise it with their report
  around it); None when that is not the file's doing."""
  if isinstance(e, SyntaxError):  # the config file (or one it imports) is not valid Python
    return _syntax(e, path)
  first = _first_raised(e)
  if isinstance(first, errors.UserError):  # lmssl's config code refused a variant
    return str(first)
  if isinstance(first, ImportError):
    return (f"config file {path} imports module {first.name or '?'!r}{_at(first, path)}, which "
            f"cannot be imported here ({_first_line(first)}); install it, or remove the import")
  if (isinstance(first, AttributeError) and first.name == "get_config"
      and _same_file(getattr(first.obj, "__file__", None), path)):
    return f"config file {path} has no get_config(); {_RULE}"
  returned = _returned(first)
  if returned is not None and _not_a_config(returned[0], path) is not None:
    return _not_a_config(returned[0], path)  # what a --config.KEY found no setting in
  frames = traceback.extract_tb(first.__traceback__)
  if frames and _in_lmssl(frames[-1].filename) and not _same_file(frames[-1].filename, path):
    return None  # raised in lmssl itself, which says what is wrong with a UserError
  if _at(first, path):
    return (f"config file {path} raised {type(first).__name__}: {_first_line(first)}"
            f"{_at(first, path)}; fix it there: {_RULE}")
  if isinstance(first, OSError) and any("ml_collections" in f.filename for f in frames):
    return _unloadable(first, path)  # ml_collections could not read the file
  return None


def _first_raised(e: BaseException) -> BaseException:
  """The exception `e` was (explicitly or while handling it) raised from, all the way down."""
  seen = 0
  while seen < 16:
    inner = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    if inner is None:
      return e
    e, seen = inner, seen + 1
  return e


def _returned(e: BaseException) -> tuple | None:
  """(what get_config returned,) when `e` was raised applying --config.KEY overrides to it:
  ml_collections' flag holds it in its parse while it does."""
  for frame, _ in traceback.walk_tb(e.__traceback__):
    if (frame.f_code.co_name == "_parse" and "ml_collections" in frame.f_code.co_filename
        and "config" in frame.f_locals):
      return (frame.f_locals["config"],)
  return None


def _same_file(a: str | None, b: str) -> bool:
  return bool(a) and os.path.abspath(a) == os.path.abspath(b)


def _in_lmssl(filename: str) -> bool:
  return os.path.abspath(filename).startswith(_PACKAGE + os.sep)


def _at(e: BaseException, path: str) -> str:
  """" at line N ('its code')" of the config file's innermost frame in `e`'s traceback."""
  inside = [f for f in traceback.extract_tb(e.__traceback__) if _same_file(f.filename, path)]
  if not inside:
    return ""
  code = f" ({inside[-1].line.strip()!r})" if inside[-1].line else ""
  return f" at line {inside[-1].lineno}{code}"


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or ["(no message)"])[0]


def _unloadable(error: Exception, path: str) -> str:
  """Why the config file could not be read, in one line."""
  if isinstance(error, FileNotFoundError) or "No such file or directory" in str(error):
    return (f"--config {path}: no such file (relative to {os.getcwd()}); give an existing "
            f"config file, {_EXAMPLE}")
  reason = getattr(error, "strerror", None) or _first_line(error)
  return f"--config {path} cannot be read ({reason}); give a config file, {_EXAMPLE}"


def _syntax(e: SyntaxError, path: str) -> str:
  where = f"{e.filename}, line {e.lineno}" if e.filename else "the config file"
  text = f" at {e.text.strip()!r}" if e.text and e.text.strip() else ""
  return (f"{where} is not valid Python: {e.msg}{text}; fix it there (--config {path} must be "
          "a Python file defining get_config)")
