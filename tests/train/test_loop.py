"""The whole recipe in one process: it learns, it leaves the base alone, and its previews are
exactly what the generate function makes from the saved LoRA file; then each of its phases alone
(data, model, caches, LoRA and engine, resume, the step loop, finish), the bf16 path on CPU
included."""

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from fluxray.model.generate import encode_prompt, generate
from fluxray.model.lora import set_lora_scale
from fluxray.track.local import read_metrics
from fluxray.train.job import run_job


def _cfg(random_flux, prepared_sample, root, quick_recipe, *extra):
    from pathlib import Path

    from fluxray.config import load_config

    repo = Path(__file__).resolve().parents[2]
    return load_config(repo / "configs" / "tiny.yaml", [
        f"model.path={random_flux}", f"dataset.path={prepared_sample}", f"storage.root={root}",
        "save.name=learn", *quick_recipe, *extra])


@pytest.fixture(scope="module")
def run200(tmp_path_factory, random_flux, prepared_sample, quick_recipe):
    root = tmp_path_factory.mktemp("learn")
    cfg = _cfg(random_flux, prepared_sample, root, quick_recipe, "train.steps=200", "validation.every=50",
               "sample.every=200", "save.every=100", 'sample.prompts=["[trigger], professional portrait photo"]',
               "distributed.workers=1")
    summary = run_job(cfg, local=True)
    return root, cfg, summary


def test_200_steps_lower_the_fixed_noise_validation_loss(run200):
    root, _, summary = run200
    val = [(m["step"], m["val_loss"]) for m in read_metrics(root / "runs" / "learn") if "val_loss" in m]
    steps = [s for s, _ in val]
    assert steps == [0, 50, 100, 150, 200]
    first, last = val[0][1], val[-1][1]
    assert last < 0.9 * first, f"validation loss {first:.4f} -> {last:.4f}"
    assert summary["steps"] == 200


