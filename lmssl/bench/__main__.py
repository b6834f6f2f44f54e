"""Throughput of lmssl's train step, side by side with the HuggingFace PyTorch peer.

  python -m lmssl.bench --task mlm|clm [--arch llama] [--peer hf] [--json] [--pipeline]
      [--compile_layers 2,24] [--remat_budget_gib 4]
  python -m lmssl.bench --data 0.1,1,3 [--data_dir DIR] [--json] [--out FILE]
  python -m lmssl.bench --parity hf --arch bert|gpt2|llama|modernbert [--steps 50] [--json]

The step is timed whole (forward, backward, clipped AdamW update) on batches already on the
device, after warm-up; with `--peer hf`, BertForMaskedLM (15% of positions labelled),
GPT2LMHeadModel or, with `--arch llama`, LlamaForCausalLM of the same shape, dtype and optimizer
runs in a child process, and the two take turns, round by round, so the machine's drift touches
both alike. The defaults are the reference CPU shapes: 4 layers, d_model 256, 4 heads, MLP 1024,
vocabulary 32000; MLM 32 x 128, CLM 16 x 256; float32. `--arch llama` takes its shape from
configs/llama_base.py at `--size` (mini: the same 4 x 256 with 4 heads on 2 key/value heads,
SwiGLU 768, RMSNorm, RoPE, no biases, untied output embedding).

Also, on request: the input pipeline alone (`--pipeline`: real tf.data batches from prepared,
tokenized data, put on the device), compile time against depth (`--compile_layers`), and the
largest batch whose step fits a memory budget under each remat policy (`--remat_budget_gib`,
from XLA's compiled memory figures, so nothing is allocated).

MFU is analytic model FLOPs per second over the peak (`lmssl/bench/step.py` says which); on
CPUs the peak is a large float32 matmul's measured rate, printed too. The pieces live beside
this file: step.py (the timed step and the peer), parts.py (pipeline, compile, remat), suite.py
(`--suite accelerator`), hf_peer.py (the peer's PyTorch side, in its own process).

`--data` measures the data path instead, per corpus size in gigabytes: preparing (one process,
all cores, Beam), bytes per token on disk, a short training run's start and memory, and the
pipeline against the step (data.py, on corpora that corpus.py makes from WikiText-2).

`--parity hf` trains a tiny model in lmssl and, from the same exported weights and on the same
batches, in HuggingFace PyTorch, and compares the loss at every step and the final parameters
(parity.py; hf_train.py is the PyTorch side).
"""

import argparse
import functools
import json
import os
import sys

from lmssl import attention
from lmssl import config as config_lib
from lmssl import errors
from lmssl import model as model_lib
from lmssl.bench import parts
from lmssl.bench import step
from lmssl.configs import llama_base

COLUMNS = {
    "peak": [("peak_source", "{}"), ("peak_flops_per_s", "{:.3g}"),
             ("matmul_flops_per_s", "{:.3g}")],
    "train_step": [("model", "{}"), ("arch", "{}"), ("impl", "{}"), ("params", "{:,}"),
                   ("attention", "{}"),
                   ("fused_attention", "{}"), ("device", "{}"), ("batch", "{}"), ("seq", "{}"),
                   ("tokens_per_s", "{:,.0f}"), ("step_time_s", "{:.3f}"),
                   ("flops_per_s", "{:.3g}"), ("mfu", "{:.1%}"), ("compile_s", "{:.1f}"),
                   ("peak_memory_bytes", "MiB")],
    "ratio": [("model", "{}"), ("arch", "{}"), ("impl", "{}"), ("task", "{}"), ("seq", "{}"),
              ("tokens_per_s_ratio", "{:.2f}x")],
    "attention": [("impl", "{}"), ("causal", "{}"), ("batch", "{}"), ("seq", "{}"),
                  ("heads", "{}"), ("dtype", "{}"), ("segments", "{}"),
                  ("max_segments", "{}"), ("fused", "{}"),
                  ("fwd_bwd_s", "{:.5f}"), ("max_abs_diff_out", "{:.2e}"),
                  ("max_abs_diff_grad", "{:.2e}")],
    "pipeline": [("task", "{}"), ("batch", "{}"), ("seq", "{}"), ("batches", "{}"),
                 ("tokens_per_s", "{:,.0f}"), ("step_ratio", "{:.1f}x")],
    "compile": [("layers", "{}"), ("remat", "{}"), ("compile_s", "{:.1f}"),
                ("vs_first", "{:.2f}x")],
    "data": [("corpus_gb", "{:g}"), ("what", "{}"), ("runner", "{}"), ("tokens", "{:,}"),
             ("seconds", "{:,.1f}"), ("tokens_per_s", "{:,.0f}"), ("peak_rss_bytes", "MiB"),
             ("tree_rss_bytes", "MiB"), ("anon_bytes", "MiB"), ("cores", "{:.1f}"),
             ("bytes_per_token", "{:.3f}"),
             ("data_ready_s", "{:.1f}"), ("first_step_s", "{:.1f}"), ("step_ratio", "{:.1f}x"),
             ("note", "{}")],
    "data_target": [("target", "{}"), ("result", "{}"), ("figures", "{}")],
    "max_batch": [("model", "{}"), ("remat", "{}"), ("layers", "{}"), ("seq", "{}"),
                  ("budget_bytes", "MiB"), ("batch", "{}"), ("memory_bytes", "MiB"),
                  ("vs_first", "{:.2f}x")],
}


