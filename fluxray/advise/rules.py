"""Advice before a job starts: what the user's guide and FLUX trainers' experience would change.

`advise(cfg)` is a pure function of the config and the dataset it names: a list of `Advice`,
each with a stable id, a severity, the config key, a message and the fix. Advice never
blocks a job; `check_strict` does, for `fluxray advise --strict` and callers that ask.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from fluxray.config import TINY_MODEL, JobConfig
from fluxray.data.captions import has_trigger
from fluxray.errors import ConfigError, FluxrayError

Severity = Literal["info", "warning", "error"]

# The guide's numbers: "500 minimum, 1000 recommended, 1500-2000 for highest quality", on 18
# images at batch 1, and "at step 100, model only saw each image ~5-6 times".
MIN_STEPS, RECOMMENDED_STEPS, HIGH_QUALITY_STEPS = 500, 1000, 2000
GUIDE_IMAGES = 18
#: Passes over each image: the guide's minimum (500 steps, 18 images) is ~28; 1000 steps ~55.
MIN_REPEATS, TARGET_REPEATS, MAX_REPEATS = 25, 55, 150
GUIDE_LR, LR_RANGE = 5e-4, (1e-5, 1e-3)
GUIDE_RANK, RANK_RANGE = 16, (4, 128)
MAX_PROMPT_WORDS = 60  # "very long prompts dilute the concept"
DEV_SAMPLE_GUIDANCE, DEV_SAMPLE_STEPS = (2.0, 5.0), 20
MAX_CAPTION_DROPOUT = 0.3
SAMPLE_SHARE = 0.5  # previews costing more than training itself get a note (the guide's defaults: ~45%)


class Advice(BaseModel):
    """One thing to change (or know) before training."""

    id: str  # stable, e.g. `steps.too_few`
    severity: Severity
    key: str  # the config key it is about
    message: str
    fix: str


class AdviceError(FluxrayError):
    """Strict mode: the config has warnings or errors."""


@dataclass
class _Facts:
    """What the rules look at besides the config."""

    cfg: JobConfig
    images: int | None
    sizes: list[tuple[int, int]] | None
    world: int
    trigger: str | None
    guidance_distilled: bool
    demo: bool  # `model.path: tiny`: the demo model, which the guide's likeness advice is not about

    @property
    def per_step(self) -> int:
        """Images one optimizer step sees, over all workers."""
        return self.cfg.train.batch_size * self.cfg.train.grad_accum * self.world


def advise(cfg: JobConfig, num_images: int | None = None, world_size: int | None = None,
           image_sizes: list[tuple[int, int]] | None = None) -> list[Advice]:
    """Every piece of advice for `cfg`, errors first. The dataset is read from `dataset.path`
    (prepared or raw) unless `num_images` / `image_sizes` are given."""
    images, sizes, trigger = dataset_facts(cfg)
    if image_sizes is not None:
        sizes = list(image_sizes)
        images = len(sizes)
    if num_images is not None:
        images = num_images
    f = _Facts(cfg, images, sizes, world_size or cfg.distributed.workers, cfg.dataset.trigger_word or trigger,
               _guidance_distilled(cfg), cfg.model.path == TINY_MODEL)
    out: list[Advice] = []
    for rule in _RULES + ([_demo] if f.demo else _LIKENESS):
        out.extend(rule(f))
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(out, key=lambda a: order[a.severity])


def check_strict(items: list[Advice]) -> None:
    """Raise `AdviceError` when any advice is a warning or an error (strict mode)."""
    bad = [a for a in items if a.severity != "info"]
    if bad:
        raise AdviceError(f"strict mode: {len(bad)} warning(s)/error(s): " + "; ".join(a.id for a in bad))


def format_advice(items: list[Advice]) -> str:
    """The list as the CLI and the job log print it."""
    if not items:
        return "advice: nothing to change"
    width = max(len(a.id) for a in items)
    lines = [f"advice ({len(items)}):"]
    for a in items:
        lines.append(f"  {a.severity:<7} {a.id:<{width}}  {a.message}")
        lines.append(f"  {'':<7} {'':<{width}}  fix: {a.fix}")
    return "\n".join(lines)


def print_advice(cfg: JobConfig) -> list[Advice]:
    """Print the advice at the start of a job (it never stops one); returns the list."""
    items = advise(cfg)
    if items:
        print(format_advice(items), flush=True)
    return items


# ---------------------------------------------------------------------------------------
# Facts
# ---------------------------------------------------------------------------------------

def dataset_facts(cfg: JobConfig) -> tuple[int | None, list[tuple[int, int]] | None, str | None]:
    """(image count, image sizes, trigger word) of `dataset.path`, prepared or raw; Nones if unknown."""
    if not cfg.dataset.path:
        return None, None, None
    root = Path(cfg.dataset.path).expanduser()
    try:
        from fluxray.data.prepare import DATASET_INFO, REPORT, is_prepared

        if is_prepared(root):
            info = json.loads((root / DATASET_INFO).read_text())
            report = root / REPORT
            sizes = None
            if report.is_file():
                sizes = [(i["width"], i["height"]) for i in json.loads(report.read_text()).get("images", [])] or None
            return info.get("num_images"), sizes, info.get("trigger_word")
        if root.is_dir():
            from PIL import Image

            from fluxray.data.captions import TRIGGER_FILE
            from fluxray.data.images import IMAGE_SUFFIXES

            sizes = []
            for p in sorted(root.iterdir()):
                if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
                    with Image.open(p) as im:  # header only
                        sizes.append(im.size)
            trigger = (root / TRIGGER_FILE).read_text().strip() if (root / TRIGGER_FILE).is_file() else None
            return len(sizes), sizes, trigger or None
    except (OSError, ValueError, KeyError):
        pass  # an unreadable dataset is the job's error to report, not the advice's
    return None, None, None


def dataset_texts(cfg: JobConfig, trigger: str | None) -> list[str]:
    """The training text of each caption of `dataset.path` (prepared, or raw with the trigger put
    in as prepare would); [] when unknown."""
    if not cfg.dataset.path:
        return []
    root = Path(cfg.dataset.path).expanduser()
    try:
        from fluxray.data.prepare import is_prepared, read_prepared

        if is_prepared(root):
            return [text for _, text in read_prepared(root).items]
        if root.is_dir() and trigger:
            from fluxray.data.captions import apply_trigger, load_captions

            return [apply_trigger(c, trigger) for c in load_captions(root).values()]
    except (OSError, ValueError, FluxrayError):
        pass  # as `dataset_facts`: the job reports an unreadable dataset
    return []


def _tokenizers(cfg: JobConfig):
    """(CLIP, T5) tokenizers of `model.path` when they are on this machine (a folder, the shipped
    demo model or the HF cache); None otherwise. Nothing is downloaded."""
    from fluxray.model.source import local_model_folder

    folder = local_model_folder(cfg)
    if folder is None or not (folder / "tokenizer").is_dir() or not (folder / "tokenizer_2").is_dir():
        return None
    from transformers import AutoTokenizer

    try:
        return (AutoTokenizer.from_pretrained(folder, subfolder="tokenizer"),
                AutoTokenizer.from_pretrained(folder, subfolder="tokenizer_2"))
    except (OSError, ValueError):
        return None


def _guidance_distilled(cfg: JobConfig) -> bool:
    """FLUX.1-dev (guidance embedding) or schnell, from the model's config when it is local."""
    path = Path(cfg.model.path).expanduser()
    if cfg.model.path == TINY_MODEL:
        return True  # the demo model mirrors dev
    config = path / "transformer" / "config.json"
    if config.is_file():
        return bool(json.loads(config.read_text()).get("guidance_embeds", False))
    return "schnell" not in cfg.model.path.lower()


