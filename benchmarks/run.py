"""fluxray benchmarks: every speed and memory claim, measured side by side in one run.

    .venv/bin/python benchmarks/run.py            # full run (CPU: ~10 min on 2 cores)
    .venv/bin/python benchmarks/run.py --quick    # CI's reduced mode: same code paths, few steps
    .venv/bin/python benchmarks/run.py --only f   # on a GPU box: FLUX.1-dev's s/step, MFU and memory per base

a. steady-state step time of fluxray's Ray + DeepSpeed worker vs a bare PyTorch loop (same model, batch)
b. step time with and without the latent / text-embedding caches (the random test model)
c. transformer parameters held per worker under ZeRO 0 and ZeRO 3, 2 workers
d. time from submission to the first step, for a job on a running cluster
e. share of wall time spent sampling with the default sample config: inline in one process, and (not in
   --quick) on the preview actor of a Ray job, where it counts the loop's stops and the wait at the end
f. GPU only: s/step, MFU and peak memory at 512² and 1024², batch 1, full-size FLUX.1-dev transformer (random
   weights) as a bf16, an int8 and an NF4 base, against the memory plan; needs no Ray and no DeepSpeed
Results are printed as a table and written to --out (JSON). Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray 2.60 clusters want their token (~/.ray/auth_token, made here on a fresh machine); Ray
# reads the auth mode once, at import.
from fluxray.cluster import ensure_auth_token  # noqa: E402

ensure_auth_token()


def _cfg(root: Path, model: Path, dataset: Path, name: str, *overrides: str):
    from fluxray.config import load_config

    # tiny.yaml is the demo's recipe (rank 16, 20 sampling steps); the benchmarks keep the quick one
    # they were measured with (rank 4, 4 sampling steps, a save every 20 steps), as the tests do.
    return load_config(REPO / "configs" / "tiny.yaml", [
        f"storage.root={root}", f"model.path={model}", f"dataset.path={dataset}", f"save.name={name}",
        "lora.rank=4", "train.lr=0.001", "sample.steps=4", "save.every=20", "validation.embedding_model=null",
        *overrides])


def _steady_seconds_per_step(run_dir: Path, skip: int, key: str | None = None) -> float:
    """Median wall time between consecutive logged steps, after `skip` warm-up steps; with `key`,
    the median of that metric instead (`step_time`: the loop's own timing of the step)."""
    from fluxray.track.local import read_metrics

    rows = [m for m in read_metrics(run_dir) if "loss" in m and m["step"] > skip]
    if key:
        return statistics.median(m[key] for m in rows)
    stamps = [m["time"] for m in rows]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(gaps)


def _bare_loop(model: Path, dataset: Path, root: Path, steps: int, skip: int, resolution: int) -> float:
    """The floor: plain PyTorch AdamW on the same LoRA, same cached inputs, same step function."""
    import torch

    from fluxray.config import load_config
    from fluxray.data.buckets import make_items, rank_batch
    from fluxray.data.cache import CacheStore, build_caches, model_key
    from fluxray.data.prepare import read_prepared
    from fluxray.model.lora import add_lora
    from fluxray.model.pipeline import attach_text_encoders, load_pipeline
    from fluxray.train.step import StepSpec, training_loss

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"dataset.resolutions=[{resolution}]"])
    ds = read_prepared(dataset)
    from PIL import Image

    sizes = [Image.open(p).size for p, _ in ds.items]
    items = make_items(sizes, cfg.dataset.resolutions)
    captions = [t for _, t in ds.items]
    pipe = load_pipeline(str(model), torch.float32, text_encoders=False)
    caches = build_caches(pipe, store=CacheStore(root, model_key(str(model), None), cfg.model.max_sequence_length),
                          images=[p for p, _ in ds.items], items=items, texts=captions + [""],
                          load_text_encoders=lambda: attach_text_encoders(pipe, str(model), torch.float32))
    tr = pipe.transformer
    params = add_lora(tr, cfg.lora, seed=0)
    opt = torch.optim.AdamW(params, lr=cfg.train.lr)
    spec = StepSpec(0.1159, 0.3611, 1.0, caption_dropout=cfg.dataset.caption_dropout)
    times = []
    for step in range(steps):
        t = time.perf_counter()
        batch = rank_batch(items, 1, 0, 1, 0, step)
        loss = training_loss(tr, batch, [captions[it.index] for it in batch], caches.latents, caches.texts, spec,
                             torch.Generator().manual_seed(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times[skip:])


def bench_overhead(ctx) -> dict:
    import torch

    from fluxray.train.job import run_job

    steps, skip = ctx.steps, ctx.skip
    # Same CPU threads on both sides: Ray gives a worker OMP_NUM_THREADS = its reserved CPUs.
    threads = min(2, os.cpu_count() or 1)
    cfg = _cfg(ctx.root, ctx.small_model, ctx.dataset, "bench-a", f"train.steps={steps}", "sample.every=0",
               f"save.every={steps}", f"validation.every={steps}", "distributed.workers=1",
               f"distributed.cpus_per_worker={threads}", f"dataset.resolutions=[{ctx.res}]", "train.ema=true")

    def named(name: str):
        return cfg.model_copy(update={"save": cfg.save.model_copy(update={"name": name})})

    # A shared machine drifts in speed by more than the overhead to be measured, so the sides
    # alternate: bare, fluxray, bare, fluxray, ..., bare; each fluxray run is judged against the
    # mean of the bare loops just before and just after it, and the rounds' median is the result.
    rounds = 1 if ctx.quick else 3
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    bare, ray_runs, local_runs, step_times = [], [], [], []
    try:
        bare.append(_bare_loop(ctx.small_model, ctx.dataset, ctx.root, steps, skip, ctx.res))
        for r in range(rounds):
            run_job(named(f"bench-a-{r}"), local=False)
            # The same loop without Ray (`--local`): splits the overhead into fluxray's and Ray Train's.
            run_job(named(f"bench-a-local-{r}"), local=True)
            bare.append(_bare_loop(ctx.small_model, ctx.dataset, ctx.root, steps, skip, ctx.res))
            ray_runs.append(_steady_seconds_per_step(ctx.root / "runs" / f"bench-a-{r}", skip))
            local_runs.append(_steady_seconds_per_step(ctx.root / "runs" / f"bench-a-local-{r}", skip))
            # The step as the worker times it: tells a slow step from slow bookkeeping between steps.
            step_times.append(_steady_seconds_per_step(ctx.root / "runs" / f"bench-a-{r}", skip, "step_time"))
    finally:
        torch.set_num_threads(before)
    floor = [(a + b) / 2 for a, b in zip(bare, bare[1:])]
    ratios = [f / b for f, b in zip(ray_runs, floor)]
    local_ratios = [f / b for f, b in zip(local_runs, floor)]
    return {"overhead_ratio": statistics.median(ratios), "overhead_ratios": ratios,
            "local_overhead_ratio": statistics.median(local_ratios), "local_overhead_ratios": local_ratios,
            "bare_s_per_step": bare, "fluxray_s_per_step": ray_runs, "fluxray_step_time_s": step_times,
            "fluxray_local_s_per_step": local_runs, "threads": threads, "rounds": rounds}


def bench_caches(ctx) -> dict:
    from fluxray.train.job import run_job

    out = {}
    for name, cached in (("cached", "true"), ("uncached", "false")):
        cfg = _cfg(ctx.root, ctx.random_flux, ctx.dataset, f"bench-b-{name}", f"train.steps={ctx.steps}",
                   "sample.every=0", f"save.every={ctx.steps}", f"validation.every={ctx.steps}",
                   "distributed.workers=1", f"dataset.cache_latents={cached}",
                   f"dataset.cache_text_embeddings={cached}", "dataset.resolutions=[256]",
                   "model.max_sequence_length=512")
        run_job(cfg, local=True)
        out[f"{name}_s_per_step"] = _steady_seconds_per_step(ctx.root / "runs" / f"bench-b-{name}", ctx.skip)
    out["speedup"] = out["uncached_s_per_step"] / out["cached_s_per_step"]
    return out


def bench_zero_memory(ctx) -> dict:
    """Transformer elements each of 2 workers holds: ZeRO-3 counted from DeepSpeed's partitions."""
    from diffusers import FluxTransformer2DModel

    from fluxray.train.job import run_job

    total = sum(p.numel() for p in FluxTransformer2DModel.from_pretrained(ctx.small_model,
                                                                         subfolder="transformer").parameters())
    out = {"transformer_params": total, "zero0_per_worker": [total, total]}  # stage 0 replicates the base
    cfg = _cfg(ctx.root, ctx.small_model, ctx.dataset, "bench-c-zero3", "train.steps=4", "sample.every=0",
               "save.every=4", "validation.every=4", "distributed.workers=2", "distributed.zero_stage=3",
               f"dataset.resolutions=[{ctx.res}]")
    shards = run_job(cfg, local=False)["zero3_shards"]
    # Each rank's shards; small tensors (norms, biases, the LoRA) are also kept whole ("persistent").
    out.update(zero3_partition_per_worker=[s["partition"] for s in shards],
               zero3_persistent_per_worker=[s["persistent"] for s in shards],
               zero3_fraction=[s["partition"] / total for s in shards])
    return out


def bench_submit_to_first_step(ctx) -> dict:
    """`ray job submit` to a running cluster, then wait for the run's first logged step."""
    from ray.job_submission import JobSubmissionClient

    name = "bench-d"
    client = JobSubmissionClient(ctx.dashboard)
    t0 = time.time()
    job = client.submit_job(
        entrypoint=(f"python jobs/train.py --config configs/tiny.yaml --set storage.root={ctx.root} "
                    f"--set model.path={ctx.random_flux} --set dataset.path={ctx.dataset} --set save.name={name} "
                    "--set train.steps=5 --set sample.every=0 --set validation.embedding_model=null --set save.every=5"),
        runtime_env={"working_dir": str(REPO), "excludes": [".venv", ".git", "test-artifacts"]})
    metrics = ctx.root / "runs" / name / "metrics.jsonl"
    first = None
    while time.time() - t0 < 600:
        if metrics.exists() and any('"loss"' in line for line in metrics.read_text().splitlines()):
            first = time.time() - t0
            break
        status = client.get_job_status(job)
        if status.is_terminal() and first is None and not metrics.exists():
            raise RuntimeError(f"job {job} ended {status}: {client.get_job_logs(job)[-2000:]}")
        time.sleep(0.2)
    while not client.get_job_status(job).is_terminal():
        time.sleep(0.5)
    return {"submit_to_first_step_s": first, "job_status": str(client.get_job_status(job))}


def bench_sampling_share(ctx) -> dict:
    """The default sample config (every 50 steps, the guide's 3 prompts, 20 steps, 1024²) on the random test model."""
    from fluxray.config import JobConfig
    from fluxray.train.job import run_job

    d = JobConfig().sample
    steps = 100 if not ctx.quick else 50
    if ctx.quick:  # CI's mode: the same path with small, short renders (the share it prints means nothing)
        d = d.model_copy(update={"width": 256, "height": 256, "steps": 4})

    def run(name: str, sample, local: bool) -> tuple[dict, float]:
        cfg = _cfg(ctx.root, ctx.random_flux, ctx.dataset, name, f"train.steps={steps}", f"save.every={steps}",
                   "distributed.workers=1", "dataset.resolutions=[256]")
        cfg = cfg.model_copy(update={"sample": sample})  # every 50 steps, the guide's 3 prompts, 20 steps, 1024²
        t = time.time()
        summary = run_job(cfg, local=local)
        return summary, time.time() - t

    summary, wall = run("bench-e", d, local=True)  # inline: the loop stops for every render
    out = {"wall_s": wall, "sample_s": summary["sample_seconds"], "sample_share": summary["sample_seconds"] / wall,
           "samplings": steps // d.every + 1}
    if not ctx.quick:  # the same renders again on a preview actor: minutes of CPU that CI's mode skips
        summary, wall = run("bench-e-actor", d.model_copy(update={"mode": "actor"}), local=False)
        held = summary["sample_seconds"] + summary["preview_wait_seconds"]  # stopped + waiting at the end
        out["actor"] = {"wall_s": wall, "sample_s": summary["sample_seconds"],
                        "render_s": summary["preview_render_seconds"], "wait_s": summary["preview_wait_seconds"],
                        "skipped": summary["previews_skipped"], "sample_share": held / wall}
    return out


def bench_gpu_mfu(ctx) -> dict:
    """FLUX.1-dev-sized transformer, random bf16 weights, rank-16 LoRA, batch 1: s/step, MFU and peak memory for
    a bf16, an int8 and an NF4 base at 512² and 1024² (gradient checkpointing off and on), against the memory plan."""
    import torch

    from fluxray.track.flops import find_gpu

    if not torch.cuda.is_available():
        out = {"skipped": "no CUDA device"}
        if ctx.quick:  # CI: the same code on the random test model's transformer, so a GPU run finds it working
            out["cpu_dry_run"] = _quantized_step_times(ctx.random_flux, torch.device("cpu"), (64,), 4, None)
        return out
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    model = _random_flux_dev(ctx.root / "models" / "flux-dev-random", dev)
    gpu_bytes = torch.cuda.get_device_properties(dev).total_memory
    return {"gpu": name, "gpu_memory_gib": gpu_bytes / 2**30, "known_gpu": bool(find_gpu(name)),
            **_quantized_step_times(model, dev, (512, 1024), ctx.gpu_steps, gpu_bytes)}


def _random_flux_dev(folder: Path, dev) -> Path:
    """A diffusers `transformer/` folder of FLUX.1-dev's config with random bf16 weights (23.8 GB on disk), so
    every base goes through fluxray's own loader, quantizing as it loads."""
    import torch
    from diffusers import FluxTransformer2DModel

    if (folder / "transformer" / "config.json").exists():
        return folder
    # Built on the GPU in bf16: 11.9 B random weights take many minutes to initialise on a CPU, and
    # 48 GB in fp32 before the cast.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with dev:
            tr = FluxTransformer2DModel(guidance_embeds=True)  # the default config is FLUX.1-dev's
    finally:
        torch.set_default_dtype(default)
    tr.to("cpu").save_pretrained(folder / "transformer", max_shard_size="5GB")
    del tr
    torch.cuda.empty_cache()
    return folder


def _quantized_step_times(model: Path, dev, resolutions, steps: int, gpu_bytes: int | None) -> dict:
    """Each base (`fluxray.model.quantize` loads int8 and NF4) through `_lora_step_times`, skipping a setting
    the memory plan says does not fit; the plan's peak beside each measured one."""
    import torch
    from diffusers import FluxTransformer2DModel

    from fluxray.advise.memory import Setting, model_configs, plan
    from fluxray.config import load_config
    from fluxray.model.quantize import load_transformer

    out = {}
    for quantize in ("none", "int8", "nf4"):
        cfg = load_config(None, [f"model.path={model}", f"model.quantize={quantize}", "lora.rank=16",
                                 "train.ema=false", "train.batch_size=1", "model.max_sequence_length=512"])
        models = model_configs(cfg)
        plans = {}
        for res in resolutions:
            for ckpt in (False, True):
                sized = cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"resolutions": [res]})})
                plans[(res, ckpt)] = plan(sized, Setting(quantize, 0, ckpt), models)
        if gpu_bytes and not any(p.fits(gpu_bytes) for p in plans.values()):
            out[quantize] = {"skipped": "the plan says no setting fits this GPU"}
            continue
        if quantize == "none":
            tr = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer", torch_dtype=torch.bfloat16)
            tr = tr.to(dev)
        else:
            tr = load_transformer(str(model), quantize, torch.bfloat16, device=dev)
        out[quantize] = _lora_step_times(tr, dev, plans, steps, gpu_bytes)
        del tr
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _lora_step_times(tr, dev, plans: dict, steps: int, gpu_bytes: int | None) -> dict:
    """Median s/step (after 3 warm-up steps), MFU and peak allocated memory of a rank-16 LoRA step, batch 1, bf16
    autocast over fp32 LoRA weights, at each (resolution, gradient checkpointing) the plans list."""
    import torch

    from fluxray.config import LoraConfig
    from fluxray.model.lora import add_lora
    from fluxray.track.flops import lora_step_flops, peak_flops
    from fluxray.train.flow import latent_image_ids

    cuda = dev.type == "cuda"
    params = add_lora(tr, LoraConfig(rank=16))
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    peak = peak_flops(torch.cuda.get_device_name(dev)) if cuda else None
    cfg, text_tokens, out = tr.config, 512, {}
    tr.train()
    for (res, ckpt), planned in plans.items():
        key = f"{res}{'+ckpt' if ckpt else ''}"
        if gpu_bytes and not planned.fits(gpu_bytes):
            out[key] = {"skipped": f"planned {planned.peak / 2**30:.1f} GiB does not fit"}
            continue
        if ckpt:
            tr.enable_gradient_checkpointing()
        else:
            tr.disable_gradient_checkpointing()
        n = (res // 16) ** 2
        x = torch.randn(1, n, cfg.in_channels, device=dev, dtype=torch.bfloat16)
        txt = torch.randn(1, text_tokens, cfg.joint_attention_dim, device=dev, dtype=torch.bfloat16)
        pooled = torch.randn(1, cfg.pooled_projection_dim, device=dev, dtype=torch.bfloat16)
        ids = latent_image_ids(res // 8, res // 8, dev, torch.bfloat16)
        tids = torch.zeros(text_tokens, 3, device=dev, dtype=torch.bfloat16)
        t = torch.tensor([0.5], device=dev, dtype=torch.bfloat16)
        g = torch.tensor([1.0], device=dev, dtype=torch.bfloat16)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for _ in range(max(steps, 4)):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                pred = tr(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                          guidance=g, img_ids=ids, txt_ids=tids, return_dict=False)[0]
            pred.float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        s = statistics.median(times[3:])
        flops = lora_step_flops(cfg, res, res, text_tokens, 1)
        measured = torch.cuda.max_memory_allocated(dev) if cuda else None
        out[key] = {"s_per_step": s, "tflop_per_step": flops / 1e12, "mfu": flops / s / peak if peak else None,
                    "max_mem_gib": measured / 2**30 if cuda else None, "plan_gib": planned.steps / 2**30,
                    "measured_over_plan": measured / planned.steps if cuda else None}
        del x, txt, pooled, pred
    return out


BENCHES = {"a": bench_overhead, "b": bench_caches, "c": bench_zero_memory, "d": bench_submit_to_first_step,
           "e": bench_sampling_share, "f": bench_gpu_mfu}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced mode for CI: few steps, same code paths")
    ap.add_argument("--only", default="abcdef", help="which benchmarks to run, e.g. 'ab' or 'f'")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--address", help="use this running Ray cluster (GCS address) instead of starting one")
    ap.add_argument("--dashboard", help="with --address: its dashboard URL (for `ray job submit`)")
    args = ap.parse_args()

    from fluxray.data.prepare import prepare_dataset
    from fluxray.model.tiny import ensure_random_flux

    work = Path(tempfile.mkdtemp(prefix="fluxray-bench-"))
    ctx = argparse.Namespace(quick=args.quick, root=work / "root", steps=12 if args.quick else 60,
                             skip=4 if args.quick else 10, res=128, gpu_steps=6 if args.quick else 20)
    ctx.random_flux = ensure_random_flux(work / "models" / "tiny")
    # Bigger than the test model so a step's compute dominates its bookkeeping, still CPU-sized.
    ctx.small_model = ensure_random_flux(work / "models" / "small", double_blocks=2, single_blocks=4, heads=8)
    ctx.dataset = work / "dataset"
    prepare_dataset(REPO / "samples" / "pxco", REPO / "samples" / "pxco" / "captions.json", trigger_word="pxco",
                    out_dir=ctx.dataset)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
               "quick": args.quick}
    need_cluster = any(k in args.only for k in "acd") or ("e" in args.only and not args.quick)
    node = None
    if need_cluster:  # (f) runs on a bare GPU box: no Ray there
        import ray
    try:
        if need_cluster and args.address:
            ctx.address, ctx.dashboard = args.address, args.dashboard
            ray.init(address=ctx.address, log_to_driver=False, configure_logging=False)
        elif need_cluster:
            from fluxray.cluster import start_head

            node = start_head(Path("/tmp") / f"rb{os.getpid()}")
            ctx.address, ctx.dashboard = node.address, node.dashboard_url
            ray.init(address=ctx.address, log_to_driver=False, configure_logging=False)
        for key in args.only:
            t = time.time()
            print(f"[{key}] {BENCHES[key].__doc__.strip().splitlines()[0] if BENCHES[key].__doc__ else key} ...",
                  flush=True)
            results[key] = BENCHES[key](ctx)
            results[key]["bench_wall_s"] = time.time() - t
            print(f"[{key}] {json.dumps(results[key], default=str)}", flush=True)
    finally:
        if need_cluster and ray.is_initialized():
            ray.shutdown()
        if node is not None:
            node.stop()
    print(json.dumps(results, indent=1, default=str))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