def test_train_validates_saves_and_previews_on_their_schedules(run200):
    """The step loop's calendar: every step logs loss, lr and grad_norm; saves (LoRA file, kohya copy,
    checkpoint) every `save.every`, previews every `sample.every` and at step 0."""
    root, _, _ = run200
    run = root / "runs" / "learn"
    steps = [m for m in read_metrics(run) if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 201))
    assert all(np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 and m["lr"] == 1e-3 for m in steps)
    assert sorted(p.name for p in (run / "loras").iterdir()) == [
        "learn-step000100.kohya.safetensors", "learn-step000100.safetensors",
        "learn-step000200.kohya.safetensors", "learn-step000200.safetensors"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step000100", "step000200"]
    assert sorted({p.name.split("-")[0] for p in (run / "samples").glob("step*.png")}) == ["step000000", "step000200"]


def test_finish_makes_the_last_step_file_the_final_lora(run200):
    root, _, summary = run200
    run = root / "runs" / "learn"
    final = root / "loras" / "learn.safetensors"
    assert final.read_bytes() == (run / "loras" / "learn-step000200.safetensors").read_bytes()
    assert (root / "loras" / "learn.kohya.safetensors").read_bytes() == (
        run / "loras" / "learn-step000200.kohya.safetensors").read_bytes()
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 200 and status["lora"] == str(final)
    assert summary["start_step"] == 0 and summary["steps"] == 200 and summary["lora"] == str(final)


def test_lora_file_has_diffusers_keys_and_metadata(run200):
    root, _, summary = run200
    path = root / "loras" / "learn.safetensors"
    assert summary["lora"] == str(path)
    tensors = load_file(str(path))
    assert tensors and all(k.startswith("transformer.") and "lora" in k for k in tensors)
    from fluxray.model.lora import read_lora_metadata

    meta = read_lora_metadata(path)
    assert meta["trigger_word"] == "pxco" and meta["steps"] == "200" and meta["rank"] == "4"


def test_final_preview_is_what_generate_makes_from_the_lora_file(run200, random_flux):
    root, cfg, _ = run200
    prompt = cfg.sample_prompts("pxco")[0]
    preview = np.asarray(__import__("PIL.Image").Image.open(root / "runs" / "learn" / "samples" / "step000200-sample_0.png"))
    pipe = FluxPipeline.from_pretrained(random_flux)
    pipe.set_progress_bar_config(disable=True)
    embeds = encode_prompt(pipe, prompt.prompt, cfg.model.max_sequence_length)
    kw = dict(seed=prompt.seed, width=prompt.width, height=prompt.height, steps=prompt.steps, guidance=prompt.guidance)
    base = np.asarray(generate(pipe, embeds, **kw))
    pipe.load_lora_weights(str(root / "loras" / "learn.safetensors"), adapter_name="learn")
    set_lora_scale(pipe.transformer, 1.0, adapter="learn")
    with_lora = np.asarray(generate(pipe, embeds, **kw))
    assert np.array_equal(with_lora, preview)
    assert not np.array_equal(base, with_lora)
    step0 = np.asarray(__import__("PIL.Image").Image.open(root / "runs" / "learn" / "samples" / "step000000-sample_0.png"))
    assert np.array_equal(step0, base)  # step 0 previews the base model


def test_training_step_leaves_the_base_weights_bit_identical(random_flux, tmp_path):
    """Drive the real step through the real DeepSpeed engine and compare every base tensor."""
    from fluxray.config import JobConfig, LoraConfig
    from fluxray.data.buckets import Item
    from fluxray.model.generate import PromptEmbeds
    from fluxray.model.lora import add_lora, lora_named_params
    from fluxray.train.engine import init_engine, init_single_process_group
    from fluxray.train.step import StepSpec, training_loss

    pipe = FluxPipeline.from_pretrained(random_flux)
    tr = pipe.transformer
    before = {n: p.detach().clone() for n, p in tr.named_parameters()}
    params = add_lora(tr, LoraConfig(rank=4))
    cfg = JobConfig.model_validate({"train": {"lr": 1e-2}})
    init_single_process_group()
    engine = init_engine(tr, params, list(lora_named_params(tr)), cfg, 1, 0).engine
    item = Item(0, (64, 64))
    latents = {item: (torch.randn(16, 8, 8), torch.zeros(16, 8, 8))}
    embeds = {"pxco, a man": PromptEmbeds(torch.randn(1, 32, 32), torch.randn(1, 32)), "": PromptEmbeds(torch.randn(1, 32, 32), torch.randn(1, 32))}
    spec = StepSpec(shift_factor=0.1159, scaling_factor=0.3611, guidance=1.0)
    lora_before = [p.detach().clone() for p in params]
    for i in range(5):
        loss = training_loss(engine, [item], ["pxco, a man"], latents, embeds, spec, torch.Generator().manual_seed(i))
        engine.backward(loss)
        engine.step()
    after = {n.replace(".base_layer", ""): p for n, p in tr.named_parameters() if "lora_" not in n}
    assert set(after) == set(before)
    for n, p in after.items():
        assert torch.equal(p, before[n]), n
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, params))


def test_a_preview_step_between_saves_keeps_its_lora_file(random_flux, prepared_sample, quick_recipe, tmp_path):
    """`<run>@<step>` needs the file of every previewed step, not only of the save steps."""
    cfg = _cfg(random_flux, prepared_sample, tmp_path, quick_recipe, "train.steps=4", "save.every=4",
               "sample.every=2", 'sample.prompts=["[trigger], portrait"]', "sample.steps=2", "distributed.workers=1")
    run_job(cfg, local=True)
    loras = tmp_path / "runs" / "learn" / "loras"
    assert (loras / "learn-step000002.safetensors").is_file()
    assert not (loras / "learn-step000002.kohya.safetensors").exists()  # a preview file, not a save

    prompt = cfg.sample_prompts("pxco")[0]
    pipe = FluxPipeline.from_pretrained(random_flux)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(loras / "learn-step000002.safetensors"), adapter_name="s2")
    set_lora_scale(pipe.transformer, 1.0, adapter="s2")
    img = generate(pipe, encode_prompt(pipe, prompt.prompt, cfg.model.max_sequence_length), seed=prompt.seed,
                   width=prompt.width, height=prompt.height, steps=prompt.steps, guidance=prompt.guidance)
    preview = __import__("PIL.Image").Image.open(tmp_path / "runs" / "learn" / "samples" / "step000002-sample_0.png")
    assert np.array_equal(np.asarray(img), np.asarray(preview))


