"""The data path at corpus scale: `python -m lmssl.bench --data 0.1,1,3`.

Per corpus size (gigabytes of WikiText-2 paragraphs, lmssl/bench/corpus.py, made once and
reused): the tokenizer is trained once, timed as its own row; then one process, all cores and
Beam's DirectRunner each prepare the corpus with that tokenizer into a fresh cache, so that
their rates compare the preparing alone; then a short training run of the config's model
starts on the all-cores cache (the seconds from process start to the console's `model:` line,
once the data is ready, and to its `step 1/` line); then the input pipeline alone is timed
against that run's step rate (parts.pipeline_row). Each measurement runs in a process of its
own, so its peak RSS is its own: the kernel's exact peak of the largest of its processes (wait4),
and, sampled every 0.2 s, the peak of the RSS summed over its processes (a prepare's workers
included) and of their anonymous memory, the RSS less the pages of memory-mapped shards.

Bytes per token count every file of a cache's shards/ and prepared/ over the manifest's tokens
(both splits). The targets (issue 15) are checked at the end, each printed with its figures.
Logs of every child are in DATA_DIR/SIZEgb-FORMAT/logs/.
"""

import dataclasses
import datetime
import functools
import importlib
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import statistics
import sys
import time
import types

from lmssl.bench import corpus as corpus_lib
from lmssl.bench import process

# "one": one process on one core (the tokenizer's threads held to one), the base that more
# cores are measured against; "threads": one process whose tokenizer encodes on every core.
RUNNERS = {"one": "one core", "threads": "one process", "all": "all cores",
           "beam": "beam direct"}
GB = 10 ** 9
# (limit, what) of issue 15's targets on the 2-core machine.
PREPARE_RSS, TRAIN_RSS, BYTES_PER_TOKEN, SPEEDUP, FIRST_STEP = 1.5 * GB, 2.5 * GB, 2.2, 1.6, 1.5
FLAT = 1.2  # "flat": the largest corpus's peak within this factor of the smallest's
_PACKAGE = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Settings:
  """What one data benchmark measures, and where it keeps its corpora and caches."""
  sizes: tuple[float, ...]
  data_dir: str
  fmt: str = "text"
  files: int = 1
  variant: str = "size=tiny"  # of configs/mlm_base.py, for prepare and the training run alike
  workers: int = 0  # the all-cores row's processes (0: one per core)
  runners: tuple[str, ...] = ("one", "threads", "all", "beam")
  train_steps: int = 20  # 0: no training run, and no pipeline measurement beside it
  seed: int = 0


def run(settings: Settings, report, out: str = "") -> list[dict]:
  """Every size's rows, then the targets; `report(rows)` prints them, `out` (if set) is a JSON
  file rewritten after each measurement, so a run cut short keeps what it measured."""
  document = dict(benchmark="data", meta=meta(), settings=dataclasses.asdict(settings),
                  rows=[])

  def keep(row):
    document["rows"].append(row)
    print(f"lmssl.bench --data: {row['corpus_gb']} GB {row['what']} {row['runner']}: "
          f"{_summary(row)}", file=sys.stderr, flush=True)
    if out:
      _write(out, document)

  for size in settings.sizes:
    measure_size(settings, size, keep)
  rows = list(document["rows"])
  document["targets"] = targets(rows)
  if out:
    _write(out, document)
  report(rows)
  report(document["targets"])
  if out:
    print(f"lmssl.bench: wrote {out}", flush=True)
  return rows + document["targets"]


