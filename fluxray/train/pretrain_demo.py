"""Pretrain the demo model (`model.path: tiny`): a small FLUX.1 pipeline that draws generic people
from their captions, and the likeness embedder that scores its previews.

    python -m fluxray.train.pretrain_demo fluxray/model/weights --threads 1   # what ships (see below)
    fluxray make-demo-model DIR [--seed 0] [--quick]                      # the same, from the CLI

Four stages, all seeded, on drawn portraits of generic people (`fluxray.data.sample.generic_portraits`:
varied hair, beards, skin, glasses, clothes, backgrounds and framing, never the pxco man):
1. a VAE in FLUX's layout (16 latent channels, 8x down) learns to reconstruct them;
2. the mean and spread of its latents become the pipeline's `shift_factor` and `scaling_factor`;
3. the transformer learns to draw a portrait from its caption, read by the (frozen, random-weight)
   CLIP and T5 text encoders, with the rectified-flow loss fluxray trains LoRAs with (`fluxray.train.flow`);
4. a CLIP vision model learns to tell people apart by who they are (hair colour and style, beard,
   skin, glasses, man or woman), not by clothes, background or framing: the likeness embedding.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import string
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fluxray.data.sample import Portrait, generic_portraits, likeness_labels
from fluxray.model.demo import DEMO_MAX_SEQUENCE_LENGTH, LIKENESS_IMAGE_SIZE, demo_dir_names

# The shipped v1 weights (fluxray/model/weights/, with demo-flux-v1-build.json, what the build measured)
# are `build(OUT, Recipe(), vae_from=VAE)`: the VAE of an earlier run of this recipe's stage 1 (2800
# steps, about 18 min), then the transformer (12000 steps) and the likeness embedder in 33 min, on the
# 2-core CPU machine with one torch thread: the whole Recipe() takes about 55 min there. The transformer
# learns slowly: at 1500 steps the prompts changed its pictures by 7 of 255, at 4000 by 16, at 12000 by
# 24 (flux loss 0.40, 0.28, 0.22). A rebuild is a new version (bump `fluxray.model.demo.DEMO_VERSION`);
# its quality is what tests/model/test_demo.py measures, not its bits.


@dataclass(frozen=True)
class Recipe:
    """Sizes and steps of the four stages; `quick()` is a smoke run of the same code."""

    seed: int = 0
    images: int = 6000  # drawn portraits to train on
    size: int = 64  # their side in pixels: the demo trains and previews at this size
    vae_channels: tuple[int, int, int, int] = (16, 32, 64, 64)
    vae_steps: int = 2800
    vae_full_steps: int = 400  # the last steps see whole pictures; the others 32 px crops, 4x cheaper
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl: float = 1e-4  # KL weight per latent element: a smooth latent space, a small posterior spread
    double_blocks: int = 2
    single_blocks: int = 4
    heads: int = 4
    head_dim: int = 32
    flux_steps: int = 12000
    flux_batch: int = 16
    flux_lr: float = 1.5e-3
    flux_timestep_shift: float = 2.0
    caption_dropout: float = 0.1
    likeness_steps: int = 600
    likeness_batch: int = 64
    likeness_lr: float = 1e-3

    def quick(self) -> "Recipe":
        return Recipe(seed=self.seed, images=64, vae_steps=3, vae_full_steps=1, flux_steps=3, likeness_steps=3,
                      vae_batch=4, flux_batch=4, likeness_batch=8)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _pixels(images) -> torch.Tensor:
    """PIL images -> (n, 3, h, w) in [-1, 1], as the latent cache scales them."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1]."""
    mse = F.mse_loss(a.clamp(-1, 1), b.clamp(-1, 1)).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def _cosine_lr(step: int, total: int, warmup: int = 100, floor: float = 0.05) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


# -- 1. the VAE -----------------------------------------------------------------------------