def test_validation_holds_the_files_weights_then_gives_the_live_ones_back():
    """`_holding` puts the EMA (the weights the LoRA file gets) into the LoRA for validation and
    restores the live weights bit for bit, so training goes on from where it was."""
    from fluxray.train.loop import _holding

    live = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    before = [p.detach().clone() for p in live]
    ema = [torch.zeros(4, 3), torch.ones(5)]
    with _holding(live, ema, stage=0):
        assert all(torch.equal(p, e) for p, e in zip(live, ema))
    assert all(torch.equal(p, b) for p, b in zip(live, before))
    with _holding(live, None, stage=0):  # EMA off: the live weights are the file's
        assert all(torch.equal(p, b) for p, b in zip(live, before))


def test_previews_are_scored_against_the_training_images(tiny_config):
    """With `validation.embedding_model`, each preview step logs `sample_similarity`: the previews
    of the prompts with the trigger word, scored against the training images."""
    from PIL import Image

    from fluxray.advise.similarity import SubjectJudge, resolve_embedding_model
    from fluxray.data.prepare import read_prepared

    cfg = tiny_config("distributed.workers=1", "train.steps=4", "sample.every=2", "save.every=4",
                      "sample.width=64", "sample.height=64", "sample.steps=2", "validation.embedding_model=tiny",
                      'sample.prompts=["[trigger], portrait photo", "a red car on a street"]')
    run_job(cfg, local=True)
    run = cfg.storage_root / "runs" / cfg.save.name
    scores = {r["step"]: r["sample_similarity"] for r in read_metrics(run) if "sample_similarity" in r}
    assert sorted(scores) == [0, 2, 4]

    judge = SubjectJudge(resolve_embedding_model("tiny"),
                         [p for p, _ in read_prepared(cfg.dataset.path).items], [True, False])
    for step, value in scores.items():
        shown = [Image.open(run / "samples" / f"step{step:06d}-sample_{k}.png").convert("RGB") for k in (0, 1)]
        assert value == pytest.approx(judge.score(shown), abs=1e-5)  # the car is not scored
        assert -1.0 <= value <= 1.0
    status = json.loads((run / "status.json").read_text())
    assert status["similarity"].startswith("sample similarity to the training images:") and "step 4" in status["similarity"]


def test_the_validation_loss_is_the_loss_of_the_ema_the_file_holds(tiny_config, tmp_path):
    """EMA does not change training, only what is saved: the same run with EMA on and off trains the
    same live weights, so a validation of the live weights would log the same losses. It logs the
    loss of the EMA instead, equal at step 0 (EMA = the initial weights) and apart once it lags."""
    def val_losses(ema: str, root) -> dict[int, float]:
        cfg = tiny_config("distributed.workers=1", "train.steps=6", "sample.every=0", "save.every=6",
                          "validation.every=6", f"train.ema={ema}", "train.ema_decay=0.9", root=root)
        run_job(cfg, local=True)
        return {r["step"]: r["val_loss"] for r in read_metrics(cfg.storage_root / "runs" / cfg.save.name)
                if "val_loss" in r}

    with_ema, live = val_losses("true", tmp_path / "ema"), val_losses("false", tmp_path / "live")
    assert sorted(with_ema) == sorted(live) == [0, 6]
    assert with_ema[0] == live[0]
    assert abs(with_ema[6] - live[6]) > 1e-6


# -- the recipe, one phase at a time ---------------------------------------------------------

PHASES = ["setup_data", "load_model", "fill_caches", "setup_lora", "resume"]


def _recipe(cfg, until: str, ctx=None):
    """A `LoraRecipe` run through its phases up to `until` (in this process, a world of one)."""
    from fluxray.train.engine import init_single_process_group
    from fluxray.train.loop import LoraRecipe, WorkerContext

    init_single_process_group()
    recipe = LoraRecipe(cfg, ctx or WorkerContext())
    for phase in PHASES[:PHASES.index(until) + 1]:
        getattr(recipe, phase)()
    return recipe