def measure_size(settings: Settings, size: float, keep) -> None:
  """The rows of one corpus size, each passed to `keep` as it is measured."""
  root = pathlib.Path(settings.data_dir) / f"{size:g}gb-{settings.fmt}"
  (root / "logs").mkdir(parents=True, exist_ok=True)
  row = functools.partial(dict, measurement="data", corpus_gb=size)

  start = time.perf_counter()
  made = corpus_lib.generate(root / "corpus", size, settings.fmt, settings.files, settings.seed)
  keep(row(what="corpus", runner=settings.fmt,
           seconds=None if made["reused"] else time.perf_counter() - start,
           note=f"{made['bytes']:,} bytes, {made['documents']:,} documents, "
                f"{len(made['files'])} files{' (reused)' if made['reused'] else ''}"))
  common = {"data.source": made["source"],
            "data.tokenizer": str(root / "tokenizer" / "tokenizer.model")}

  child = _child("tokenizer", settings, root, workdir=str(_fresh(root / "tokenizer")),
                 overrides={"data.source": made["source"]})
  keep(row(what="tokenizer", runner="one process", seconds=child["seconds"], **_memory(child),
           note=f"vocab {child['vocab']:,}, sample {child['sample_chars']:,} chars"))

  prepared = {}
  for name in settings.runners:
    if name == "beam" and not all(importlib.util.find_spec(m) for m in
                                  ("apache_beam", "lmssl.data.beam_prepare")):
      keep(row(what="prepare", runner=RUNNERS[name], note="not installed (pip install "
               "'lmssl[beam]'; needs lmssl.data.beam_prepare)"))
      continue
    measured, prepared[name] = prepare_row(settings, root, name, common)
    keep(row(**measured))

  if not settings.train_steps or not prepared:
    return
  # The all-cores cache, the one a user would train on (the caches hold the same bytes).
  prepared_dir = prepared.get("all") or next(iter(prepared.values()))
  common["data.cache_dir"] = str(pathlib.Path(prepared_dir).parents[1])
  trained = train_row(settings, root, common, prepared_dir)
  keep(row(what="train", **trained))
  keep(row(what="pipeline", **pipeline_row(settings, root, common, trained["tokens_per_s"])))


def prepare_row(settings: Settings, root: pathlib.Path, name: str, common: dict):
  """(row, prepared directory) of one prepare runner, into a fresh cache of its own."""
  cache = _fresh(root / f"cache-{name}")
  child = _child("prepare", settings, root, log=f"prepare-{name}", runner=name,
                 workdir=str(root / "tokenizer"),
                 overrides={**common, "data.cache_dir": str(cache)})
  disk = _tree_bytes(cache / "shards") + _tree_bytes(cache / "prepared")
  tokens, seconds = child["tokens"], child["seconds"]
  return dict(
      what="prepare", runner=RUNNERS[name], tokens=tokens, seconds=seconds,
      tokens_per_s=tokens / seconds,
      **_memory(child),
      # Cores kept busy, on average, over the whole process (imports included): what one
      # process already gets from the tokenizer's threads, and what more processes add.
      cores=child["cpu_s"] / child["process_s"],
      disk_bytes=disk, bytes_per_token=disk / tokens, shards=child["shards"],
      workers=child["workers"], note=f"{child['shards']} shards, {child['workers']} workers",
  ), child["prepared_dir"]


def pipeline_row(settings: Settings, root: pathlib.Path, common: dict,
                 step_tokens_per_s: float) -> dict:
  """parts.pipeline_row on the prepared cache, in a process of its own, against the step."""
  prepared = pathlib.Path(common["data.cache_dir"]) / "prepared"
  before = sorted(os.listdir(prepared))
  child = _child("pipeline", settings, root, workdir=common["data.cache_dir"],
                 overrides=common)
  if sorted(os.listdir(prepared)) != before:
    raise RuntimeError(f"the pipeline measurement prepared its data again in {prepared}: its "
                       f"config differs from prepare's; see {root / 'logs' / 'pipeline.log'}")
  pipe = child["row"]
  return dict(runner=f"batch {pipe['batch']} x {pipe['seq']}",
              tokens=pipe["batches"] * pipe["batch"] * pipe["seq"],
              tokens_per_s=pipe["tokens_per_s"], **_memory(child),
              step_ratio=pipe["tokens_per_s"] / step_tokens_per_s,
              note=f"{pipe['batches']} batches; the step takes {step_tokens_per_s:,.0f}/s")


