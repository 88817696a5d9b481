"""Train-test helpers: a DeepSpeed-wrapped LoRA of the random model's transformer at any ZeRO stage, in this
process (a gloo world of one), a synthetic step for it, and a non-square copy of the sample set."""

from pathlib import Path

import pytest
import torch

from fluxray.config import JobConfig
from fluxray.data.buckets import Item
from fluxray.model.generate import PromptEmbeds
from fluxray.train.step import StepSpec, training_loss

ITEM = Item(0, (64, 48))
LATENTS = {ITEM: (torch.randn(16, 6, 8, generator=torch.Generator().manual_seed(1)), torch.zeros(16, 6, 8))}
EMBEDS = {"pxco, a man": PromptEmbeds(torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(2)),
                                      torch.randn(1, 32, generator=torch.Generator().manual_seed(3))),
          "": PromptEmbeds(torch.zeros(1, 32, 32), torch.zeros(1, 32))}
SPEC = StepSpec(shift_factor=0.1159, scaling_factor=0.3611, guidance=1.0)
#: A schedule whose LR moves every step, so a stale LR shows.
CFG = JobConfig.model_validate({"lora": {"rank": 4}, "train": {"lr": 1e-2, "steps": 10, "lr_scheduler": "cosine",
                                                               "warmup_steps": 2, "weight_decay": 0.1}})


def _synthetic_loss(transformer, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    return training_loss(transformer, [ITEM], ["pxco, a man"], LATENTS, EMBEDS, SPEC, gen)


@pytest.fixture
def synthetic_loss():
    """`synthetic_loss(transformer, step)`: the loss of one fixed micro-batch; its noise and σ follow `step`."""
    return _synthetic_loss


@pytest.fixture
def lora_cfg() -> JobConfig:
    """The job config `make_lora` builds with: LoRA rank 4, lr 1e-2 on a cosine schedule over 10 steps."""
    return CFG


@pytest.fixture
def lora_transformer(random_flux):
    """`lora_transformer(lora=lora_cfg.lora)` -> (the random model's transformer, its seeded LoRA parameters), no DeepSpeed."""
    from diffusers import FluxTransformer2DModel

    from fluxray.model.lora import add_lora

    def make(lora=CFG.lora):
        tr = FluxTransformer2DModel.from_pretrained(random_flux, subfolder="transformer")
        return tr, add_lora(tr, lora, seed=0)

    return make


@pytest.fixture
def make_lora(lora_transformer):
    """`make_lora(stage, cfg=lora_cfg, ema=True)` -> a `LoraEngine` of the random model's transformer at that ZeRO stage."""
    from fluxray.model.lora import lora_named_params
    from fluxray.train.engine import init_engine, init_single_process_group

    def make(stage: int, cfg: JobConfig = CFG, ema: bool = True):
        tr, params = lora_transformer(cfg.lora)
        init_single_process_group()
        lora = init_engine(tr, params, list(lora_named_params(tr)), cfg, 1, stage)
        if ema:
            lora.ema = [v.detach().float().clone() for v in lora.values()]
        return lora

    return make


@pytest.fixture(scope="session")
def non_square_sample(session_root):
    """The bundled sample set cropped to 4:3 landscapes and 3:4 portraits (256x192, 192x256) and
    prepared: at `dataset.resolutions=[80]` its buckets are 80x64 and 64x80, never square."""
    import json
    import shutil

    from PIL import Image

    from fluxray.data.prepare import prepare_dataset

    src = session_root / "non-square-raw"
    src.mkdir()
    repo = Path(__file__).resolve().parents[2] / "samples" / "pxco"
    captions = json.loads((repo / "captions.json").read_text())
    for k, name in enumerate(sorted(captions)):
        with Image.open(repo / name) as im:
            box = (0, 32, 256, 224) if k % 2 else (32, 0, 224, 256)
            im.crop(box).save(src / name)
    shutil.copyfile(repo / "captions.json", src / "captions.json")
    out = session_root / "datasets" / "pxco-non-square"
    prepare_dataset(src, src / "captions.json", trigger_word="pxco", out_dir=out)
    return out