def test_setup_data_buckets_a_non_square_dataset(tiny_config, non_square_sample):
    from fluxray.errors import ConfigError

    cfg = tiny_config(f"dataset.path={non_square_sample}", "dataset.resolutions=[80]", "distributed.workers=1")
    r = _recipe(cfg, "setup_data")
    assert len(r.data.images) == len(r.data.captions) == 18 and r.data.trigger == "pxco"
    assert sorted({it.size for it in r.data.items}) == [(64, 80), (80, 64)]  # portraits and landscapes
    assert [it.index for it in r.data.items] == list(range(18))
    assert all(c.startswith("pxco") for c in r.data.captions)
    assert r.data.prompts[0].prompt.startswith("pxco, ")
    assert len(r.val) == cfg.validation.images * len(cfg.validation.sigmas) and r.my_val == r.val
    with pytest.raises(ConfigError, match="train.batch_size"):  # 9 images per bucket: no batch of 10
        _recipe(tiny_config(f"dataset.path={non_square_sample}", "dataset.resolutions=[80]", "train.batch_size=10",
                            "distributed.workers=1"), "setup_data")


def test_load_model_holds_the_base_in_model_dtype_without_its_text_encoders(tiny_config):
    r = _recipe(tiny_config("model.dtype=bf16", "distributed.workers=1"), "load_model")
    assert r.pipe.text_encoder is None and r.pipe.text_encoder_2 is None  # T5 is loaded only for a missing caption
    assert {p.dtype for p in r.pipe.transformer.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in r.pipe.transformer.parameters()} == {"cpu"}
    assert (r.precision.base, r.precision.compute) == (torch.bfloat16, torch.bfloat16)


def test_fill_caches_encodes_each_item_and_text_once_then_drops_the_encoders(tiny_config, non_square_sample):
    cfg = tiny_config(f"dataset.path={non_square_sample}", "dataset.resolutions=[80]", "distributed.workers=1")
    r = _recipe(cfg, "fill_caches")
    texts = set(r.data.captions) | {""} | {p.prompt for p in r.data.prompts}
    assert set(r.caches.latents) == set(r.data.items) and set(r.caches.texts) == texts
    for it in r.data.items:  # (C, h, w): a 64x80 portrait is a 10x8 latent, an 80x64 landscape 8x10
        assert r.caches.latents[it][0].shape == (16, it.size[1] // 8, it.size[0] // 8)
    assert r.encoders_loaded and r.caches.stats.latents_computed == 18 and r.caches.stats.texts_computed == len(texts)
    assert r.pipe.text_encoder is None and r.pipe.text_encoder_2 is None and r.pipe.vae.encoder is None
    again = _recipe(cfg, "fill_caches")  # the same job again: all from the cache, T5 never loaded
    assert not again.encoders_loaded and again.caches.stats.latents_reused == 18
    assert all(torch.equal(again.caches.latents[it][0], r.caches.latents[it][0]) for it in r.data.items)


def test_setup_lora_trains_an_fp32_lora_over_a_bf16_base(tiny_config, capsys):
    """The precision design, on CPU: the base in bf16, the LoRA and its EMA in fp32, DeepSpeed's bf16
    mode off (so the module's LoRA is the value AdamW updates), gradient checkpointing on when asked."""
    r = _recipe(tiny_config("model.dtype=bf16", "train.gradient_checkpointing=on", "distributed.workers=1"),
                "setup_lora")
    tr = r.lora.module
    assert tr.is_gradient_checkpointing and not r.lora.engine.bfloat16_enabled()
    lora_ids = {id(p) for p in r.lora.params}
    assert {p.dtype for p in tr.parameters() if id(p) not in lora_ids} == {torch.bfloat16}
    assert not any(p.requires_grad for p in tr.parameters() if id(p) not in lora_ids)
    assert {(p.dtype, p.requires_grad) for p in r.lora.params} == {(torch.float32, True)}
    assert all(e.dtype == torch.float32 and e.device == p.device and torch.equal(e, p)
               for e, p in zip(r.lora.ema, r.lora.params))
    assert (r.spec.dtype, r.spec.autocast) == (torch.bfloat16, torch.bfloat16) and r.lora.stage == 0
    out = capsys.readouterr().out
    assert "ZeRO stage 0: distributed.zero_stage=0 in the config" in out
    assert "precision: base weights bf16, LoRA + AdamW state + EMA fp32, forward in bf16 autocast" in out


def test_a_bf16_step_on_cpu_keeps_a_1e_5_update_in_the_exported_lora(tiny_config):
    """The forward runs in bf16; the gradients, AdamW's moments and the LoRA stay fp32, so an update
    of 1e-5 reaches the LoRA file: on lora_A's values (~0.25) bf16 (spacing 2e-3 there) would round it away."""
    r = _recipe(tiny_config("model.dtype=bf16", "train.lr=1e-5", "train.ema=false", "save.dtype=fp32",
                            "train.gradient_checkpointing=on", "distributed.workers=1"), "setup_lora")
    seen = []
    base = r.lora.module.transformer_blocks[0].attn.to_q.base_layer
    base.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = r.file_tensors()
    r.train_step(0)  # B leaves zero; A gets a gradient only once B is not zero
    r.train_step(1)
    assert seen and set(seen) == {torch.bfloat16}  # the forward (and its checkpointed recompute) in bf16
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in r.lora.params)
    adam = r.lora.adam_state()
    assert {t.dtype for k in ("exp_avg", "exp_avg_sq") for t in adam[k]} == {torch.float32}
    assert {s["exp_avg"].dtype for s in r.lora.adamw.state.values()} == {torch.float32}
    after = r.file_tensors()
    for k in (k for k in after if "lora_A" in k):  # AdamW moves each weight by at most about lr
        delta = (after[k] - before[k]).abs()
        assert after[k].dtype == torch.float32 and before[k].abs().mean() > 0.1
        assert 0 < delta.max() <= 1.5e-5 and (delta > 0).float().mean() > 0.9, k
        # Held in bf16, (nearly) every one of these updates would have been rounded away.
        assert (after[k].bfloat16() == before[k].bfloat16()).float().mean() > 0.9, k