def train_row(settings: Settings, root: pathlib.Path, common: dict, prepared_dir: str) -> dict:
  """A short training run on prepared data: time to its first step, its peak RSS and its
  steps' rate once compiled (the median over the second half of the steps)."""
  log = root / "logs" / "train.log"
  steps = settings.train_steps
  workdir = _fresh(root / "train")
  overrides = {**common, "train.steps": steps, "train.log_every": 1, "train.warmup_steps": 1,
               "eval.every_steps": steps, "eval.steps": 2, "checkpoint.every_steps": steps}
  config = f"{_PACKAGE / 'configs' / 'mlm_base.py'}:{settings.variant}"
  done = process.spawn([sys.executable, "-m", "lmssl.main", "--config", config, "--workdir",
                        str(workdir), *[f"--config.{k}={v}" for k, v in overrides.items()]],
                       log, _env())
  first = next((t for t, line in done.lines if line.startswith("step 1/")), None)
  # Printed once the data is loaded and the state's shapes are known, before compiling: the
  # part of the start that could grow with the corpus.
  ready = next((t for t, line in done.lines if line.startswith("model: ")), None)
  data_line = next((line for _, line in done.lines if line.endswith(f"data {prepared_dir}")),
                   None)
  if first is None or data_line is None:
    raise RuntimeError(f"the training run did not log its first step or did not read "
                       f"{prepared_dir}; see {log}")
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  rates = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
  return dict(runner=f"mlm {settings.variant}, {steps} steps", seconds=done.seconds,
              first_step_s=first, data_ready_s=ready,
              **_memory(dataclasses.asdict(done)),
              tokens_per_s=statistics.median(rates[len(rates) // 2:]),
              note="tokens_per_s: the train step's")


def targets(rows: list[dict]) -> list[dict]:
  """Issue 15's targets, each met or not with the figures it was judged on."""
  def worst(what, key, runner=None) -> dict:  # {size: the largest `key` of those rows}
    out = {}
    for r in rows:
      if r["what"] == what and r.get(key) is not None and runner in (None, r["runner"]):
        out[r["corpus_gb"]] = max(out.get(r["corpus_gb"], r[key]), r[key])
    return out

  def ends(values: dict) -> dict:  # the smallest and the largest corpus, when there are two
    return {s: values[s] for s in (min(values), max(values))} if len(values) > 1 else {}

  out = []

  def check(target, values: dict, ok, fmt):
    figures = ", ".join(f"{s:g} GB: {fmt(s, v)}" for s, v in values.items())
    out.append(dict(measurement="data_target", target=target, figures=figures or "-",
                    result=("met" if ok(values) else "not met") if values else "n/a"))

  # RSS summed over a measurement's processes; anonymous memory (RSS less the pages of mapped
  # shards, which the kernel reclaims at will) is given beside it, not judged.
  for name, what, limit in (("prepare", "prepare", PREPARE_RSS), ("training", "train", TRAIN_RSS)):
    anon = worst(what, "anon_bytes")
    mb = lambda s, v, anon=anon: f"{v / 1e6:,.0f} MB" + (
        f" (anonymous {anon[s] / 1e6:,.0f} MB)" if s in anon else "")
    values = worst(what, "tree_rss_bytes")
    check(f"{name} peak RSS <= {limit / GB:g} GB", values,
          lambda v, limit=limit: max(v.values()) <= limit, mb)
    check(f"{name} peak RSS flat (largest corpus <= {FLAT}x smallest)", ends(values),
          lambda v: v[max(v)] <= FLAT * v[min(v)], mb)
  check(f"bytes per token on disk <= {BYTES_PER_TOKEN}", worst("prepare", "bytes_per_token"),
        lambda v: max(v.values()) <= BYTES_PER_TOKEN, lambda s, v: f"{v:.3f}")
  one = worst("prepare", "tokens_per_s", RUNNERS["one"])
  every = worst("prepare", "tokens_per_s", RUNNERS["all"])
  check(f"all-cores prepare >= {SPEEDUP}x one process on one core",
        {s: every[s] / one[s] for s in sorted(one.keys() & every.keys())},
        lambda v: min(v.values()) >= SPEEDUP, lambda s, v: f"{v:.2f}x")
  check(f"time to first step, largest corpus <= {FIRST_STEP}x smallest",
        ends(worst("train", "first_step_s")),
        lambda v: v[max(v)] <= FIRST_STEP * v[min(v)], lambda s, v: f"{v:.1f} s")
  return out


def meta() -> dict:
  model = next((line.split(":", 1)[1].strip() for line in process.read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor())
  memory = next((int(line.split()[1]) * 1024 for line in process.read("/proc/meminfo").splitlines()
                 if line.startswith("MemTotal:")), None)
  return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              cpu=model, cpu_count=os.cpu_count(), memory_bytes=memory,
              python=platform.python_version(), command=" ".join(sys.argv))


def _summary(row: dict) -> str:
  keys = ("tokens_per_s", "seconds", "first_step_s", "tree_rss_bytes", "anon_bytes",
          "bytes_per_token", "note")
  return ", ".join(f"{k} {row[k]:,.3g}" if isinstance(row[k], float) else f"{k} {row[k]}"
                   for k in keys if row.get(k) is not None)


def _write(path: str, document: dict) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(document, f, indent=1)
  os.replace(tmp, path)


def _fresh(path: pathlib.Path) -> pathlib.Path:
  shutil.rmtree(path, ignore_errors=True)
  path.mkdir(parents=True)
  return path


def _tree_bytes(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# Child processes: each measurement in its own (process.py measures it).

def _env() -> dict:
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  # Every size's training run compiles afresh, so their times to the first step compare.
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE.parent),
                                                    env.get("PYTHONPATH")]))
  return env


