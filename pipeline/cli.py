"""``rgbatch``: the command line.

Exit codes: 0 done, 2 bad usage or input, 1 the job failed.

What it prints and logs has the userinfo and query string of every URI masked
(:mod:`pipeline.secrets`), library logs included.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.secrets import install_log_masking, mask_text, mask_uri

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# Libraries whose INFO lines are noise unless -v: JAX names every backend it could not start
# (libtpu on a machine without a TPU), Orbax logs every read, Ray Data logs its plan and its own
# progress (beside rg-batch's line).
_QUIET_LOGGERS = ("absl", "jax", "ray", "ray.data")


def configure_logging(verbose: bool) -> None:
    """rg-batch's INFO lines (DEBUG with ``verbose``); libraries' at WARNING unless ``verbose``."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if verbose:
        for name in ("jax", "ray", "ray.data"):  # DEBUG on the root: keep these at INFO
            logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax: a line per read even so
        logging.getLogger(_RAY_AUTH_LOGGER).removeFilter(_default_auth_notice)
        return
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray says at every local start that it turned token authentication on, its default.
    logging.getLogger(_RAY_AUTH_LOGGER).addFilter(_default_auth_notice)


_RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def _default_auth_notice(record: logging.LogRecord) -> bool:
    """False for Ray's notice that token authentication is on by default (kept with -v)."""
    return not record.getMessage().startswith("Token authentication is enabled")


def quiet_ray_data(verbose: bool) -> None:
    """Turns Ray Data's own progress bars and execution logs off (the driver's progress line
    says the same), unless ``verbose``. Call after ``ray.init``, in the driver."""
    if verbose:
        return
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    # Ray Data configures its loggers when imported; quieten them after that.
    for name in ("ray.data", "ray.data._internal.progress"):
        logging.getLogger(name).setLevel(logging.ERROR if "progress" in name else logging.WARNING)


def _cmd_fixtures(args: argparse.Namespace) -> int:
    from testkit.tiny_detoxify import build_tiny_detoxify
    from testkit.tiny_model import build_tiny_checkpoint

    variant_dir = build_tiny_checkpoint(args.dir)
    detox = build_tiny_detoxify(Path(args.dir) / "detoxify")
    print(f"tiny checkpoint: {variant_dir}")
    print(f"tokenizer:       {Path(args.dir) / 'tokenizer.model'}")
    print(f"tiny detoxify:   {detox}")
    return EXIT_OK


def resolve_date(value: str | None, today: dt.date | None = None) -> str | None:
    """YYYY-MM-DD from "today", "yesterday" (UTC) or a date; None stays None."""
    if value is None:
        return None
    today = today or dt.datetime.now(dt.UTC).date()
    named = {"today": today, "yesterday": today - dt.timedelta(days=1)}
    if value in named:
        return named[value].isoformat()
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise ValueError(
            f"--date: expected YYYY-MM-DD, today or yesterday, got {value!r}"
        ) from None


def resolve_run_id(run_id: str | None, date: str | None, force: bool = False) -> str | None:
    """The run id: --run-id as given; else a dated run is named by its date, so rerunning a date
    resumes it (or does nothing when it finished); --force starts a new run id instead."""
    from pipeline.config import new_run_id

    base = run_id or date
    if force:
        return f"{base}-{new_run_id()}" if base else new_run_id()
    return base


def _load_config(args: argparse.Namespace):
    from pipeline.config import load_job_config, preflight

    date = resolve_date(args.date)
    run_id = resolve_run_id(getattr(args, "run_id", None), date, getattr(args, "force", False))
    config = load_job_config(args.config, overrides=args.set, run_id=run_id, date=date)
    preflight(config)
    return config


def _cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.rundir import run_dir_uri

    config = _load_config(args)
    print(f"{args.config}: ok ({config.task}, {len(config.input_files())} input files)")
    if args.date is None:  # the run id is not fixed: `run` picks a new one when it starts
        base = mask_uri(config.output.uri.rstrip("/"))
        print(
            f"output would go to {base}/<run id>: run picks a new run id when it starts "
            "(with --date the run id is the date; --run-id names one)"
        )
    else:
        print(f"output would go to {mask_uri(run_dir_uri(config))}")
    if args.estimate:
        _print_estimate(config, args)
    return EXIT_OK