def _a(id: str, severity: Severity, key: str, message: str, fix: str) -> Advice:
    return Advice(id=id, severity=severity, key=key, message=message, fix=fix)


# ---------------------------------------------------------------------------------------
# The rules: one function per topic, each returning its advice
# ---------------------------------------------------------------------------------------

def _steps(f: _Facts) -> list[Advice]:
    steps = f.cfg.train.steps
    # The guide counts steps at batch 1 on one GPU: compare the images seen.
    seen = steps * f.per_step
    at = "" if f.per_step == 1 else f" ({seen} images seen at {f.per_step} per step)"
    need = math.ceil(RECOMMENDED_STEPS / f.per_step)
    if seen < MIN_STEPS:
        return [_a("steps.too_few", "warning", "train.steps",
                   f"train.steps={steps}{at} is too few for a FLUX LoRA: it will learn a generic face, not your "
                   f"subject (the guide: {MIN_STEPS} minimum, {RECOMMENDED_STEPS} recommended, "
                   f"1500-{HIGH_QUALITY_STEPS} for highest quality)",
                   f"set train.steps to {need}")]
    if seen < RECOMMENDED_STEPS:
        return [_a("steps.below_recommended", "info", "train.steps",
                   f"train.steps={steps}{at} is acceptable for simple subjects; the guide recommends "
                   f"{RECOMMENDED_STEPS} for an accurate likeness", f"set train.steps to {need}")]
    if seen > HIGH_QUALITY_STEPS and not f.cfg.train.early_stop:
        return [_a("steps.beyond_guide", "info", "train.steps",
                   f"train.steps={steps}{at} goes past the guide's 1500-{HIGH_QUALITY_STEPS} for highest quality; "
                   "likeness peaks, then the LoRA overfits",
                   f"set train.early_stop: true, or lower train.steps to {math.ceil(HIGH_QUALITY_STEPS / f.per_step)}")]
    return []