def _child(kind: str, settings: Settings, root: pathlib.Path, log: str = "", **spec) -> dict:
  """Runs `_measure_{kind}` in a new process, logged to root/logs/LOG.log (LOG: `kind`); its
  result, with the process's peak RSS."""
  log = root / "logs" / f"{log or kind}.log"
  out = log.with_suffix(".json")
  out.unlink(missing_ok=True)
  spec = dict(spec, kind=kind, out=str(out), variant=settings.variant,
              workers=settings.workers)
  done = process.spawn([sys.executable, "-m", "lmssl.bench.data", json.dumps(spec)], log,
                       _env())
  return dict(json.loads(out.read_text()), process_s=done.seconds,
              **{k: getattr(done, k) for k in ("peak_rss_bytes", "tree_rss_bytes",
                                               "anon_bytes", "cpu_s")})


def _memory(child: dict) -> dict:
  """A measurement's memory fields: the largest process's peak RSS (exact, from the kernel),
  the peak of the RSS summed over all its processes (sampled, so at least the first), and the
  same for anonymous memory."""
  return dict(peak_rss_bytes=child["peak_rss_bytes"],
              tree_rss_bytes=max(child["tree_rss_bytes"], child["peak_rss_bytes"]),
              anon_bytes=child["anon_bytes"])


def _config(spec: dict):
  from lmssl import config as config_lib
  cfg = importlib.import_module("lmssl.configs.mlm_base").get_config(spec["variant"])
  return config_lib.resolved(cfg, spec["overrides"])


def _measure_tokenizer(spec: dict) -> dict:
  from lmssl.data import prepare
  cfg = _config(spec)
  start = time.perf_counter()
  tokenizer = prepare.tokenizer_for(cfg.data, None, spec["workdir"])
  return dict(seconds=time.perf_counter() - start, vocab=tokenizer.vocab_size,
              sample_chars=cfg.data.tokenizer_sample_chars)


def _measure_prepare(spec: dict) -> dict:
  from lmssl.data import prepare
  from lmssl.data import tokenizer as tok
  cfg = _config(spec)
  runner, workers, given = None, 1, None
  if spec["runner"] == "one":
    given = tok.Tokenizer.load(os.path.join(spec["workdir"], "tokenizer.model"))
    given.threads = 1
  if spec["runner"] == "beam":
    from lmssl.data import beam_prepare  # pylint: disable=g-import-not-at-top
    runner = functools.partial(beam_prepare.run, pipeline_args=["--runner=DirectRunner"])
  elif spec["runner"] == "all":
    workers = spec["workers"] or os.cpu_count() or 1
  start = time.perf_counter()
  _, prepared_dir = prepare.prepare(cfg.data, given, spec["workdir"], workers=workers,
                                    runner=runner)
  seconds = time.perf_counter() - start
  manifest = prepare.read_meta(prepared_dir)
  return dict(seconds=seconds, prepared_dir=prepared_dir, shards=len(manifest["shards"]),
              tokens=sum(s["num_tokens"] for s in manifest["splits"].values()),
              # run_local's processes: as many as there are workers and shards, or none
              workers=0 if runner or workers == 1 else min(workers, len(manifest["shards"])))


def _measure_pipeline(spec: dict) -> dict:
  from lmssl.bench import parts
  cfg = _config(spec)
  args = types.SimpleNamespace(data_source=cfg.data.source, tokenizer=cfg.data.tokenizer,
                               workdir=spec["workdir"], warmup=2, steps=5, rounds=3)
  return dict(row=parts.pipeline_row(cfg, args, None))


def _child_main(spec_json: str) -> None:
  spec = json.loads(spec_json)
  spec.setdefault("overrides", {})
  result = globals()[f"_measure_{spec['kind']}"](spec)
  with open(spec["out"], "w", encoding="utf-8") as f:
    json.dump(result, f)


if __name__ == "__main__":
  _child_main(sys.argv[1])
