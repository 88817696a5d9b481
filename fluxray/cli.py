"""The `fluxray` command: thin wrappers over the library functions the jobs and the API call.

Each subcommand is a `_cmd_<name>(args)` function plus one `add_parser` block in
`build_parser`. A `FluxrayError` prints as one line (exit 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

from fluxray.errors import FluxrayError


def _add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", "-c", required=required, help="job config YAML (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key; the value is parsed as YAML (repeatable)")


def _load(args):
    from fluxray.config import load_config

    return load_config(args.config, args.overrides)


# -- subcommands ---------------------------------------------------------------------------

def _cmd_prepare(args) -> int:
    from fluxray.data.prepare import PrepareError, prepare_dataset

    try:
        report = prepare_dataset(Path(args.images), Path(args.captions) if args.captions else None,
                                 trigger_word=args.trigger, out_dir=Path(args.out), strict=args.strict)
    except PrepareError as e:
        print(e.report.format(), file=sys.stderr)
        raise
    print(report.format())
    return 0


def _cmd_make_demo_model(args) -> int:
    from fluxray.train.pretrain_demo import main

    return main([str(args.dir), "--seed", str(args.seed)] + (["--quick"] if args.quick else []))


def _cmd_train(args) -> int:
    from fluxray.train.job import run_job

    cfg = _load(args)
    summary = run_job(cfg, local=args.local, resume=args.resume)
    print(_next_steps(args, cfg, summary))
    return 0


def _next_steps(args, cfg, summary: dict) -> str:
    """The last lines of a job: what it made, where, and the commands that open it."""
    from fluxray.track.mlflow_run import run_page, tracking_uri

    fluxray = _fluxray_command()
    # The same storage root and tracking store as this job (the config, and its --set of them).
    again = shlex.join(["--config", args.config] + [w for o in args.overrides if o.startswith(("storage.", "tracking."))
                                                    for w in ("--set", o)])
    lines = [f"done: {summary.get('steps')} steps, final loss {summary.get('loss', float('nan')):.4f}",
             f"  LoRA file  {summary.get('lora')}",
             f"  previews   {summary.get('previews')}/"]
    run_id = summary.get("mlflow_run_id")
    if run_id is None:
        lines.append(f"  MLflow     unreachable when the job started: `{fluxray} mlflow sync --run {summary.get('run')} "
                     f"{again}` sends what still waits")
    elif tracking_uri(cfg).startswith(("http://", "https://")):
        lines.append(f"  MLflow     run {run_id}: {run_page(cfg, run_id)}")
    else:
        lines.append(f"  MLflow     run {run_id}: `{fluxray} mlflow {again}`, then open "
                     f"{run_page(cfg, run_id, 'http://127.0.0.1:5000')}")
    lines.append(f"  web page   `{fluxray} serve {again}`, then open http://127.0.0.1:8000/")
    return "\n".join(lines)


def _fluxray_command() -> str:
    """How the user's shell runs this fluxray: `fluxray` when it is on PATH, else the venv's script."""
    script = Path(sys.executable).parent / "fluxray"
    found = shutil.which("fluxray")
    if found and Path(found).resolve() == script.resolve():
        return "fluxray"
    try:
        return str(script.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def _cmd_serve(args) -> int:
    import os

    import ray
    from ray import serve

    from fluxray.errors import ConfigError
    from fluxray.serve.app import LOOPBACK, build_app

    # The service's secret, kept out of the Ray processes started below (a local cluster's
    # workers inherit this environment, training workers among them).
    token = os.environ.pop("FLUXRAY_API_TOKEN", None)
    if not token and args.host not in LOOPBACK:
        raise ConfigError(f"--host {args.host}: refusing to serve the API beyond this machine without a token; "
                          "set FLUXRAY_API_TOKEN")
    ray.init(address=args.address, configure_logging=False)
    app = build_app({"config": args.config, "overrides": args.overrides, "api_token": token})
    serve.start(http_options={"host": args.host, "port": args.port})
    print(f"fluxray at http://{args.host}:{args.port}/ (API docs at /docs); Ctrl-C stops it", flush=True)
    try:
        serve.run(app, name="fluxray", route_prefix="/", blocking=True)
    finally:
        serve.delete("fluxray")
    return 0


def _cmd_queue(args) -> int:
    import time

    import ray

    from fluxray.cluster.admission import format_queue, queue_snapshot

    ray.init(address=args.address, configure_logging=False, log_to_driver=False)
    print(format_queue(queue_snapshot(), time.time()))
    return 0


def _cmd_config(args) -> int:
    from fluxray.config import dump_config, reference_markdown

    print(reference_markdown() if args.reference else dump_config(_load(args)), end="")
    return 0


def _cmd_mlflow(args) -> int:
    from fluxray.config import load_config
    from fluxray.errors import ConfigError
    from fluxray.track.mlflow_run import UI_QUERY, local_store, serve, sync_run

    cfg = _load(args)
    if args.action == "sync":
        if not args.run:
            raise ConfigError("--run: `fluxray mlflow sync` needs the name of the run (its save.name)")
        path = cfg.storage_root / "runs" / args.run / "config.yaml"
        if not path.exists():
            raise ConfigError(f"--run: no run named {args.run!r} under {cfg.storage_root / 'runs'}")
        # The run's own config, with the same --set overrides (e.g. a new tracking.uri).
        run_id, sent = sync_run(load_config(path, args.overrides))
        print(f"run {args.run}: {sent} pending call(s) sent to MLflow run {run_id}")
        return 0
    print(f"MLflow UI at http://{args.host}:{args.port}/#/?{UI_QUERY} over {local_store(cfg)} (Ctrl-C stops it)",
          flush=True)
    return serve(cfg, args.host, args.port)


def _cmd_advise(args) -> int:
    from fluxray.advise.estimate import estimate
    from fluxray.advise.memory import choose, target_gpu
    from fluxray.advise.rules import advise, check_strict, dataset_facts, format_advice

    cfg = _load(args)
    items = advise(cfg)
    print(format_advice(items))
    sizes = dataset_facts(cfg)[1]
    # `--gpu` unset: this machine's GPU, and the plan and estimate say when they are for another one.
    gpu, note = target_gpu(cfg, args.gpu)
    chosen, why = choose(cfg, gpu, sizes=sizes)
    print(chosen.line(gpu))
    print(f"  {chosen.breakdown()}")
    print(f"  auto: {why}" + (f" ({note})" if note else ""))
    print(estimate(cfg, gpu=args.gpu, mfu=args.mfu, sizes=sizes, gpu_memory_gib=gpu.memory_gib).format())
    if args.strict:
        check_strict(items)
    return 0


def _cmd_import_config(args) -> int:
    from fluxray.compat.aitoolkit import import_aitoolkit

    report = import_aitoolkit(args.file)
    if args.out:
        Path(args.out).write_text(report.to_yaml(args.out), encoding="utf-8")
        print(report.format())
        print(f"fluxray config written to {args.out}")
    else:  # the YAML on stdout (redirectable), the report on stderr
        print(report.to_yaml(), end="")
        print(report.format(), file=sys.stderr)
    return 0


def _cmd_doctor(args) -> int:
    from fluxray.advise.doctor import doctor, format_checks
    from fluxray.errors import ConfigError

    cfg, error = None, None
    try:
        cfg = _load(args)
    except ConfigError as e:  # reported as a check: the rest of the machine is still worth knowing
        error = str(e)
    checks = doctor(cfg, ray_timeout=args.ray_timeout, config_error=error)
    print(format_checks(checks))
    return 1 if any(c.status == "fatal" for c in checks) else 0


def build_parser() -> argparse.ArgumentParser:
    from fluxray.model.demo import WEIGHTS_DIR

    parser = argparse.ArgumentParser(prog="fluxray", description="Train FLUX.1 LoRAs on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show everything: debug logs, and every library's warnings and progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="prepare a dataset: images + captions + trigger word -> metadata.jsonl")
    p.add_argument("images", help="folder of images (never modified)")
    p.add_argument("--captions", help="captions JSON, JSON list or metadata.jsonl (default: .txt sidecars)")
    p.add_argument("--trigger", required=True, help="trigger word, e.g. pxco")
    p.add_argument("--out", required=True, help="output folder of the prepared dataset")
    p.add_argument("--strict", action="store_true", help="make every problem fatal")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("make-demo-model", help="pretrain the demo model (`model.path: tiny`) and its likeness "
                                               "embedder on drawn portraits (see fluxray.train.pretrain_demo)")
    p.add_argument("dir", nargs="?", default=str(WEIGHTS_DIR), help=f"where to write them (default: {WEIGHTS_DIR}, "
                                                                    "what `tiny` loads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps of each stage: checks the code, not the model")
    p.set_defaults(func=_cmd_make_demo_model)

    p = sub.add_parser("train", help="train a LoRA (on Ray Train workers, or --local in this process)")
    _add_config_args(p, required=True)
    p.add_argument("--local", action="store_true", help="run in this process without Ray")
    p.add_argument("--resume", action="store_true", help="resume the run named by save.name from its last checkpoint")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("serve", help="run the HTTP API and web page (Ray Serve); jobs go to the same Ray cluster")
    _add_config_args(p)
    p.add_argument("--host", default="127.0.0.1", help="listen address (0.0.0.0 for every interface; set FLUXRAY_API_TOKEN then)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, a running local one, or a new one)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("queue", help="the cluster's fluxray jobs: running, and waiting in order with the reason")
    p.add_argument("--address", help="Ray cluster (default: $RAY_ADDRESS or the running local one)")
    p.set_defaults(func=_cmd_queue)

    p = sub.add_parser("config", help="print the resolved config (defaults + file + --set)")
    _add_config_args(p)
    p.add_argument("--reference", action="store_true", help="print every key with its default and doc (markdown)")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("mlflow", help="browse the local MLflow store (mlflow server), or `sync` a run's pending calls")
    p.add_argument("action", nargs="?", choices=("server", "sync"), default="server",
                   help="server (default): start `mlflow server` on <storage.root>/mlflow; sync: send what a "
                        "tracking outage left in <run>/mlflow-pending*.jsonl")
    _add_config_args(p)
    p.add_argument("--run", help="sync: the run name (save.name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=_cmd_mlflow)

    p = sub.add_parser("advise", help="what to change before training (the guide's advice), peak GPU memory and "
                                      "a time estimate")
    _add_config_args(p, required=True)
    p.add_argument("--strict", action="store_true", help="exit non-zero when there is any warning or error")
    p.add_argument("--gpu", help="GPU to plan memory and time for (RTX 4090, L4, A100 40GB, H100, ...); "
                                 "default: this machine's, else H100")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed by the estimate")
    p.set_defaults(func=_cmd_advise)

    p = sub.add_parser("import-config", help="convert another trainer's config (ai-toolkit) to a fluxray config")
    p.add_argument("tool", choices=("ai-toolkit",))
    p.add_argument("file", help="the ai-toolkit YAML (config.process[0] with network, datasets, train, sample)")
    p.add_argument("-o", "--out", help="write the fluxray YAML here (default: stdout, report on stderr)")
    p.set_defaults(func=_cmd_import_config)

    p = sub.add_parser("doctor", help="check Ray, GPUs, MLflow, the model and disk space; print what to fix")
    _add_config_args(p)
    p.add_argument("--ray-timeout", type=float, default=30.0, help="seconds to wait for the Ray cluster")
    p.set_defaults(func=_cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fluxray.logs import setup

    parser = build_parser()
    args = parser.parse_args(argv)
    setup(args.verbose)
    if args.command == "serve" or (args.command == "train" and not args.local):
        # Before Ray is imported: it reads the auth mode once, and a fresh machine has no token yet.
        from fluxray.cluster import ensure_auth_token

        ensure_auth_token()
    try:
        return args.func(args)
    except FluxrayError as e:
        print(f"fluxray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fluxray {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an environment failure: one line here, the traceback in a file
        import tempfile
        import traceback

        log = Path(tempfile.gettempdir()) / f"fluxray-{args.command}-error.log"
        log.write_text(traceback.format_exc())
        print(f"fluxray {args.command}: failed: {type(e).__name__}: {_first_line(e)} (traceback in {log})",
              file=sys.stderr)
        return 1


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else repr(e)


if __name__ == "__main__":
    sys.exit(main())
