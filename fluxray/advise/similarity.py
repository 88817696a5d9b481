"""Is it the subject? The previews' likeness: their similarity to the training images in an image
embedding (a CLIP vision model; for the demo model, the likeness embedder trained with it).

`cosine_matrix`, `subject_similarity` and `similarity_trend` are pure functions of tensors and
`(step, similarity)` points; `ImageEmbedder` loads `validation.embedding_model` once and embeds
PIL images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fluxray.advise.convergence import likeness_plateau_step
from fluxray.config import TINY_MODEL
from fluxray.errors import FluxrayError


@dataclass(frozen=True)
class SimilarityTrend:
    """What the sample-similarity curve says so far."""

    plateau_step: int | None  # the last real improvement, once `patience` previews passed without one
    best_step: int | None  # the step with the highest similarity (the earliest of a tie)
    best_similarity: float | None
    message: str
    gain: float | None = None  # the last score minus the base model's (step 0's previews)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) cosine similarities of the rows of `a` (n, d) and `b` (m, d), in float32."""
    return (F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T).clamp(-1.0, 1.0)


def subject_similarity(sample_embeds: torch.Tensor, train_embeds: torch.Tensor) -> float:
    """Mean over the samples of each one's cosine similarity to its nearest training image.

    Nearest, not the mean training embedding: the training set shows the subject in many poses,
    crops and lights, and their mean is none of them; a sample that matches one photo well
    would score below a blur of them all.
    """
    if not len(sample_embeds) or not len(train_embeds):
        raise ValueError(f"need at least one sample and one training image, got {len(sample_embeds)} and "
                         f"{len(train_embeds)}")
    return cosine_matrix(sample_embeds, train_embeds).max(dim=1).values.mean().item()


def similarity_trend(points: list[tuple[int, float]], patience: int = 5, min_delta: float = 0.01) -> SimilarityTrend:
    """Where the similarity stopped improving, its best step, how far above the base model it is,
    and the sentence the job page shows.

    The plateau is `likeness_plateau_step`; the base model's score is step 0's, whose previews
    are drawn without the LoRA.
    """
    if not points:
        return SimilarityTrend(None, None, None, "no sample similarity yet")
    plateau = likeness_plateau_step(points, patience, min_delta)
    best_step, best = max(points, key=lambda p: (p[1], -p[0]))
    step, last = points[-1]
    base = dict(points).get(0)
    gain = None if base is None or step == 0 else last - base
    text = f"sample similarity to the training images: {last:.2f} at step {step}"
    text += f", {gain:+.2f} on the base model" if gain is not None else ""
    text += " (the best so far)" if best_step == step else f" (best {best:.2f} at step {best_step})"
    if plateau is not None:
        text += f"; no real improvement since step {plateau}"
    return SimilarityTrend(plateau, best_step, best, text, gain)


class ImageEmbedder:
    """A CLIP vision model (`CLIPVisionModelWithProjection` + its image processor), loaded once
    from a local folder or a hub id; `embed(images)` gives L2-normalised float32 rows on CPU."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 32):
        from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

        local = Path(path).expanduser()
        source, offline = (str(local), {"local_files_only": True}) if local.is_dir() else (str(path), {})
        try:
            self.processor = AutoImageProcessor.from_pretrained(source, **offline)
            model = CLIPVisionModelWithProjection.from_pretrained(source, dtype=dtype, **offline)
        except (OSError, ValueError) as e:
            raise FluxrayError(f"validation.embedding_model: cannot load a CLIP vision model from {str(path)!r}: {e}. "
                               "Use a local folder or a reachable hub id such as openai/clip-vit-large-patch14.") from None
        self.model = model.to(device).eval().requires_grad_(False)
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size

    @torch.no_grad()
    def embed(self, images: list) -> torch.Tensor:
        """(n, projection_dim) unit rows for n PIL images, in batches of `batch_size`."""
        rows = [torch.empty(0, self.model.config.projection_dim)]
        for i in range(0, len(images), self.batch_size):
            pixels = self.processor(images=images[i:i + self.batch_size], return_tensors="pt")["pixel_values"]
            out = self.model(pixel_values=pixels.to(self.device, self.dtype)).image_embeds
            rows.append(F.normalize(out.float(), dim=-1).cpu())
        return torch.cat(rows)


def resolve_embedding_model(name: str) -> str:
    """The `from_pretrained` argument for `validation.embedding_model`; `tiny` is the demo model's
    likeness embedder, shipped beside it."""
    if name == TINY_MODEL:
        from fluxray.model.demo import likeness_model_dir

        return str(likeness_model_dir())
    return name


class SubjectJudge:
    """Scores each preview step against the training images, embedded once at start.

    Only the previews whose prompt holds the trigger word are scored: the others show the base
    model on purpose (all of them when none does).
    """

    def __init__(self, model: str, training_images: list[Path], subject: list[bool], device="cpu"):
        from PIL import Image

        self.embedder = ImageEmbedder(model, device)
        images = []
        for path in training_images:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        self.train = self.embedder.embed(images)
        self.subject = subject if any(subject) else [True] * len(subject)

    @classmethod
    def for_job(cls, cfg, training_images: list[Path], prompts, trigger: str) -> "SubjectJudge":
        """The judge of a job's previews: `validation.embedding_model` on its resolved sample prompts."""
        from fluxray.data.captions import has_trigger

        return cls(resolve_embedding_model(cfg.validation.embedding_model), training_images,
                   [has_trigger(p.prompt, trigger) for p in prompts])

    def score(self, images: list) -> float:
        """The previews' `subject_similarity`, in the order of the sample prompts."""
        return subject_similarity(self.embedder.embed([im for im, s in zip(images, self.subject) if s]), self.train)