def _estimate_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--estimate",
        action="store_true",
        help="also predict rows, prompt and generated tokens and wall time, from a sample",
    )
    cmd.add_argument("--replicas", type=int, default=None, help="default: model.replicas")
    cmd.add_argument(
        "--throughput",
        type=float,
        default=None,
        metavar="TOKENS_PER_S",
        help="generated tokens per second per replica (e.g. a previous run's "
        "throughput.output_tokens_per_s / replicas) for the wall time",
    )
    cmd.add_argument(
        "--calibrate",
        action="store_true",
        help="measure the throughput: one replica of the configured model runs sampled prompts",
    )
    cmd.add_argument(
        "--generated-mean",
        type=float,
        default=None,
        help="generated tokens per row (default: generation.max_new_tokens, or the calibration's)",
    )
    cmd.add_argument("--sample-rows", type=int, default=400, help="rows sampled (default 400)")


def _print_estimate(config: Any, args: argparse.Namespace) -> None:
    from pipeline.estimate import Throughput, calibrate, estimate, prompted_sample
    from pipeline.runner import driver_tokenizer

    tokenizer = driver_tokenizer(config)
    throughput = Throughput.given(args.throughput) if args.throughput else None
    sample = None
    if args.calibrate:
        sample = prompted_sample(config, tokenizer, args.sample_rows)
        throughput = calibrate(config, sample)
    result = estimate(
        config,
        tokenizer,
        replicas=args.replicas,
        throughput=throughput,
        generated_mean=args.generated_mean,
        rows=args.sample_rows,
        sample=sample,
    )
    print("estimate:")
    for line in result.lines():
        print(f"  {line}")


def _cmd_run(args: argparse.Namespace) -> int:
    import os

    import ray

    from pipeline.config import ConfigError
    from pipeline.local_ray import start_local_ray
    from pipeline.resources import check_node_fits
    from pipeline.runner import precheck, run_job

    config = _load_config(args)
    done = precheck(config)  # answered from the run directory: no cluster joined or started
    if done is not None:
        print(f"run {done.run_id} was already complete: nothing to do")
        _print_result(done)
        return EXIT_OK
    verbose = getattr(args, "verbose", False)
    ray_logging = {} if verbose else {"logging_level": logging.WARNING}
    if config.run.ray_address:
        context = ray.init(address=config.run.ray_address, **ray_logging)
        print(
            f"joined the Ray cluster at {context.address_info.get('gcs_address')} "
            f"(run.ray_address: {config.run.ray_address}): {_cluster_line()}",
            flush=True,
        )
    else:
        # A Ray of this run's own, whatever else runs here (pipeline.local_ray).
        start_local_ray(
            config.run.num_cpus or max(8, os.cpu_count() or 1),
            _metrics_export_port=config.run.metrics_export_port,
            **ray_logging,
        )
    quiet_ray_data(verbose)
    try:
        if not config.run.ray_address:  # a node of this machine: what it lacks it never gets
            check_node_fits(config, ray.cluster_resources())
        result = run_job(config)
    except ConfigError:  # a request the local node cannot meet, or the run id is taken: exit 2
        raise
    except Exception:
        logging.getLogger("rgbatch").exception("run %s failed", config.run_id)
        return EXIT_FAILED
    finally:
        linger(config.run.metrics_linger_s)
        ray.shutdown()
    if result.status == "already_complete":
        print(f"run {result.run_id} was already complete: nothing to do")
    _print_result(result)
    return EXIT_OK


def _print_result(result: Any) -> None:
    print(f"outputs: {mask_uri(result.run_dir)}")
    print(f"report:  {mask_uri(result.run_dir.rstrip('/') + '/report.html')}")
    print(summary_line(result.manifest.get("counts", {})))


def _cluster_line() -> str:
    """What the joined cluster has: nodes, CPUs, GPUs/TPUs (for the first line of a run)."""
    import ray

    resources = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    parts = [f"{nodes} node{'s' if nodes != 1 else ''}", f"{resources.get('CPU', 0):g} CPUs"]
    for name in ("GPU", "TPU"):
        if resources.get(name):
            parts.append(f"{resources[name]:g} {name}s")
    return ", ".join(parts)


def linger(seconds: float) -> None:
    """Keeps the driver up ``seconds`` (``run.metrics_linger_s``) so that Prometheus scrapes the
    run's final metrics."""
    if seconds > 0:
        import time

        logging.getLogger("rgbatch").info("metrics: staying up %g s for a last scrape", seconds)
        time.sleep(seconds)


