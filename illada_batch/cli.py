"""``illada-batch``: generate, eval, bench, validate, run, submit, status, demo, render."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

DEMO_SPEC = Path(__file__).resolve().parent.parent / "jobs" / "demo.yaml"


def _params(args):
    """The ``SamplingParams`` of the ``--steps`` ... flags that ``_sampling_args`` added."""
    from illada_batch.decoding.params import SamplingParams, settings

    return SamplingParams(**{f.name: getattr(args, f.name) for f in settings()})


def _sampling_args(p: argparse.ArgumentParser) -> None:
    """One flag per ``SamplingParams`` setting, with its default and help text from there."""
    import enum
    import typing

    from illada_batch.decoding.params import SamplingParams, settings

    hints = typing.get_type_hints(SamplingParams)
    for f in settings():
        flag, help_text = f"--{f.name.replace('_', '-')}", f.metadata["help"]
        default = f.default.value if isinstance(f.default, enum.Enum) else f.default
        kinds = [t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if isinstance(t, type)]
        choices = [m.value for t in kinds if issubclass(t, enum.Enum) for m in t]
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif choices:
            p.add_argument(flag, default=default, choices=choices, help=help_text)
        else:
            kind = {"int": int, "float": float, "float | None": float}[f.type]
            p.add_argument(flag, type=kind, default=default, help=f"{help_text} (default: {default})")


def _cache_modes(auto: bool = False) -> list[str]:
    """The ``--cache`` choices: the concrete modes (``bench`` tables them), and ``auto`` first
    where one run picks a mode for its model."""
    from illada_batch.decoding.params import CacheMode

    return (["auto"] if auto else []) + [m.value for m in CacheMode.concrete()]


def _device(name: str | None):
    """``--device`` checked: a device torch knows, present on this machine (None: the default)."""
    import torch

    from illada_batch.errors import UserError

    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"--device {name}: not a device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA device (use --device cpu, or leave it out)")
    return device


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """Argument errors on one line (exit 2), like every other refusal of the CLI."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def cmd_generate(args) -> int:
    """One row through the engine, as a job runs it: ``--cache auto`` (the default) is the
    model's own cache (the exact block-causal cache for LLaDA 2.x; the same tokens as the
    cache off at temperature 0). The seed is a job row's: from (``--seed``, row id "0", sample 0)."""
    from illada_batch.engine.diffusion import Engine
    from illada_batch.errors import UserError
    from illada_batch.model.checkpoint import load_model

    if not args.prompt.strip():
        raise UserError("--prompt is empty: give the text to generate from")
    model = load_model(args.model, device=_device(args.device))
    tok = model.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    engine = Engine(model, cache=args.cache, max_batch_size=1)
    t0 = time.perf_counter()
    res = engine.generate([text], _params(args), seed=args.seed, response_template=args.response_template)[0]
    seconds = time.perf_counter() - t0
    if res.error is not None:
        raise UserError(f"--prompt: {res.error}")
    print(res.text)
    slots = "" if res.slots is None else f"slots: {json.dumps(res.slots)}; "
    print(f"[{slots}cache {engine.cache_text}; {res.steps} steps, {len(res.token_ids)} tokens in {seconds:.2f}s: "
          f"{res.steps / seconds:.1f} steps/s, {len(res.token_ids) / seconds:.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from illada_batch.decoding.template import ResponseTemplate
    from illada_batch.engine.diffusion import Engine
    from illada_batch.tasks.evaluate import evaluate, suite_rows

    engine = Engine.from_pretrained(args.model, cache=args.cache, device=_device(args.device),
                                    max_batch_size=args.batch_size)
    prefixes, rows = suite_rows(engine.tokenizer, args.seed, args.rows_per_task, args.prefixes_per_task,
                                args.min_prefix_tokens)
    res = evaluate(engine, prefixes, rows, _params(args), args.response_template)
    what = "exact match" if args.response_template is None else f"slot accuracy (slot 1 of {args.response_template!r})"
    print(f"{what} on {len(rows)} rows (prefixes of {args.min_prefix_tokens}+ tokens, cache={engine.cache_text}, "
          f"steps={args.steps}, gen_length={args.gen_length}) in {res['seconds']:.1f}s")
    if args.response_template is not None:  # the engine checks each response's fixed tokens as it reads it
        fixed = ResponseTemplate.parse(args.response_template).tokenize(engine.tokenizer.encode).texts
        kept = sum(r.text is not None and r.text.startswith(fixed[0]) and r.text.endswith(fixed[-1])
                   for r in res["results"])
        print(f"  fixed text byte-identical in {kept} of {len(rows)} outputs")
    for task, acc in res["accuracy"].items():
        print(f"  {task:<12} {acc:6.1%}")
    return 0


def cmd_validate(args) -> int:
    from illada_batch.job import preflight
    from illada_batch.job.shards import plan_shards
    from illada_batch.job.spec import load_spec

    spec = load_spec(args.spec, args.set)
    i = spec.input
    input_notes: list[str] = []  # skipped files, files without rows
    shards, bad = plan_shards(spec.resolve(i.url), i.storage_options, spec.shard_rows, i.columns(), i.id_column,
                              i.text_column(), note=input_notes.append)
    problems, notes = preflight.model_problems(spec, replicas_here=not args.address)
    notes = input_notes + notes
    out_url = spec.resolved().output_url(args.date)
    problems += (preflight.output_problems(out_url, spec.output.storage_options)
                 or preflight.foreign_problems(out_url, spec.output.storage_options))
    if args.address:
        more, cluster_notes = preflight.cluster_problems(spec, args.address)
        problems, notes = problems + more, notes + cluster_notes
    rows = sum(s.num_rows for s in shards)
    family, problem = _family(spec, preflight.SHIPPED_MODELS)
    problems += [problem] if problem else []
    verdict = "OK" if not problems and not bad else f"NOT OK ({len(problems) + len(bad)} problem(s) below)"
    print(f"job {spec.name}: {verdict} (fingerprint {spec.resolved().fingerprint()}, as its outputs will carry)")
    print(f"  input     {i.url}: {rows:,} rows in {len(shards)} shards of up to {spec.shard_rows} rows")
    print(f"  samples   {rows * spec.n:,} (n={spec.n}); up to {rows * spec.n * spec.sampling.gen_length:,} generated "
          f"tokens, {rows * spec.n * spec.sampling.steps:,} sample-steps")
    print(f"  model     {spec.model.path} ({spec.backend}), {_replicas_text(spec)} replica(s)")
    if family:
        print(f"  family    {family}")
    print(f"  cache     {preflight.cache_text(spec)}")
    print(f"  output    {spec.output_url(args.date)}")
    for note in notes:
        print(f"  note      {note}")
    for problem in problems:
        print(f"  PROBLEM   {problem}")
    for _, err in bad:
        print(f"  BAD FILE  {err}")
    return 1 if problems or bad else 0


def _family(spec, shipped) -> tuple[str | None, str | None]:
    """(the family card's line, or a problem with the model's config.json) for a local
    diffusion model; (None, None) where there is nothing here to read."""
    from pathlib import Path

    from illada_batch.errors import UserError
    from illada_batch.model.registry import card_of

    path = spec.model.path
    if spec.backend != "diffusion" or ("://" in path and not path.startswith("file://")):
        return None, None
    local = Path(spec.resolve(path.removeprefix("file://"))).expanduser()
    local = local if local.is_dir() else shipped / path
    if not (local / "config.json").is_file():
        return None, None  # model_problems says so
    try:
        card = card_of(local)
    except UserError as exc:
        return None, f"model.path: {exc}"
    kv = card.kv_bytes_per_token(2 if spec.model.dtype != "float32" else 4)
    return (f"{card.family}, {card.parameters:,} parameters ({card.active_parameters:,} active), {card.attention.value}, "
            f"KV {kv:,} bytes/token ({'float32' if spec.model.dtype == 'float32' else 'bfloat16'})"), None


def _load_spec(args):
    from illada_batch.job.spec import load_spec, spec_from_dict

    if getattr(args, "spec_env", None):
        import os

        import yaml

        return spec_from_dict(yaml.safe_load(os.environ[args.spec_env]), source=f"${args.spec_env}")
    return load_spec(args.spec, args.set)


def cmd_run(args) -> int:
    from illada_batch.job.driver import run_job

    spec = _load_spec(args)
    summary = run_job(spec, date=args.date, address=args.address, show_progress=not args.quiet)
    if args.show:
        _show_rows(summary.output, spec, args.show)
    return summary.exit_code()


def _show_rows(url: str, spec, n: int) -> None:
    import pyarrow.dataset as ds

    from illada_batch.job.storage import filesystem

    fs, path = filesystem(url, spec.output.storage_options)
    try:
        table = ds.dataset(f"{path}/data", filesystem=fs, format="parquet").head(n)
    except (FileNotFoundError, ValueError):  # no data/ folder, or nothing in it
        print(f"\noutput: {url}/data holds no rows to show")
        return
    print(f"\noutput: {url}/data  (first {n} rows)")
    for row in table.to_pylist():
        prompt = " ".join((row["prompt"] or "").split())
        shown = f"error: {row['error']}" if row["error"] is not None else repr(row["generation"] or "")
        print(f"  [{row['id']}#{row['sample_index']}] {prompt[:60]!s:<60} -> {shown}")


def cmd_demo(args) -> int:
    args.spec, args.spec_env, args.show = str(DEMO_SPEC), None, 5
    return cmd_run(args)


def cmd_status(args) -> int:
    from illada_batch.job.driver import dumps, status
    from illada_batch.job.progress import summary_table

    s = status(args.output, json.loads(args.storage_options) if args.storage_options else None)
    print(dumps(s.to_dict()) if args.json else summary_table(s))
    return s.exit_code()


def cmd_submit(args) -> int:
    from illada_batch.job.submit import submit

    return submit(args.spec, args.address, args.set, args.date, args.submission_id, args.wait)


def cmd_render(args) -> int:
    from illada_batch.job.render import render_rayjob, run_id

    if args.kind == "rayjob":
        sys.stdout.write(render_rayjob(args.spec, args.date, args.set, image=args.image))
    else:
        print(run_id(args.spec, args.date, args.set))
    return 0


def _replicas_text(spec) -> str:
    lo, hi = spec.replica_range
    return f"{lo}" if lo == hi else f"{lo} to {hi}"


def cmd_bench(args) -> int:
    if args.only == "scale":  # the driver at 10^3..10^5 shards, simulated replicas (no model, no torch)
        from illada_batch.bench.scale import main as bench_scale

        sizes = [int(n) for n in args.shards.split(",") if n]
        return bench_scale(sizes, args.out, args.rows_per_shard, ids=[int(n) for n in args.ids.split(",") if n],
                           store=args.store)
    model = args.model or "tiny-llada"  # --only blockdiff alone makes its own when --model is not given
    if args.backend == "vllm":  # the diffusion engine and vLLM side by side
        from illada_batch.bench.versus_vllm import main as bench_vllm

        return bench_vllm(model=model, ar_model=args.ar_model, rows=args.rows, out_path=args.out)
    from illada_batch.bench.modes import ON_REQUEST, SECTIONS
    from illada_batch.bench.shape import shapes
    from illada_batch.errors import UserError

    caches = args.cache.split(",")
    for name, given, known in (("--cache", caches, _cache_modes()),
                               ("--only", args.only.split(",") if args.only else [], [*SECTIONS, *ON_REQUEST]),
                               ("--model-shape", [args.model_shape] if args.model_shape else [], list(shapes()))):
        unknown = [g for g in given if g not in known]
        if unknown:
            raise UserError(f"{name} {unknown[0]!r}: not one of {', '.join(known)}")
    if args.roofline:  # a model of each cache mode on a GPU, from the engine's counted schedule (runs on a CPU)
        from illada_batch.bench.roofline import roofline

        return roofline(args.roofline, args.model_shape or "llada-8b", args.out)
    if args.model_shape:  # a real shape, random weights: its placement over --tp ranks, or its modes table
        from illada_batch.bench.shape import shape_command

        return shape_command(args.model_shape, args.tp, args.random_weights, args.rows, caches, args.out)
    from illada_batch.bench.modes import main as bench_main
    from illada_batch.train.tiny_families import write_tiny

    block_causal = args.model  # blockdiff's model: --model when given, else the tiny LLaDA 2.x written for this run
    if args.only and "blockdiff" in args.only.split(",") and args.model is None:
        import tempfile

        from illada_batch.train.tiny_llada2 import write_tiny_llada2

        # the same weights with a 4k context: room for gen 1024 and a 2k-token prompt
        block_causal = str(write_tiny_llada2(tempfile.mkdtemp(prefix="tiny-llada2-"), max_position_embeddings=4096))
    return bench_main(model, args.rows, args.out, args.only.split(",") if args.only else None, caches, args.tp,
                      write_tiny=write_tiny, block_causal_model=block_causal)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with friendly():
        return args.func(args)
    return 1


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per ``cmd_*`` function above (an argument table)."""
    ap = _Parser(prog="illada-batch", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("generate", help="generate text for one prompt")
    p.add_argument("--model", default="tiny-llada")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--response-template", default=None,
                   help="the response's fixed text with {slot:N} slots of N tokens; only the slots are generated")
    p.add_argument("--cache", default="auto", choices=_cache_modes(auto=True),
                   help="what the engine keeps between steps (docs/cache-modes.md); auto: the model's own (the exact "
                        "block-causal cache for LLaDA 2.x, prefix otherwise)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    _sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="exact-match accuracy on the task suite")
    p.add_argument("--model", default="tiny-llada")
    p.add_argument("--cache", default="off", choices=_cache_modes(auto=True))
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=_positive, default=16)
    p.add_argument("--rows-per-task", type=_positive, default=100)
    p.add_argument("--prefixes-per-task", type=_positive, default=2)
    p.add_argument("--min-prefix-tokens", type=int, default=400)
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--response-template", default=None,
                   help="lay each response out as this fixed text with {slot:N} slots (e.g. '{slot:8} END') and "
                        "score the first slot's text (slot accuracy)")
    _sampling_args(p)
    p.set_defaults(func=cmd_eval)

    for name, func, helptext in (("run", cmd_run, "run a job on local Ray or a cluster"),
                                 ("demo", cmd_demo, "run jobs/demo.yaml on local Ray")):
        p = sub.add_parser(name, help=helptext)
        if name == "run":
            p.add_argument("spec", nargs="?", help="job spec YAML")
            p.add_argument("--spec-env", default=None, help="read the job spec YAML from this environment variable")
            p.add_argument("--show", type=int, default=0, help="print this many output rows at the end")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec field")
        p.add_argument("--date", default=None, help="fills {date} in output.url (default: today, UTC)")
        p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.set_defaults(func=func)

    p = sub.add_parser("validate", help="check a job spec, its input, model and output; print what would run")
    p.add_argument("spec")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--date", default=None)
    p.add_argument("--address", default=None, help="also ask this Ray cluster whether it can hold a replica")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("submit", help="submit a job to a Ray cluster (Ray Job Submission)")
    p.add_argument("spec")
    p.add_argument("--address", required=True, help="http://HEAD:8265")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--date", default=None)
    p.add_argument("--submission-id", default=None, help="default: derived from the job name and date")
    p.add_argument("--wait", action="store_true", help="follow the logs until the job ends")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="what an output holds: committed, failed, complete")
    p.add_argument("output")
    p.add_argument("--storage-options", default=None, help="JSON fsspec options")
    p.add_argument("--json", action="store_true", help="print the status as JSON (for scripts)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("render", help="print a KubeRay RayJob manifest (or the run id) for a job spec and date")
    p.add_argument("kind", choices=["rayjob", "submission-id"],
                   help="rayjob: the RayJob YAML; submission-id: the run id (Ray submission id, RayJob name)")
    p.add_argument("spec")
    p.add_argument("--date", required=True, help="YYYY-MM-DD: fills {date} and names the run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--image", default=None, help="image of the Ray pods (default: $ILLADA_IMAGE or the release's)")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("bench", help="engine benchmark: cache and decoding modes on the tiny model")
    p.add_argument("--model", default=None, help="default tiny-llada (--only blockdiff: a tiny LLaDA 2.x with a 4k context)")
    p.add_argument("--rows", type=_positive, default=64)
    p.add_argument("--out", default="bench.json")
    p.add_argument("--model-shape", default=None, help="e.g. llada-8b (with --random-weights)")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--roofline", default=None, choices=["h100", "h200", "a100"],
                   help="predict each cache mode's steps on this GPU from the engine's counted schedule (a model)")
    p.add_argument("--backend", default="diffusion", choices=["diffusion", "vllm"],
                   help="vllm: the diffusion engine and vLLM side by side (needs vLLM)")
    p.add_argument("--ar-model", default="tiny-qwen2", help="the autoregressive model for --backend vllm")
    p.add_argument("--only", default=None, help="comma-separated subset of the bench's sections; `scale` alone: the "
                   "driver at many shards against simulated replicas")
    p.add_argument("--shards", default="1000,10000", help="--only scale: comma-separated shard counts (e.g. 100000)")
    p.add_argument("--rows-per-shard", type=int, default=4, help="--only scale: input rows per shard")
    p.add_argument("--store", default="s3", choices=["s3", "local"],
                   help="--only scale: input and output on the local S3 server (moto), or in local files")
    p.add_argument("--ids", default="", help="--only scale: also the duplicate-id check's memory on these id counts "
                   "(e.g. 10000000); --shards '' for this alone")
    p.add_argument("--tp", type=_positive, default=1,
                   help="--only wide: each of N tensor-parallel ranks' peak memory against 1/N of the weights; "
                   "--model-shape: the shape's placement on N ranks (what must divide, what a rank holds)")
    p.add_argument("--cache", default=",".join(_cache_modes()),
                   help=f"comma-separated cache modes for the modes tables (of {', '.join(_cache_modes())})")
    p.set_defaults(func=cmd_bench)

    return ap


@contextlib.contextmanager
def friendly():
    """User errors: one line on stderr, exit 2, no traceback; a closed pipe or Ctrl-C end quietly."""
    from illada_batch.errors import UserError

    try:
        yield
    except UserError as exc:
        print(f"illada-batch: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except BrokenPipeError:  # `illada-batch ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None
    except KeyboardInterrupt:
        print("illada-batch: interrupted; committed shards are kept, a re-run resumes", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    sys.exit(main())