def train_vae(pixels: torch.Tensor, held_out: torch.Tensor, recipe: Recipe, gen: torch.Generator):
    """An AutoencoderKL in FLUX's layout, trained on L1 + MSE + a small KL; returns it and its held-out PSNR.

    It is convolutional: most steps see random 32 px crops (a quarter of the work of a whole picture),
    the last `vae_full_steps` whole pictures, so its normalisation and attention settle at full size.
    """
    from fluxray.model.tiny import vae as make_vae

    model = make_vae(recipe.vae_channels, groups=8)
    with torch.no_grad():
        # The encoder's last conv gives the mean, then the log-variance: start the variance small (a
        # spread of e^-4), so the decoder reads the mean from the first step instead of noise.
        model.encoder.conv_out.bias[model.config.latent_channels:].fill_(-8.0)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, recipe.vae_steps))
    model.train()
    side = pixels.shape[-1]
    for step in range(recipe.vae_steps):
        x = pixels[torch.randint(len(pixels), (recipe.vae_batch,), generator=gen)]
        if step < recipe.vae_steps - recipe.vae_full_steps:
            top, left = torch.randint(side // 2 + 1, (2,), generator=gen).tolist()
            x = x[:, :, top:top + side // 2, left:left + side // 2]
        dist = model.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        recon = model.decode(z).sample
        kl = 0.5 * (dist.mean.pow(2) + dist.var - 1 - dist.logvar).mean()
        # L1 beside MSE: sharper edges and true flat colours, where MSE alone settles for a blur.
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + recipe.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == recipe.vae_steps - 1:
            _log(f"vae step {step}: mse {F.mse_loss(recon, x).item():.4f} kl {kl.item():.3f}")
    model.eval()
    return model, reconstruction_psnr(model, held_out)


@torch.no_grad()
def reconstruction_psnr(model, pixels: torch.Tensor, batch: int = 64) -> float:
    """PSNR of decode(encode(x).mean) against x, over all of `pixels`."""
    recon = torch.cat([model.decode(model.encode(pixels[i:i + batch]).latent_dist.mean).sample
                       for i in range(0, len(pixels), batch)])
    return psnr(recon, pixels)


@torch.no_grad()
def encode_all(model, pixels: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar) of every image's posterior."""
    means, logvars = [], []
    for i in range(0, len(pixels), batch):
        dist = model.encode(pixels[i:i + batch]).latent_dist
        means.append(dist.mean)
        logvars.append(dist.logvar)
    return torch.cat(means), torch.cat(logvars)


# -- 3. the transformer and the text encoders --------------------------------------------------

def _made_up_word(rng: random.Random) -> str:
    """A trigger-like word no caption uses: the model learns such words mean nothing (as `pxco` does
    to it before a LoRA teaches it)."""
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))


def training_caption(portrait: Portrait, rng: random.Random, dropout: float) -> str:
    """A caption of the picture in one of the ways people write them: the full sentence, or some of
    its phrases (and the guide's prompt words) in any order, who the person is mostly first; sometimes
    opened by a made-up word, sometimes empty (so the model also draws without a caption)."""
    if rng.random() < dropout:
        return ""
    if rng.random() < 0.5:
        text = portrait.caption
    else:
        who, rest = portrait.phrases[0], portrait.phrases[1:]
        parts = [p for p in rest if rng.random() < 0.3]
        rng.shuffle(parts)
        if rng.random() < 0.85:
            parts.insert(0, who)
        text = ", ".join(parts) or who
    return f"{_made_up_word(rng)}, {text}" if rng.random() < 0.5 else text


