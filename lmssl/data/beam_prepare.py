"""Prepare on Apache Beam: the same per-shard function as the local runner, spread by a Beam
runner over its workers (the `beam` extra: pip install 'lmssl[beam]').

  python -m lmssl.data.prepare --config C --workdir W --runner beam -- BEAM_FLAGS...

Flags after `--` go to Beam untouched. Without --runner, Beam's DirectRunner runs the jobs on
this machine (--direct_num_workers=N --direct_running_mode=multi_processing: N processes);
--runner=DataflowRunner --project=P --region=R --temp_location=gs://... runs on Dataflow
(its workers need lmssl installed: --setup_file, --requirements_file or --sdk_container_image),
and FlinkRunner / SparkRunner take their own flags.

Every worker writes the shards it prepares into data.cache_dir itself and emits only their
shard.json, so no runner ever holds the corpus; this process reads the shard.json files back
when the pipeline is done. The cache must therefore be storage the workers and this machine
share: a gs:// path for Dataflow, a shared filesystem for a Flink or Spark cluster.
"""

import dataclasses
import importlib
import pickle
import re
from typing import Sequence

from absl import logging
import apache_beam as beam
from apache_beam.metrics import metric
from apache_beam.options import pipeline_options
from apache_beam.runners import runner as runner_api

from lmssl import errors
from lmssl import files
from lmssl.data import shards
from lmssl.data import sources
from lmssl.data import tokenizer as tok

NAMESPACE = "lmssl"  # of the counters the runner's UI shows while shards finish
COUNTERS = ("shards_done", "tokens", "documents")
# The last line of a worker's traceback, as a remote runner's error message carries it.
_RAISED = re.compile(r"^(lmssl(?:\.\w+)*)\.(\w+): (.*)$")
_STEP = re.compile(r" \[while running '[^']*'\]$")  # what Beam adds to a worker's message


class _PrepareShard(beam.DoFn):
  """Prepares one job per element; the tokenizer travels as pickled bytes and is built once
  per DoFn instance, which a worker keeps for all the bundles it runs."""

  def __init__(self, tokenizer_bytes: bytes):
    self._tokenizer_bytes = tokenizer_bytes
    self._tokenizer = None
    self._counters = {name: metric.Metrics.counter(NAMESPACE, name) for name in COUNTERS}

  def setup(self):
    self._tokenizer = pickle.loads(self._tokenizer_bytes)

  def process(self, element: dict):
    meta = shards.prepare_shard(_job(element), self._tokenizer)
    self._counters["shards_done"].inc()
    for counts in meta["splits"].values():
      self._counters["tokens"].inc(counts["tokens"])
      self._counters["documents"].inc(counts["documents"])
    yield meta


def _element(job: shards.Job) -> dict:
  # Plain data, so Beam encodes elements with its own coder rather than a pickler, and the
  # runner's UI shows them readably.
  return dataclasses.asdict(job)


def _job(element: dict) -> shards.Job:
  fields = dict(element)
  return shards.Job(shard=sources.InputShard(**fields.pop("shard")), **fields)


def run(jobs: Sequence[shards.Job], tokenizer: tok.AnyTokenizer,
        pipeline_args: Sequence[str] = ()) -> list[dict]:
  """Runs `jobs` as one Beam pipeline under `pipeline_args` (Beam's own flags); returns their
  shard.json contents in job order, read back from the shared cache."""
  options = pipeline_options.PipelineOptions(list(pipeline_args))
  runner = str(options.view_as(pipeline_options.StandardOptions).runner or "DirectRunner")
  if not jobs:
    return []
  if "DataflowRunner" in runner and not files.is_url(jobs[0].cache_dir):
    raise errors.UserError(f"data.cache_dir {jobs[0].cache_dir} is on this machine, where "
                           "Dataflow's workers cannot write their shards; set "
                           "--config.data.cache_dir to a gs:// path")
  try:
    tokenizer_bytes = pickle.dumps(tokenizer)
  except Exception as e:  # pickling raises whatever the object's parts raise
    raise errors.UserError(f"tokenizer {tokenizer.path} cannot be sent to Beam workers "
                           f"({type(e).__name__}: {e}); use the local runner") from e
  logging.info("Preparing %d shards on Beam's %s", len(jobs), runner)
  pipeline = beam.Pipeline(options=options)
  _ = (pipeline
       | "Jobs" >> beam.Create([_element(job) for job in jobs])
       | "Spread" >> beam.Reshuffle()  # else a runner may keep them all in Create's one bundle
       | "PrepareShard" >> beam.ParDo(_PrepareShard(tokenizer_bytes)))
  try:
    result = pipeline.run()
    state = result.wait_until_finish()
  except Exception as e:  # runners raise their own types, wrapping the worker's error
    raise _worker_error(e) or RuntimeError(
        f"the Beam pipeline failed on {runner}: {_last_line(e)}") from e
  if state != runner_api.PipelineState.DONE:
    raise RuntimeError(f"the Beam pipeline ended {state} on {runner}; its log says why")
  _log_counters(result)
  metas = []
  for job in jobs:
    meta = shards.read_shard(job.directory)
    if meta is None:
      raise sources.DataError(
          f"shard {job.shard.describe()} is missing from {job.directory} after the Beam run on "
          f"{runner}; its workers write shards there themselves, so data.cache_dir must be "
          "storage they share with this machine (gs:// for Dataflow)")
    metas.append(meta)
  return metas


def _worker_error(e: BaseException) -> errors.UserError | None:
  """The lmssl UserError a worker raised, out of Beam's wrapping, as one line: the exception
  itself where the runner ran the DoFn in this process, else read off the end of the worker's
  traceback, which a remote runner's message quotes."""
  chain = []
  while e is not None and all(e is not seen for seen in chain):
    chain.append(e)
    if isinstance(e, errors.UserError):
      return _user_error(type(e), str(e))
    e = e.__cause__ or e.__context__
  for line in reversed(str(chain[0]).splitlines()):
    match = _RAISED.match(line.strip())
    if not match:
      continue
    try:
      kind = getattr(importlib.import_module(match[1]), match[2])
    except (ImportError, AttributeError):
      continue
    if isinstance(kind, type) and issubclass(kind, errors.UserError):
      return _user_error(kind, match[3])
  return None


def _user_error(kind: type, message: str) -> errors.UserError:
  # Subclasses may take other arguments (prepare._Corrupt); their message is what counts.
  as_kind = sources.DataError if issubclass(kind, sources.DataError) else errors.UserError
  return as_kind(_STEP.sub("", message.strip()))


def _last_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return lines[-1] if lines else type(e).__name__


def _log_counters(result) -> None:
  try:
    found = result.metrics().query(metric.MetricsFilter().with_namespace(NAMESPACE))
  except NotImplementedError:  # a runner need not report metrics back
    return
  totals = {c.key.metric.name: c.committed if c.committed is not None else c.attempted
            for c in found["counters"]}
  logging.info("Beam counted %s", ", ".join(f"{n} {totals.get(n, 0)}" for n in COUNTERS))