def _repeats(f: _Facts) -> list[Advice]:
    if not f.images:
        return []
    repeats = f.cfg.train.steps * f.per_step / f.images
    target = math.ceil(TARGET_REPEATS * f.images / f.per_step)
    if repeats < MIN_REPEATS:
        return [_a("steps.few_repeats", "warning", "train.steps",
                   f"each of the {f.images} images is seen only ~{repeats:.1f} times; the guide's 100-step run "
                   "\"only saw each image ~5-6 times\" and learned a generic face",
                   f"set train.steps to {target} (~{TARGET_REPEATS} passes per image)")]
    if repeats > MAX_REPEATS:
        return [_a("steps.many_repeats", "warning", "train.steps",
                   f"each of the {f.images} images is seen ~{repeats:.0f} times: the LoRA memorises them "
                   "(same poses, same backgrounds) instead of learning the subject",
                   f"lower train.steps to {target}, add images, or set train.early_stop: true")]
    return []


def _prompts(f: _Facts) -> list[Advice]:
    cfg = f.cfg
    if not cfg.sample.prompts:
        return [_a("sample.no_prompts", "warning", "sample.prompts",
                   "no sample prompts: there is nothing to watch the likeness emerge in",
                   "add prompts like '[trigger], professional portrait photo, high quality, detailed'")]
    out = []
    trigger = f.trigger
    for i, p in enumerate(cfg.sample_prompts(trigger or "[trigger]")):
        key, text = f"sample.prompts.{i}", p.prompt
        words = re.findall(r"\w+", text)
        if trigger is not None and not has_trigger(text, trigger):
            out.append(_a("prompt.no_trigger", "warning", key,
                          f"sample prompt {i} {text!r} lacks the trigger word {trigger!r}: it shows the base model, "
                          "not your LoRA (the guide's bad prompt: \"portrait photo\"); it is never added silently",
                          f"start it with '[trigger], '"))
        elif trigger is not None and not [w for w in words if w != trigger]:
            out.append(_a("prompt.trigger_only", "warning", key,
                          f"sample prompt {i} {text!r} is only the trigger word: too short, no context "
                          f"(the guide's bad prompt: \"{trigger}\")",
                          "describe a scene: '[trigger], professional portrait photo, natural lighting'"))
        if len(words) > MAX_PROMPT_WORDS:
            out.append(_a("prompt.too_long", "warning", key,
                          f"sample prompt {i} has {len(words)} words: very long prompts dilute the concept (the guide)",
                          "keep preview prompts short: the trigger plus a few words of pose, clothing and light"))
        tokens = _t5_tokens(text)
        if tokens > cfg.model.max_sequence_length:
            out.append(_a("prompt.truncated", "warning", key,
                          f"sample prompt {i} is ~{tokens} T5 tokens but model.max_sequence_length is "
                          f"{cfg.model.max_sequence_length}: the rest is cut off",
                          "shorten the prompt (dev reads up to 512 tokens)"))
    return out