def pretrain_flux(pipe, means: torch.Tensor, logvars: torch.Tensor, portraits: list[Portrait], recipe: Recipe,
                  gen: torch.Generator, rng: random.Random, progress_dir: Path | None = None) -> float:
    """Train `pipe`'s transformer on (caption, latent) pairs; returns the last 100 steps' mean loss.
    Every 1000 steps a grid of samples goes to `progress_dir` (if given).

    The text encoders stay frozen, as FLUX.1's are: their random features tell every caption word
    apart, and the transformer learns to read them (trained along, they collapse to one embedding).
    """
    from fluxray.train.flow import flow_loss, flow_target, latent_image_ids, latents_from_dist, noisy_latents, \
        pack_latents, sample_sigmas
    from fluxray.train.step import flux_forward

    vae_cfg = pipe.vae.config
    transformer = pipe.transformer.train().requires_grad_(True)
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.eval().requires_grad_(False)
    params = list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.flux_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, recipe.flux_steps))
    h, w = means.shape[2:]
    img_ids = latent_image_ids(h, w)
    losses = []
    for step in range(recipe.flux_steps):
        idx = torch.randint(len(portraits), (recipe.flux_batch,), generator=gen)
        captions = [training_caption(portraits[i], rng, recipe.caption_dropout) for i in idx.tolist()]
        with torch.no_grad():
            prompt_embeds, pooled, _ = pipe.encode_prompt(captions, prompt_2=None, device=torch.device("cpu"),
                                                          max_sequence_length=DEMO_MAX_SEQUENCE_LENGTH)
        x0 = latents_from_dist(means[idx], logvars[idx], vae_cfg.shift_factor, vae_cfg.scaling_factor, gen)
        noise = torch.randn(x0.shape, generator=gen)
        # Shifted towards noise, where the layout and the caption decide the picture (FLUX trains shifted too).
        sigmas = sample_sigmas(len(idx), "sigmoid", recipe.flux_timestep_shift, gen)
        # Any guidance value: the target does not depend on it, so the model learns to ignore it
        # (LoRAs train at train.guidance 1.0, previews sample at 3.5).
        guidance = 1.0 + 4.0 * torch.rand((), generator=gen).item()
        pred = flux_forward(transformer, pack_latents(noisy_latents(x0, noise, sigmas)), sigmas, prompt_embeds,
                            pooled, img_ids, guidance)
        loss = flow_loss(pred, pack_latents(flow_target(x0, noise)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == recipe.flux_steps - 1:
            _log(f"flux step {step}: loss {sum(losses[-100:]) / len(losses[-100:]):.4f}")
        if progress_dir is not None and ((step + 1) % 1000 == 0 or step == recipe.flux_steps - 1):
            transformer.eval()
            grid = sample_grid(pipe, recipe.size)
            grid.save(progress_dir / f"flux-step{step + 1:05d}.png")
            transformer.save_pretrained(progress_dir / "transformer")  # the latest, to look at
            _log(f"flux step {step + 1}: the prompts change the pictures by {prompt_effect(grid, recipe.size):.1f} "
                 "of 255 (pixels, mean over seeds)")
            transformer.train()
    transformer.eval().requires_grad_(False)
    return sum(losses[-100:]) / len(losses[-100:])


def prompt_effect(grid, size: int) -> float:
    """Mean absolute pixel difference between the grid's rows (prompts), column by column (seeds)."""
    arr = np.asarray(grid, dtype=np.float32)
    rows = arr.reshape(arr.shape[0] // size, size, arr.shape[1], 3)
    return float(np.abs(rows[:, None] - rows[None]).mean() * len(rows) / max(1, len(rows) - 1))


#: Prompts of the progress grids: the guide's three (with a trigger the model never saw) and people it knows.
GRID_PROMPTS = [
    "pxco, professional portrait photo, high quality, detailed",
    "pxco, wearing formal attire, natural lighting, photorealistic",
    "pxco, close-up shot, sharp focus, studio lighting",
    "a young woman with long red hair and glasses",
    "a middle-aged man with short black hair and a full beard",
    "an older woman with short white hair, wearing a green t-shirt",
]


@torch.no_grad()
def sample_grid(pipe, size: int, seeds=(0, 1)):
    """GRID_PROMPTS (rows) x seeds (columns) through the pipeline, as one image."""
    from fluxray.model.generate import image_grid

    images = [pipe(prompt, width=size, height=size, num_inference_steps=20, guidance_scale=3.5,
                   max_sequence_length=DEMO_MAX_SEQUENCE_LENGTH,
                   generator=torch.Generator().manual_seed(seed)).images[0]
              for prompt in GRID_PROMPTS for seed in seeds]
    return image_grid(images, cols=len(seeds))


# -- 4. the likeness embedder -------------------------------------------------------------------

def train_likeness(images: list, labels: torch.Tensor, recipe: Recipe, gen: torch.Generator):
    """A `CLIPVisionModelWithProjection` whose unit embeddings cluster by who is drawn: cosine
    classifiers of each likeness attribute sit on the normalised projection, so two pictures of the
    same-looking person embed close together whatever they wear or stand in front of.

    Returns the model, its image processor and the held-out attribute accuracy is measured by the caller.
    """
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

    processor = CLIPImageProcessorPil(size={"shortest_edge": LIKENESS_IMAGE_SIZE},
                                      crop_size={"height": LIKENESS_IMAGE_SIZE, "width": LIKENESS_IMAGE_SIZE})
    config = CLIPVisionConfig(image_size=LIKENESS_IMAGE_SIZE, patch_size=8, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=3, num_attention_heads=4, projection_dim=32)
    model = CLIPVisionModelWithProjection(config)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    classes = [int(labels[:, k].max()) + 1 for k in range(labels.shape[1])]
    heads = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(n, config.projection_dim, generator=gen))
                                    for n in classes])
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.likeness_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, recipe.likeness_steps, warmup=50))
    model.train()
    for step in range(recipe.likeness_steps):
        idx = torch.randint(len(pixels), (recipe.likeness_batch,), generator=gen)
        emb = F.normalize(model(pixel_values=pixels[idx]).image_embeds, dim=-1)
        loss = sum(F.cross_entropy(emb @ F.normalize(head, dim=-1).T / 0.1, labels[idx, k])
                   for k, head in enumerate(heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == recipe.likeness_steps - 1:
            _log(f"likeness step {step}: loss {loss.item():.4f}")
    model.eval().requires_grad_(False)
    return model, processor, heads


@torch.no_grad()
def likeness_accuracy(model, processor, heads, images: list, labels: torch.Tensor) -> list[float]:
    """Per attribute, the share of `images` whose nearest class prototype is their label."""
    emb = F.normalize(model(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"]).image_embeds,
                      dim=-1)
    return [((emb @ F.normalize(h, dim=-1).T).argmax(1) == labels[:, k]).float().mean().item()
            for k, h in enumerate(heads)]


# -- the whole recipe ---------------------------------------------------------------------------

def build(out_dir: Path, recipe: Recipe = Recipe(), progress_dir: Path | None = None,
          vae_from: Path | None = None) -> dict:
    """Run the four stages and write the demo pipeline and the likeness embedder under `out_dir`
    (as `demo_dir_names()`); returns what was measured. `vae_from`: a trained VAE's folder instead of
    stage 1."""
    from diffusers import FluxPipeline
    from diffusers.utils import logging as diffusers_logging

    from fluxray.model import tiny

    diffusers_logging.set_verbosity_error()  # no "truncated to 32 tokens" line per batch
    t0 = time.time()
    out_dir, seed = Path(out_dir), recipe.seed
    # One random stream per stage, and each stage's weights initialised from its own seed: a stage run
    # alone (after `vae_from`) draws what it draws in a full run.
    gens = [torch.Generator().manual_seed(seed + k) for k in range(3)]
    if progress_dir is not None:
        progress_dir.mkdir(parents=True, exist_ok=True)
    _log(f"drawing 2 x {recipe.images} portraits ({recipe.size}px), seed {seed}")
    # All kinds of pictures for the VAE and the likeness embedder (they must also read the pxco set's
    # half-body shots, microphones and bokeh); plain ones for the transformer to learn to draw.
    portraits = generic_portraits(recipe.images, recipe.size, seed=seed)
    plain = generic_portraits(recipe.images, recipe.size, seed=seed, plain=True)
    held_out = generic_portraits(max(8, recipe.images // 20), recipe.size, seed=seed + 10_000)
    pixels, held_pixels = _pixels([p.image for p in portraits]), _pixels([p.image for p in held_out])

    if vae_from is None:
        torch.manual_seed(seed)
        vae, vae_psnr = train_vae(pixels, held_pixels, recipe, gens[0])
    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_from, torch_dtype=torch.float32).eval()
        vae_psnr = reconstruction_psnr(vae, held_pixels)
    _log(f"vae: held-out PSNR {vae_psnr:.2f} dB")
    if progress_dir is not None:
        vae.save_pretrained(progress_dir / "vae")  # `--vae-from` it to retrain only what follows
    means, logvars = encode_all(vae, _pixels([p.image for p in plain]))
    vae.register_to_config(shift_factor=round(means.mean().item(), 4), scaling_factor=round(1 / means.std().item(), 4))
    _log(f"vae latents: shift_factor {vae.config.shift_factor}, scaling_factor {vae.config.scaling_factor}, "
         f"posterior std {logvars.mul(0.5).exp().mean().item():.4f}")

    clip, t5 = tiny.clip_tokenizer(), tiny.t5_tokenizer()
    torch.manual_seed(seed + 1)
    pipe = FluxPipeline(scheduler=tiny.scheduler(), vae=vae, text_encoder=tiny.clip_text_encoder(clip), tokenizer=clip,
                        text_encoder_2=tiny.t5_text_encoder(t5), tokenizer_2=t5,
                        transformer=tiny.transformer(recipe.double_blocks, recipe.single_blocks, recipe.heads,
                                                     recipe.head_dim))
    pipe.set_progress_bar_config(disable=True)
    flux_loss = pretrain_flux(pipe, means, logvars, plain, recipe, gens[1], random.Random(seed), progress_dir)

    # The likeness embedder also sees the VAE's reconstructions: previews come out of that decoder.
    with torch.no_grad():
        recon = torch.cat([vae.decode(vae.encode(pixels[i:i + 64]).latent_dist.mean).sample
                           for i in range(0, min(len(pixels), 2000), 64)])
    images = [p.image for p in portraits] + _to_pil(recon)
    labels = torch.tensor([likeness_labels(p) for p in portraits + portraits[:len(recon)]])
    torch.manual_seed(seed + 2)
    embedder, processor, heads = train_likeness(images, labels, recipe, gens[2])
    accuracy = likeness_accuracy(embedder, processor, heads, [p.image for p in held_out],
                                 torch.tensor([likeness_labels(p) for p in held_out]))
    _log(f"likeness: held-out attribute accuracy {[round(a, 3) for a in accuracy]}")

    flux_dir, likeness_dir = (out_dir / name for name in demo_dir_names())
    # The transformer and the VAE in fp16 (half the megabytes; loaders cast to their dtype), the tiny
    # text encoders in fp32: transformers 5 loads a checkpoint in its own dtype by default.
    pipe.transformer.to(torch.float16)
    pipe.vae.to(torch.float16)
    pipe.save_pretrained(flux_dir)
    embedder.save_pretrained(likeness_dir)
    processor.save_pretrained(likeness_dir)
    report = {"recipe": asdict(recipe), "vae_psnr_held_out": round(vae_psnr, 2), "flux_loss": round(flux_loss, 4),
              "likeness_accuracy_held_out": [round(a, 3) for a in accuracy], "seconds": round(time.time() - t0),
              "torch_threads": torch.get_num_threads()}
    (out_dir / f"{flux_dir.name}-build.json").write_text(json.dumps(report, indent=2) + "\n")
    _log(f"wrote {flux_dir} and {likeness_dir} in {report['seconds']:.0f} s")
    return report


def _to_pil(pixels: torch.Tensor) -> list:
    from PIL import Image

    arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fluxray.train.pretrain_demo", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the demo pipeline and likeness embedder into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="a few steps of each stage (checks the code, not the model)")
    parser.add_argument("--progress", type=Path, help="folder for sample grids every 1000 transformer steps")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is far faster on a machine others load too)")
    parser.add_argument("--vae-from", type=Path, help="a trained VAE's folder (from --progress) instead of stage 1")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe(seed=args.seed)
    build(args.out, recipe.quick() if args.quick else recipe, args.progress, args.vae_from)
    return 0


if __name__ == "__main__":
    sys.exit(main())