def _cell(value, fmt: str) -> str:
  if value is None:
    return "-"
  if fmt == "MiB":
    return f"{value / 2 ** 20:,.0f} MiB"
  return fmt.format(value)


def table(rows: list[dict]) -> str:
  """The rows of one measurement kind as an aligned text table."""
  columns = COLUMNS[rows[0]["measurement"]]
  cells = [[name for name, _ in columns]] + [[_cell(r.get(n), f) for n, f in columns]
                                             for r in rows]
  widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m lmssl.bench", description=__doc__.split("\n")[0])
  p.add_argument("--task", choices=config_lib.OBJECTIVES, help="required unless --suite")
  p.add_argument("--suite", default="", choices=("", "accelerator"),
                 help="the accelerator suite (lmssl/bench/suite.py): attention kernels, "
                 "BERT-base and GPT-2 small/medium steps beside the peer, remat batches")
  p.add_argument("--scale", default="full", choices=("full", "tiny"),
                 help="--suite shapes: full (the real models) or tiny (a CPU check)")
  p.add_argument("--out", default="", help="the JSON file of --suite (default "
                 "bench_accelerator.json) or --data (default: none)")
  p.add_argument("--peer", default="", choices=("", "hf"), help="also time this peer")
  p.add_argument("--parity", default="", choices=("", "hf"),
                 help="train step by step beside this peer and compare losses and parameters")
  p.add_argument("--json", action="store_true", help="one JSON object per line per measurement")
  p.add_argument("--arch", default="",
                 help="the architecture. With --task: bert, gpt2 or llama (default: the task's "
                 "classic one, bert for mlm, gpt2 for clm; llama: configs/llama_base.py's "
                 "decoder, with --task clm). With --parity: bert, gpt2, llama or modernbert")
  p.add_argument("--size", default="mini", choices=list(dict.fromkeys(
                     [*config_lib.SIZES, *llama_base.SIZES])),
                 help="model shape, a row of the architecture's size table (mini: 4 layers, "
                 "d_model 256, 4 heads, MLP 1024)")
  p.add_argument("--layers", type=int, default=0, help="layers (0: the size's)")
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--batch", type=int, default=0, help="0: MLM 32, CLM 16")
  p.add_argument("--seq", type=int, default=0, help="0: MLM 128, CLM 256")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--remat", default="none", choices=list(model_lib.REMAT_POLICIES))
  p.add_argument("--dropout", type=float, default=0.0)
  p.add_argument("--attention", default="auto", choices=list(attention.IMPLEMENTATIONS))
  p.add_argument("--loss_chunks", type=int, default=0, help="train.loss_chunks (CLM)")
  p.add_argument("--steps", type=int, default=0,
                 help="timed steps per round (0: 5); with --parity, steps trained (0: 50)")
  p.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
  p.add_argument("--no_step", action="store_true", help="skip the train-step timing")
  p.add_argument("--pipeline", action="store_true", help="also time the input pipeline alone")
  p.add_argument("--data_source", default="builtin", help="--pipeline's corpus (data.source)")
  p.add_argument("--tokenizer", default="", help="--pipeline's tokenizer (default: trained)")
  p.add_argument("--workdir", default="", help="--pipeline's and --parity's tokenizer and "
                 "prepared data (default ~/.cache/lmssl/bench, ~/.cache/lmssl/parity)")
  p.add_argument("--compile_layers", default="", help="e.g. 2,24: compile time per depth")
  p.add_argument("--remat_budget_gib", type=float, default=0.0,
                 help="largest batch within this memory under each --remat_policies")
  p.add_argument("--remat_policies", default="none,full")
  p.add_argument("--data", default="", help="corpus sizes in GB, e.g. 0.1,1,3: measure the "
                 "data path (prepare, disk, training start, pipeline) instead of the step")
  p.add_argument("--data_dir", default="~/.cache/lmssl/bench-data",
                 help="--data's corpora (kept, reused), caches and logs")
  p.add_argument("--data_format", default="text", choices=("text", "jsonl", "jsonl.gz"))
  p.add_argument("--data_files", type=int, default=1, help="files per --data corpus")
  p.add_argument("--data_config", default="size=tiny",
                 help="configs/mlm_base.py's variant, for prepare and the training run")
  p.add_argument("--data_workers", type=int, default=0,
                 help="processes of the all-cores prepare (0: one per core)")
  p.add_argument("--data_runners", default="one,threads,all,beam",
                 help="of: one (a process on one core), threads (a process whose tokenizer "
                 "uses every core), all (a process per core), beam (DirectRunner)")
  p.add_argument("--data_steps", type=int, default=20,
                 help="steps of the training run (0: no training run or pipeline)")
  args = p.parse_args(argv)
  if args.parity and not args.arch:
    p.error("--parity needs --arch, e.g. --arch bert")
  if not args.parity and args.arch not in ("", *step.ARCHS):  # --parity's are parity.py's
    p.error(f"--arch {args.arch!r} is not known with --task; known: {', '.join(step.ARCHS)}")
  if not args.task and not args.suite and not args.data and not args.parity:
    p.error("--task is required (or --suite accelerator, --data SIZES, or --parity hf)")
  args.steps = args.steps or (50 if args.parity else 5)
  if args.suite and not args.out:
    args.out = "bench_accelerator.json"
  if args.data:
    _check_data_args(p, args)
  for name in ("steps", "rounds", "batch", "seq", "layers", "vocab", "warmup"):
    if getattr(args, name) < (1 if name in ("steps", "rounds") else 0):
      p.error(f"--{name}={getattr(args, name)} must be positive")
  return args