def test_gradient_checkpointing_changes_the_memory_not_the_step(tiny_config):
    """Recomputed activations give the LoRA the same gradients (a checkpoint that cut them off would
    train nothing, silently)."""
    norms, loras = [], []
    for setting in ("off", "on"):
        r = _recipe(tiny_config(f"train.gradient_checkpointing={setting}", "distributed.workers=1", "train.ema=false"),
                    "setup_lora")
        assert r.lora.module.is_gradient_checkpointing == (setting == "on")
        r.train_step(0)
        norms.append(r.lora.grad_norm)
        loras.append(r.file_tensors())
    assert norms[0] > 0 and norms[1] == pytest.approx(norms[0], rel=1e-5)
    assert all(torch.allclose(loras[0][k], loras[1][k], atol=1e-7) for k in loras[0])


def test_resume_restores_a_local_or_a_ray_written_checkpoint(tiny_config, capsys):
    """`resume` puts the step, the LoRA, AdamW's state and the validation curve back; `--local` finds the
    run's newest checkpoint also where its Ray workers wrote it (`<root>/ray/<name>/checkpoint-*`)."""
    import shutil

    from fluxray.train.checkpoint import read_checkpoint
    from fluxray.train.job import latest_checkpoint, run_local
    from fluxray.train.loop import WorkerContext

    cfg = tiny_config("distributed.workers=1", "train.steps=2", "save.every=2", "sample.every=0",
                      "validation.every=2", "train.lr_scheduler=linear")
    run_local(cfg)
    local = cfg.storage_root / "runs" / cfg.save.name / "checkpoints" / "step000002"
    assert latest_checkpoint(cfg) == local
    saved = read_checkpoint(local)

    r = _recipe(tiny_config("distributed.workers=1", "train.steps=4", "train.lr_scheduler=linear"), "resume",
                WorkerContext(resume_dir=local))
    assert r.start == 2 and [s for s, _ in r.watch.points] == [0, 2]
    assert all(torch.equal(v, saved.lora[n]) for n, v in zip(r.lora.names, r.lora.values()))
    assert all(torch.equal(m, saved.adam["exp_avg"][n]) for n, m in zip(r.lora.names, r.lora.adam_state()["exp_avg"]))
    out = capsys.readouterr().out
    assert f"resumed from {local} at step 2" in out
    # train.steps 2 -> 4 moves the linear schedule's end: said, with both LRs.
    assert "resume: the LR of step 3 is 0.0005, not the checkpoint's 0: train.lr or its schedule changed" in out

    ray_dir = cfg.storage_root / "ray" / cfg.save.name / "checkpoint-step000002"
    ray_dir.parent.mkdir(parents=True)
    shutil.move(local, ray_dir)
    assert latest_checkpoint(cfg) == ray_dir
    summary = run_local(tiny_config("distributed.workers=1", "train.steps=3", "save.every=3", "sample.every=0",
                                    "train.lr_scheduler=linear"), resume=True)
    assert summary["start_step"] == 2 and summary["steps"] == 3