def summary_line(counts: dict[str, Any]) -> str:
    """The run's last line: rows, finish reasons, and what the toxicity policy flagged and
    rejected (dropped to rejected/) or redacted."""
    rows = counts.get("rows") or 0
    line = f"rows: {rows}  finish reasons: {counts.get('finish_reasons')}"
    if "toxic" in counts:
        share = f" ({100 * counts['toxic'] / rows:.1f}%)" if rows else ""
        line += f"  toxic: {counts['toxic']}{share}"
        decisions = counts.get("toxicity_decisions") or {}
        line += f", rejected: {counts.get('rows_rejected', 0)}"
        if decisions.get("redact"):
            line += f", redacted: {decisions['redact']}"
    return line


def _jobs_call(action) -> int:
    from pipeline.jobs import JobsError, UnknownRunError

    try:
        return action()
    except UnknownRunError as exc:
        print(f"error: {mask_text(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except JobsError as exc:  # a JobsAuthError's message carries the token hint
        print(f"error: {mask_text(str(exc))}", file=sys.stderr)
        return EXIT_FAILED


def _cmd_submit(args: argparse.Namespace) -> int:
    from pipeline import jobs

    date = resolve_date(args.date)
    run_id = resolve_run_id(args.run_id, date)

    def go() -> int:
        result = jobs.submit(
            args.config,
            address=args.address,
            overrides=args.set,
            run_id=run_id,
            date=date,
            wait=args.wait,
            timeout_s=args.timeout,
            on_progress=_print_progress if args.wait else None,
            python=args.python,
        )
        if not result.created:
            what = f"already on the cluster as {result.submission_id}, not resubmitted"
        elif result.attempt > 1:
            what = f"attempt {result.attempt} submitted as {result.submission_id} (resumes the run)"
        else:
            what = "submitted"
        print(f"run {result.run_id}: {what}; status {result.status}")
        if result.reason:
            print(f"reason: {result.reason}")
        return EXIT_OK if not args.wait or result.status == "SUCCEEDED" else EXIT_FAILED

    return _jobs_call(go)


def _print_progress(line: str) -> None:
    print(f"progress: {line}", flush=True)


def _cmd_status(args: argparse.Namespace) -> int:
    """Prints the status of the run's latest attempt, and the reason of a failed or stopped
    one; exits 1 for FAILED or STOPPED."""
    from pipeline import jobs

    def go() -> int:
        state = jobs.describe(args.run_id, address=args.address)
        print(state.status)
        if state.reason:
            print(f"reason: {state.reason}")
        return EXIT_FAILED if state.status in jobs.RESUMABLE_STATUSES else EXIT_OK

    return _jobs_call(go)


def _cmd_logs(args: argparse.Namespace) -> int:
    from pipeline import jobs

    def go() -> int:
        sys.stdout.write(mask_text(jobs.logs(args.run_id, address=args.address)))
        return EXIT_OK

    return _jobs_call(go)


def _cmd_stop(args: argparse.Namespace) -> int:
    from pipeline import jobs

    def go() -> int:
        print(jobs.stop(args.run_id, address=args.address, wait=not args.no_wait))
        return EXIT_OK

    return _jobs_call(go)


def _cmd_report(args: argparse.Namespace) -> int:
    import json

    from pipeline.report import rebuild

    options = json.loads(args.storage_options) if args.storage_options else None
    summary, path = rebuild(args.run_uri, options)
    print(mask_text(summary))
    print(f"report: {mask_uri(path)}")
    return EXIT_OK


def _cmd_config(args: argparse.Namespace) -> int:
    from pipeline.config.reference import render

    sys.stdout.write(render())
    return EXIT_OK


def _cmd_generate(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from model.checkpoint import load_checkpoint
    from model.engine import Engine, GenerationRequest
    from model.tokenizer import Tokenizer

    ckpt = load_checkpoint(args.checkpoint)
    if ckpt.tokenizer_path is None:
        print(f"error: no tokenizer.model beside {mask_uri(args.checkpoint)}", file=sys.stderr)
        return EXIT_USAGE
    tokenizer = Tokenizer.load(ckpt.tokenizer_path)
    chat = ckpt.variant.endswith("-it")
    stop_ids = (tokenizer.eos_id, *((tokenizer.end_of_turn_id,) if chat else ()))
    requests = [
        GenerationRequest(
            tokenizer.encode_prompt(text, chat=chat),
            max_new_tokens=args.max_new_tokens,
            stop_ids=stop_ids,
            temperature=args.temperature,
            seed=args.seed,
        )
        for text in args.prompts
    ]
    engine = Engine(ckpt.config, ckpt.params, max_slots=len(requests), dtype=jnp.dtype(args.dtype))
    for text, result in zip(args.prompts, engine.generate(requests), strict=True):
        print(f"> {text}\n{tokenizer.decode(result.token_ids)}  [{result.finish_reason}]\n")
    return EXIT_OK


def _cmd_doctor(args: argparse.Namespace) -> int:
    """The devices JAX sees and the memory plan of a model on them: whether it fits."""
    import jax

    from model.config import ModelConfig
    from model.memory import (
        MemoryPlanError,
        device_memory_limit,
        max_slots_that_fit,
        plan_memory,
    )
    from pipeline.config import load_job_config

    devices = jax.local_devices()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {len(devices)} local devices:")
    for device in devices:
        limit = device_memory_limit(device)
        memory = f"{limit / 2**30:.1f} GiB" if limit else "no memory limit reported"
        print(f"  {device} ({device.device_kind}): {memory}")
    gen, model, preset = None, None, args.preset
    if args.config:
        config = load_job_config(args.config, overrides=args.set)
        gen, model = config.generation, config.model
        preset = preset or Path(model.checkpoint.rstrip("/")).name
    if preset not in ModelConfig.presets():
        print(
            f"error: pass --preset ({', '.join(ModelConfig.presets())}): "
            f"{preset!r} is not a preset",
            file=sys.stderr,
        )
        return EXIT_USAGE
    shapes = dict(
        dtype=args.dtype or (model.dtype if model else "bfloat16"),
        prefill_batch=gen.prefill_batch if gen else 8,
        prefill_chunk=gen.prefill_chunk if gen else 128,
        tensor_parallel=args.tensor_parallel or (model.replica_devices if model else 1),
        device_bytes=int(args.device_memory_gb * 1e9) if args.device_memory_gb else None,
        headroom=model.memory_headroom if model else 0.1,
    )
    slots = args.max_slots or (gen.max_slots if gen else 32)
    model_config = ModelConfig.from_preset(preset)
    try:
        if slots == "auto":
            slots = max_slots_that_fit(model_config, **shapes)
            print(f"max_slots auto: {slots}")
        plan = plan_memory(model_config, max_slots=int(slots), **shapes)
    except (MemoryPlanError, ValueError) as exc:
        print(f"{preset}: {exc}")
        return EXIT_FAILED
    print(f"{preset}: {plan.summary()}")
    if plan.limit_bytes is None:
        print("fits: unknown (no device memory limit; pass --device-memory-gb to plan for one)")
        return EXIT_OK
    print("fits: yes" if plan.fits else f"fits: NO. {plan.advice}")
    return EXIT_OK if plan.fits else EXIT_FAILED


_VERBOSE_HELP = "everything: libraries' INFO logs, Ray Data's own progress bars, DEBUG lines"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rgbatch", description=_plain(__doc__), formatter_class=_Formatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    # Also accepted after the subcommand (rgbatch run job.yaml -v); SUPPRESS keeps the default
    # of the main parser when it is not given there.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser

    def sub_add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return add_parser(name, parents=[common], **kwargs)

    sub.add_parser = sub_add_parser  # type: ignore[method-assign]

    fixtures = sub.add_parser(
        "fixtures", help="write the tiny offline model (Kaggle layout + tokenizer.model) to DIR"
    )
    fixtures.add_argument("dir")
    fixtures.set_defaults(func=_cmd_fixtures)

    for name, func, text in (
        ("run", _cmd_run, "run (or resume) a batch job"),
        ("validate", _cmd_validate, "check a job config and its inputs; writes nothing"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("config", help="job YAML")
        cmd.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="override a.b=value"
        )
        cmd.add_argument(
            "--date",
            default=None,
            help="YYYY-MM-DD, today or yesterday: fills {date}; without --run-id the run id is "
            "the date (default: today for {date}, a fresh run id)",
        )
        if name == "validate":
            _estimate_arguments(cmd)
        if name == "run":
            cmd.add_argument("--run-id", default=None, help="resume or name this run")
            cmd.add_argument(
                "--force", action="store_true", help="start a new run id even if this one finished"
            )
        cmd.set_defaults(func=func)

    submit = sub.add_parser("submit", help="run a batch job on a Ray cluster (Ray Jobs API)")
    submit.add_argument("config", help="job YAML inside the project (e.g. jobs/x.yaml)")
    submit.add_argument(
        "--address",
        default=None,
        help="dashboard URL, e.g. http://head:8265 (default $RAY_ADDRESS)",
    )
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument(
        "--run-id",
        default=None,
        help="the run; a failed or stopped one is resubmitted as a new attempt (<id>--a2, ...) "
        "that resumes it, a pending, running or succeeded one is not",
    )
    submit.add_argument("--date", default=None, help="YYYY-MM-DD, today or yesterday")
    submit.add_argument(
        "--wait",
        action="store_true",
        help="wait for the end, printing the run's progress; exit 1 (with the reason) unless "
        "SUCCEEDED",
    )
    submit.add_argument("--timeout", type=float, default=None, metavar="SECONDS")
    submit.add_argument(
        "--python",
        default=None,
        metavar="PATH",
        help="the cluster's interpreter for rg-batch (default: the one Ray runs under on the "
        "cluster, else python3 or python there, whichever imports Ray and rg-batch's "
        "dependencies)",
    )
    submit.set_defaults(func=_cmd_submit)
    for name, func, text in (
        (
            "status",
            _cmd_status,
            "a submitted run's status (its latest attempt) and why it failed; exit 1 if it "
            "FAILED or was STOPPED",
        ),
        ("logs", _cmd_logs, "a submitted run's driver logs (its latest attempt)"),
        ("stop", _cmd_stop, "stop a submitted run (its latest attempt)"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("run_id")
        cmd.add_argument("--address", default=None, help="dashboard URL (default $RAY_ADDRESS)")
        if name == "stop":
            cmd.add_argument("--no-wait", action="store_true", help="return without waiting")
        cmd.set_defaults(func=func)

    doctor = sub.add_parser(
        "doctor", help="the devices JAX sees and whether a model's memory plan fits them"
    )
    doctor.add_argument("config", nargs="?", help="a job config (its model and engine settings)")
    doctor.add_argument("--set", action="append", default=[], metavar="a.b=value")
    doctor.add_argument("--preset", help="model shapes: 2b, 2b-it, 9b, 9b-it")
    doctor.add_argument("--dtype", choices=("bfloat16", "float32"))
    doctor.add_argument("--tensor-parallel", type=int, help="devices per replica")
    doctor.add_argument(
        "--max-slots", type=lambda v: v if v == "auto" else int(v), help="a number or auto"
    )
    doctor.add_argument(
        "--device-memory-gb", type=float, help="plan for devices of this size (default: this one)"
    )
    doctor.set_defaults(func=_cmd_doctor)

    report = sub.add_parser("report", help="print a run's summary and rebuild its report.html")
    report.add_argument("run_uri", help="<output uri>/<run id>, local or any fsspec URI")
    report.add_argument(
        "--storage-options", default=None, help="fsspec options as JSON (default: environment)"
    )
    report.set_defaults(func=_cmd_report)

    config = sub.add_parser(
        "config", help="print the job config reference: every field, its type, default, meaning"
    )
    config.set_defaults(func=_cmd_config)

    generate = sub.add_parser(
        "generate", help="continue a few prompts (greedy unless --temperature)"
    )
    generate.add_argument("--checkpoint", required=True, help="variant dir or URI (Kaggle or HF)")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    generate.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("prompts", nargs="+")
    generate.set_defaults(func=_cmd_generate)
    return parser


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's paragraphs as written (it is plain text, see :func:`_plain`)."""


def _plain(text: str | None) -> str:
    """A docstring as plain text for ``--help``: reST markup (``code``, :role:`x`) removed."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text or "")
    return text.replace("``", "").strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage; keep its code
        return int(exc.code or 0)
    configure_logging(args.verbose)
    install_log_masking()
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:  # ConfigError is a ValueError
        print(f"error: {mask_text(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:  # the traceback goes through the (masking) log handlers, not sys.excepthook
        logging.getLogger("rgbatch").exception("rgbatch %s failed", args.command)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