def _t5_tokens(text: str) -> int:
    # T5's sentencepiece splits English into ~1.3 pieces per word, punctuation apart.
    return math.ceil(1.3 * len(re.findall(r"\w+", text)) + len(re.findall(r"[^\w\s]", text)))


def _lr(f: _Facts) -> list[Advice]:
    lr = f.cfg.train.lr
    fix = f"set train.lr to {GUIDE_LR:g} (the guide's default; ai-toolkit uses 1e-4)"
    if lr < LR_RANGE[0]:
        return [_a("lr.too_low", "warning", "train.lr",
                   f"train.lr={lr:g} is below the usual {LR_RANGE[0]:g}-{LR_RANGE[1]:g}: the LoRA barely moves in "
                   f"{f.cfg.train.steps} steps", fix)]
    if lr > LR_RANGE[1]:
        return [_a("lr.too_high", "warning", "train.lr",
                   f"train.lr={lr:g} is above the usual {LR_RANGE[0]:g}-{LR_RANGE[1]:g}: FLUX LoRAs burn in "
                   "(artifacts, oversaturated faces) or diverge", fix)]
    return []


def _batch(f: _Facts) -> list[Advice]:
    from fluxray.data.buckets import Item, check_fits, make_items

    cfg, out = f.cfg, []
    if f.images:
        # Without the sizes, assume the best case: every image reaches every resolution.
        items = (make_items(f.sizes, cfg.dataset.resolutions) if f.sizes else
                 [Item(i, (r, r)) for i in range(f.images) for r in cfg.dataset.resolutions])
        try:
            check_fits(items, cfg.train.batch_size, f.world)
        except ConfigError as e:
            return [_a("batch.exceeds_dataset", "error", "train.batch_size", f"the job will fail: {e}",
                       "lower train.batch_size or distributed.workers, or add images")]
    if f.images and f.per_step * 4 > f.images:
        out.append(_a("batch.large_for_dataset", "warning", "distributed.workers",
                      f"each optimizer step averages {f.per_step} of your {f.images} images (batch x grad_accum x "
                      f"{f.world} worker(s)): only ~{f.images / f.per_step:.1f} steps per epoch; many GPUs on a small "
                      "dataset buy a shorter run, not a better LoRA",
                      "use fewer workers and lower train.steps to match, or run several jobs side by side"))
    if cfg.train.batch_size > 1:
        out.append(_a("batch.above_guide", "info", "train.batch_size",
                      f"train.batch_size={cfg.train.batch_size}: the guide trains FLUX at batch 1 (memory); a larger "
                      "batch needs proportionally fewer steps for the same passes per image",
                      "set train.batch_size to 1 unless the GPU has room to spare"))
    return out


def _lora(f: _Facts) -> list[Advice]:
    lora, out = f.cfg.lora, []
    if lora.rank < RANK_RANGE[0]:
        out.append(_a("lora.rank_low", "warning", "lora.rank",
                      f"lora.rank={lora.rank} leaves little room for a face's detail", f"set lora.rank to {GUIDE_RANK}"))
    elif lora.rank > RANK_RANGE[1]:
        out.append(_a("lora.rank_high", "warning", "lora.rank",
                      f"lora.rank={lora.rank} makes a large file that memorises the images; FLUX LoRAs of a "
                      f"subject use 16-64 (the guide: {GUIDE_RANK})", f"set lora.rank to {GUIDE_RANK}"))
    if lora.scale < 0.25:
        out.append(_a("lora.alpha_low", "warning", "lora.alpha",
                      f"lora.alpha/rank = {lora.scale:g} scales the update (and in effect the learning rate) down "
                      f"{1 / lora.scale:.0f}x", "leave lora.alpha unset (alpha = rank) or raise it"))
    if f.cfg.save.kohya:
        from fluxray.model.kohya import unmapped_targets

        missing = unmapped_targets(lora.targets)
        if missing:
            out.append(_a("save.kohya_unmapped", "warning", "lora.targets",
                          f"lora.targets {missing} have no name in kohya's format: the kohya file will not be written",
                          "drop those targets or set save.kohya: false"))
    return out