def _check_data_args(p, args) -> None:
  try:
    args.data_sizes = tuple(float(s) for s in args.data.split(","))
  except ValueError:
    p.error(f"--data={args.data!r} is not a list of sizes in GB; write e.g. 0.1,1,3")
  if min(args.data_sizes) <= 0:
    p.error(f"--data={args.data!r}: every size must be positive")
  unknown = sorted(set(args.data_runners.split(",")) - {"one", "threads", "all", "beam"})
  if unknown:
    p.error(f"--data_runners: unknown {unknown}; known: one, threads, all, beam")
  if args.data_files < 1:
    p.error(f"--data_files={args.data_files} must be at least 1")
  if args.data_steps == 1 or args.data_steps < 0:
    p.error(f"--data_steps={args.data_steps}: give 0 (no training run) or at least 2 (the "
            "step rate is read after the first)")


def run(args) -> list[dict]:
  """Every measurement asked for, as rows; printed as they come."""
  if args.suite:
    from lmssl.bench import suite  # only --suite needs it
    return suite.run(args, functools.partial(_report, args, []))
  if args.parity:
    from lmssl.bench import parity  # TensorFlow (the data pipeline) and the hf extra
    result = parity.run(parity.Settings(arch=args.arch, steps=args.steps,
                                        workdir=args.workdir or parity.Settings.workdir))
    print(json.dumps(result) if args.json else parity.text(result), flush=True)
    return [result]
  if args.data:
    from lmssl.bench import data  # only --data needs it
    settings = data.Settings(
        sizes=args.data_sizes, data_dir=os.path.expanduser(args.data_dir),
        fmt=args.data_format, files=args.data_files, variant=args.data_config,
        workers=args.data_workers, runners=tuple(args.data_runners.split(",")),
        train_steps=args.data_steps)
    return data.run(settings, functools.partial(_report, args, []), args.out)
  rows = []
  report = functools.partial(_report, args, rows)
  cfg = step.bench_config(args.task, arch=args.arch, size=args.size, layers=args.layers,
                          vocab=args.vocab, batch=args.batch, seq=args.seq, dtype=args.dtype,
                          remat=args.remat, dropout=args.dropout, attention=args.attention,
                          loss_chunks=args.loss_chunks)
  matmul = step.matmul_rate()
  peak, source = step.device_peak(matmul)
  report([dict(measurement="peak", impl="jax", matmul_flops_per_s=matmul,
               peak_flops_per_s=peak, peak_source=source)])
  step_tokens = None
  if not args.no_step:
    report(step.step_rows(cfg, args, peak, source))
    step_tokens = next(r["tokens_per_s"] for r in rows
                       if r["measurement"] == "train_step" and r["impl"] == "lmssl")
  if args.pipeline:
    report([parts.pipeline_row(cfg, args, step_tokens)])
  if args.compile_layers:
    report(parts.compile_rows(cfg,
                              [int(n) for n in args.compile_layers.split(",")]))
  if args.remat_budget_gib:
    report(parts.remat_rows(cfg, args.remat_budget_gib,
                            args.remat_policies.split(",")))
  return rows


def _report(args, rows: list, new: list[dict]) -> None:
  """Prints rows as they come, as tables or JSON lines, and keeps them in `rows`."""
  rows.extend(new)
  if args.json:
    print("\n".join(json.dumps(r) for r in new), flush=True)
    return
  for kind in dict.fromkeys(r["measurement"] for r in new):
    print(table([r for r in new if r["measurement"] == kind]) + "\n", flush=True)


def main(argv=None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    run(args)
  except errors.UserError as e:
    sys.exit(f"lmssl.bench: error: {e}")


if __name__ == "__main__":
  main()
