"""The whole recipe in one process: it learns, it leaves the base alone, and its previews are
exactly what the generate function makes from the saved LoRA file."""

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


def _cfg(tiny_model, prepared_sample, root, *extra):
    from pathlib import Path

    from fluxray.config import load_config

    repo = Path(__file__).resolve().parents[2]
    return load_config(repo / "configs" / "tiny.yaml", [
        f"model.path={tiny_model}", f"dataset.path={prepared_sample}", f"storage.root={root}",
        "save.name=learn", *extra])


@pytest.fixture(scope="module")
def run200(tmp_path_factory, tiny_model, prepared_sample):
    root = tmp_path_factory.mktemp("learn")
    cfg = _cfg(tiny_model, prepared_sample, root, "train.steps=200", "validation.every=50", "sample.every=200",
               "save.every=100", 'sample.prompts=["[trigger], professional portrait photo"]',
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


def test_lora_file_has_diffusers_keys_and_metadata(run200):
    root, _, summary = run200
    path = root / "loras" / "learn.safetensors"
    assert summary["lora"] == str(path)
    tensors = load_file(str(path))
    assert tensors and all(k.startswith("transformer.") and "lora" in k for k in tensors)
    from fluxray.model.lora import read_lora_metadata

    meta = read_lora_metadata(path)
    assert meta["trigger_word"] == "pxco" and meta["steps"] == "200" and meta["rank"] == "4"


def test_final_preview_is_what_generate_makes_from_the_lora_file(run200, tiny_model):
    root, cfg, _ = run200
    prompt = cfg.sample_prompts("pxco")[0]
    preview = np.asarray(__import__("PIL.Image").Image.open(root / "runs" / "learn" / "samples" / "step000200-sample_0.png"))
    pipe = FluxPipeline.from_pretrained(tiny_model)
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


def test_training_step_leaves_the_base_weights_bit_identical(tiny_model, tmp_path):
    """Drive the real step through the real DeepSpeed engine and compare every base tensor."""
    from fluxray.config import JobConfig, LoraConfig
    from fluxray.data.buckets import Item
    from fluxray.model.generate import PromptEmbeds
    from fluxray.model.lora import add_lora
    from fluxray.train.engine import init_engine, init_single_process_group
    from fluxray.train.step import StepSpec, training_loss

    pipe = FluxPipeline.from_pretrained(tiny_model)
    tr = pipe.transformer
    before = {n: p.detach().clone() for n, p in tr.named_parameters()}
    params = add_lora(tr, LoraConfig(rank=4))
    cfg = JobConfig.model_validate({"train": {"lr": 1e-2}})
    init_single_process_group()
    engine, _, _ = init_engine(tr, params, cfg, 1, 0, False)
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


def test_a_preview_step_between_saves_keeps_its_lora_file(tiny_model, prepared_sample, tmp_path):
    """`<run>@<step>` needs the file of every previewed step, not only of the save steps."""
    cfg = _cfg(tiny_model, prepared_sample, tmp_path, "train.steps=4", "save.every=4", "sample.every=2",
               'sample.prompts=["[trigger], portrait"]', "sample.steps=2", "distributed.workers=1")
    run_job(cfg, local=True)
    loras = tmp_path / "runs" / "learn" / "loras"
    assert (loras / "learn-step000002.safetensors").is_file()
    assert not (loras / "learn-step000002.kohya.safetensors").exists()  # a preview file, not a save

    prompt = cfg.sample_prompts("pxco")[0]
    pipe = FluxPipeline.from_pretrained(tiny_model)
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

    judge = SubjectJudge(resolve_embedding_model("tiny", cfg.storage_root),
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