def _ema(f: _Facts) -> list[Advice]:
    t = f.cfg.train
    if not t.ema:
        return [_a("ema.off", "warning", "train.ema",
                   "EMA is off; the guide keeps it on: it smooths the LoRA that the previews and the saved file come from",
                   "set train.ema: true (decay 0.99)")]
    horizon = 1 / (1 - t.ema_decay)
    if horizon > t.steps / 2:
        return [_a("ema.too_slow", "warning", "train.ema_decay",
                   f"train.ema_decay={t.ema_decay} averages the last ~{horizon:.0f} steps, over half of the "
                   f"{t.steps}-step run: the saved LoRA lags behind training",
                   f"set train.ema_decay to {1 - 4 / t.steps:.3g} (averages the last quarter)")]
    return []


def _sampling(f: _Facts) -> list[Advice]:
    s, steps, out = f.cfg.sample, f.cfg.train.steps, []
    if not s.every:
        return [_a("sample.off", "info", "sample.every",
                   "previews are off: you cannot watch the likeness emerge (the guide checks them every 50 steps)",
                   "set sample.every to 50")]
    if s.every > max(50, steps // 4):
        out.append(_a("sample.rare", "info", "sample.every",
                      f"previews every {s.every} of {steps} steps are too rare to watch progress (the guide: every 50; "
                      "check steps 500, 750, 1000)", "set sample.every to 50"))
    if f.guidance_distilled:
        for key, value in [("sample.guidance", s.guidance)] + [
                (f"sample.prompts.{i}", p.guidance) for i, p in enumerate(s.prompts)
                if not isinstance(p, str) and p.guidance is not None]:
            if not DEV_SAMPLE_GUIDANCE[0] <= value <= DEV_SAMPLE_GUIDANCE[1]:
                out.append(_a("sample.guidance", "warning", key,
                              f"preview guidance {value:g} is outside {DEV_SAMPLE_GUIDANCE[0]:g}-"
                              f"{DEV_SAMPLE_GUIDANCE[1]:g}: FLUX.1-dev images wash out or burn",
                              "set it to 3.5 (3.5-4 for dev)"))
        if s.steps < DEV_SAMPLE_STEPS:
            out.append(_a("sample.steps_few", "warning", "sample.steps",
                          f"previews at {s.steps} steps are blurrier than inference will be: they undersell the LoRA",
                          f"set sample.steps to {DEV_SAMPLE_STEPS} (20-28 for dev)"))
    from fluxray.advise.estimate import flop_budget

    share = flop_budget(f.cfg, f.sizes, f.world).sample_share
    if share > SAMPLE_SHARE:
        out.append(_a("sample.costly", "info", "sample.every",
                      f"previews take ~{share:.0%} of the run's compute ({len(s.prompts)} prompts x {s.steps} steps "
                      f"at {s.width}x{s.height}, every {s.every} steps)",
                      f"sample less often (sample.every: {2 * s.every}), smaller (768x768) or with fewer prompts"))
    return out


def _caption_tokens(f: _Facts) -> list[Advice]:
    """Captions longer than CLIP's 77 tokens or `model.max_sequence_length` T5 tokens, counted once
    here (the text encoders would warn once per caption, in every worker)."""
    texts = dataset_texts(f.cfg, f.trigger)
    tokenizers = _tokenizers(f.cfg) if texts else None
    if not tokenizers:
        return []
    clip, t5 = tokenizers
    t5_max = f.cfg.model.max_sequence_length
    over_clip = sum(len(clip(t, verbose=False).input_ids) > clip.model_max_length for t in texts)
    over_t5 = sum(len(t5(t, verbose=False).input_ids) > t5_max for t in texts)
    if not over_clip and not over_t5:
        return []
    n, clip_max = len(texts), clip.model_max_length
    parts = []
    if over_clip:
        parts.append(f"{over_clip} of the {n} captions are longer than the {clip_max} CLIP tokens: CLIP sees their "
                     f"first {clip_max}" + ("" if over_t5 else ", T5 the whole caption"))
    if over_t5:
        parts.append(f"{over_t5} {'' if over_clip else f'of the {n} captions '}are longer than "
                     f"model.max_sequence_length={t5_max} T5 tokens: T5 sees their first {t5_max}")
    message = "; ".join(parts)
    fix = "put the subject and what matters most first in each caption"
    if over_t5:
        fix += "; raise model.max_sequence_length (512 for dev, 256 for schnell) for T5 to read all of it"
    return [_a("captions.truncated", "info", "dataset.path" if not over_t5 else "model.max_sequence_length",
               message, fix)]


def _demo(f: _Facts) -> list[Advice]:
    return [_a("model.demo", "info", "model.path",
               f"model.path={TINY_MODEL} is the demo model, which trains in minutes on a CPU: the guide's advice on "
               "steps, learning rate, passes per image, EMA, previews and caption dropout is about a likeness on "
               "FLUX.1-dev, so it is not checked here",
               "for your subject, start from configs/flux-dev.yaml (fluxray advise --config configs/flux-dev.yaml)")]


def _captions(f: _Facts) -> list[Advice]:
    p = f.cfg.dataset.caption_dropout
    if p == 0:
        return [_a("caption_dropout.zero", "info", "dataset.caption_dropout",
                   "caption dropout is 0: the LoRA learns nothing for prompts without the trigger",
                   "set dataset.caption_dropout to 0.05 (ai-toolkit's default)")]
    if p > MAX_CAPTION_DROPOUT:
        return [_a("caption_dropout.high", "warning", "dataset.caption_dropout",
                   f"caption dropout {p:g}: most steps train without text, so the trigger word binds to the "
                   "subject slowly", "set dataset.caption_dropout to 0.05")]
    return []


def _training_guidance(f: _Facts) -> list[Advice]:
    g = f.cfg.train.guidance
    if f.guidance_distilled and g != 1.0:
        return [_a("train.guidance", "warning", "train.guidance",
                   f"train.guidance={g:g}: every FLUX.1-dev trainer feeds guidance 1.0 while training; other values "
                   "teach the LoRA under a guidance the sampler never uses", "set train.guidance to 1.0")]
    return []


def _resolution(f: _Facts) -> list[Advice]:
    if not f.sizes:
        return []
    from fluxray.data.buckets import bucket_size

    cfg, out = f.cfg, []
    res = cfg.dataset.resolutions
    largest = max(f.sizes, key=lambda s: s[0] * s[1])
    unused = [r for r in res[1:] if not any(bucket_size(w, h, r) for w, h in f.sizes)]
    if unused:
        out.append(_a("resolution.unused", "warning", "dataset.resolutions",
                      f"no image is large enough for {unused} (the largest is {largest[0]}x{largest[1]}); images are "
                      "never upscaled, so those buckets stay empty",
                      f"drop {unused} from dataset.resolutions, or add larger images"))
    small = [s for s in f.sizes if s[0] * s[1] < res[0] * res[0]]
    if small:
        out.append(_a("resolution.small_images", "warning", "dataset.resolutions",
                      f"{len(small)} of {len(f.sizes)} images are smaller than {res[0]}x{res[0]}: they train at their "
                      f"own size (e.g. {small[0][0]}x{small[0][1]}), below what FLUX renders well",
                      "use larger source images (1024px is ideal), or lower dataset.resolutions"))
    trained = max((w * h for w, h in _buckets(cfg, f.sizes)), default=0)
    if trained and cfg.sample.width * cfg.sample.height > 2 * trained:
        out.append(_a("sample.larger_than_training", "info", "sample.width",
                      f"previews at {cfg.sample.width}x{cfg.sample.height} but the LoRA trains at most at "
                      f"~{int(math.sqrt(trained))}px: likeness is best at the trained sizes",
                      "set sample.width and sample.height to a trained size"))
    return out


def _buckets(cfg: JobConfig, sizes):
    from fluxray.data.buckets import make_items

    return {it.size for it in make_items(sizes, cfg.dataset.resolutions)}


def _saving(f: _Facts) -> list[Advice]:
    cfg = f.cfg
    if cfg.save.every >= cfg.train.steps:
        return [_a("save.only_final", "info", "save.every",
                   f"save.every={cfg.save.every} >= train.steps: only the final LoRA is kept, no earlier step to "
                   "fall back to if it overfits", f"set save.every to {max(1, cfg.train.steps // 4)}")]
    return []


#: Rules for every model: a job that would fail, previews that show the wrong thing, odd settings.
_RULES = [_prompts, _batch, _lora, _training_guidance, _resolution, _saving, _caption_tokens]
#: The guide's advice for a likeness on FLUX.1-dev; the demo model gets `_demo` instead.
_LIKENESS = [_steps, _lr, _repeats, _ema, _sampling, _captions]