def test_the_logged_grad_norm_is_the_norm_of_the_first_steps_gradients(tiny_config, random_flux):
    """`grad_norm` in metrics.jsonl (NaN on every step before), against the same first step computed with
    plain autograd on a LoRA that never saw DeepSpeed."""
    from fluxray.model.lora import add_lora
    from fluxray.train.step import training_loss

    cfg = tiny_config("distributed.workers=1", "train.steps=2", "save.every=2", "sample.every=0")
    run_job(cfg, local=True)
    rows = [m for m in read_metrics(cfg.storage_root / "runs" / cfg.save.name) if "grad_norm" in m]
    assert [m["step"] for m in rows] == [1, 2] and all(np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in rows)

    r = _recipe(cfg, "fill_caches")  # the run's data, caches and step settings; the step below is plain torch
    tr = FluxPipeline.from_pretrained(random_flux).transformer
    params = add_lora(tr, cfg.lora, seed=cfg.train.seed)
    batch, captions, gen = r.micro_batch(0)
    training_loss(tr, batch, captions, r.caches.latents, r.caches.texts, r.spec, gen).backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
    assert rows[0]["grad_norm"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", ["int8", "fp8", "nf4"])
def test_the_recipe_trains_on_a_quantized_base_and_its_lora_works_on_the_plain_model(kind, tiny_config, random_flux,
                                                                                     capsys):
    """load_model quantizes the block linears as they load; under the DeepSpeed engine they keep their
    type and bytes, the precision design holds (fp32 LoRA and AdamW, bf16 autocast, the rest of the base
    bf16), the fixed-noise validation loss falls, and the file changes a plain FluxPipeline's image."""
    import numpy as np

    from fluxray.advise.memory import base_bytes
    from fluxray.model.generate import generate
    from fluxray.model.pipeline import load_pipeline
    from fluxray.model.quantize import module_bytes, quantized_kind
    from fluxray.train.loop import WorkerContext

    cfg = tiny_config(f"model.quantize={kind}", "model.dtype=bf16", "distributed.workers=1", "train.steps=30",
                      "train.lr=3e-2", "validation.every=30", "save.every=30", "sample.every=0", "train.ema=false")
    r = _recipe(cfg, "resume", WorkerContext(checkpoint_dir=lambda step: cfg.storage_root / "checkpoints" / str(step)))
    tr = r.lora.module
    dims = dict(tr.config)
    blocks = [m for n, m in tr.named_modules() if n.startswith(("transformer_blocks.", "single_transformer_blocks."))
              and hasattr(m, "base_layer")]
    assert blocks and all(quantized_kind(m.base_layer.weight) == kind for m in blocks)
    lora_ids = {id(p) for p in r.lora.params}
    assert module_bytes(tr)[kind] + sum(4 * p.numel() for p in r.lora.params) + sum(
        2 * p.numel() for p in tr.parameters() if id(p) not in lora_ids) == base_bytes(dims, kind) + sum(
        4 * p.numel() for p in r.lora.params)  # the plan's bytes: quantized blocks, the rest bf16
    assert {p.dtype for p in tr.parameters() if id(p) not in lora_ids} == {torch.bfloat16}
    assert {(p.dtype, p.requires_grad) for p in r.lora.params} == {(torch.float32, True)}
    assert r.spec.autocast == torch.bfloat16 and not r.lora.engine.bfloat16_enabled()
    out = capsys.readouterr().out
    assert f"precision: base weights bf16 (block linears {kind}), LoRA + AdamW state + EMA fp32" in out
    assert "memory plan: peak GPU memory per worker: " in out and f"{kind} base, ZeRO-0" in out

    before = r.validate(0)
    r.train()
    summary = r.finish()
    assert r.validate(r.done) < 0.9 * before
    assert summary["base_bytes"][kind] == module_bytes(tr)[kind]  # the base is what it was
    assert summary["memory_plan"]["setting"].startswith(f"{kind} base")

    plain = load_pipeline(str(random_flux), torch.bfloat16)
    embeds = r.caches.texts[r.data.captions[0]]
    kw = dict(seed=3, width=64, height=64, steps=2, guidance=3.5)
    image = np.asarray(generate(plain, embeds, **kw))
    plain.load_lora_weights(summary["lora"], adapter_name="q")
    assert not np.array_equal(np.asarray(generate(plain, embeds, **kw)), image)
