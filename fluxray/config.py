"""The one typed job config: every default fluxray has, with a one-line doc each.

A job config is YAML (safe-loaded) plus `--set dotted.key=value` overrides whose
values are parsed as YAML. Errors name the dotted key and the value, and an
unknown key suggests the nearest real one.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import os
import reprlib
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fluxray.compat.prompt_flags import parse_prompt_flags
from fluxray.errors import ConfigError

#: The user's guide's three preview prompts; `[trigger]` becomes `dataset.trigger_word`.
DEFAULT_SAMPLE_PROMPTS = [
    "[trigger], professional portrait photo, high quality, detailed",
    "[trigger], wearing formal attire, natural lighting, photorealistic",
    "[trigger], close-up shot, sharp focus, studio lighting",
]

#: Value of `model.path` (and `validation.embedding_model`) that means the demo model shipped with fluxray.
TINY_MODEL = "tiny"

#: Values of `model.quantize` that store the base's block linears in fewer bits.
QUANTIZED = ("int8", "fp8", "nf4")

#: peft target modules: every attention and MLP projection of FLUX's double and single blocks.
DEFAULT_LORA_TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "proj_mlp", "proj_out",
]


def _refuse_fp16(v: Any) -> Any:
    if v == "fp16":
        raise ValueError("fp16 is not offered: FLUX's activations overflow it; use bf16 (or fp32), got 'fp16'")
    return v


class _Section(BaseModel):
    # Unknown keys are errors, not silently ignored typos.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """The base FLUX pipeline the LoRA is trained on."""

    path: str = Field("black-forest-labs/FLUX.1-dev", description="Base FLUX pipeline: a local diffusers folder, a hub id, or `tiny` for the small demo model shipped with fluxray.")
    revision: str | None = Field(None, description="Hub revision of `path` (branch, tag or commit).")
    dtype: Literal["auto", "bf16", "fp32"] = Field("auto", description="Dtype the frozen base weights are held in: `bf16`, `fp32`, or `auto` (bf16 on a GPU with bf16, else fp32). The LoRA, its AdamW state and the EMA are fp32 whatever this says (docs/architecture.md, Precision).")
    max_sequence_length: int = Field(512, ge=1, le=512, description="T5 tokens per caption: 512 for dev, 256 for schnell.")
    quantize: Literal["auto", "none", "int8", "fp8", "nf4"] = Field("auto", description="Storage of the frozen transformer's block linears: `none` as `dtype`; `int8`/`fp8` (torchao weight-only, fp8 needs compute capability 8.9+) or `nf4` (bitsandbytes 4-bit) let FLUX.1-dev train on a 24 GB card; `auto` keeps bf16 when it fits the GPU, else the memory plan's pick (docs/memory.md). The LoRA file is the same either way.")
    quantize_text_encoder: bool = Field(False, description="Load T5-XXL in int8 (torchao weight-only) while the caption embeddings are computed: 4.8 GB instead of 9.5 GB on the GPU.")

    @field_validator("dtype", mode="before")
    @classmethod
    def _no_fp16(cls, v: Any) -> Any:
        return _refuse_fp16(v)


class DatasetConfig(_Section):
    """The training images and captions, and how they are bucketed and cached."""

    path: str | None = Field(None, description="A prepared dataset folder (metadata.jsonl), or a raw folder of images with captions that is prepared on submit.")
    trigger_word: str | None = Field(None, description="The word that summons the subject; `None` takes the prepared dataset's trigger.")
    caption_dropout: float = Field(0.05, ge=0.0, le=1.0, description="Probability that a step trains on an empty caption (helps the LoRA without its trigger).")
    resolutions: list[int] = Field([512, 768, 1024], description="Aspect-bucket base sizes in pixels; images are never upscaled past their size.")
    cache_latents: bool = Field(True, description="Encode each image once per bucket and reuse the latents (frees the VAE from the step).")
    cache_text_embeddings: bool = Field(True, description="Encode each caption once and reuse the embeddings (frees CLIP and T5 from the step).")

    @field_validator("resolutions")
    @classmethod
    def _resolutions(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("must list at least one resolution")
        for r in v:
            if r < 64 or r % 16:
                raise ValueError(f"each resolution must be a multiple of 16 and >= 64, got {r}")
        return sorted(set(v))

    @field_validator("trigger_word")
    @classmethod
    def _trigger(cls, v: str | None) -> str | None:
        # The prepare rules (one token, stripped), also for a prepared dataset that skips them.
        from fluxray.data.captions import normalize_trigger
        from fluxray.errors import DatasetError

        try:
            return None if v is None else normalize_trigger(v)
        except DatasetError as e:
            raise ValueError(str(e).removeprefix("trigger_word ")) from None


class LoraConfig(_Section):
    """The low-rank adapter injected into the transformer."""

    rank: int = Field(16, ge=1, le=1024, description="LoRA rank (dimension of the low-rank update).")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; `None` means alpha = rank (scale 1). Baked into the saved weights.")
    targets: list[str] = Field(DEFAULT_LORA_TARGETS, min_length=1, description="Transformer module names (suffixes) that get a LoRA.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch during training.")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


class TrainConfig(_Section):
    """The optimisation: steps, learning rate, EMA, noise schedule, precision."""

    steps: int = Field(1000, ge=1, description="Optimizer steps; the guide: 500 minimum, 1000 recommended, 1500-2000 for highest quality.")
    lr: float = Field(5e-4, gt=0, le=1.0, description="Peak learning rate of the LoRA weights.")
    batch_size: int = Field(1, ge=1, description="Images per worker per micro-step (the guide: 1 is safe for FLUX).")
    grad_accum: int = Field(1, ge=1, description="Micro-steps accumulated per optimizer step.")
    optimizer: Literal["adamw"] = Field("adamw", description="torch AdamW, handed to DeepSpeed (no C++ op to compile).")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay on the LoRA weights.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field("constant", description="Learning-rate schedule after warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps from 0 to `lr`.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; `None` disables clipping.")
    ema: bool = Field(True, description="Keep an EMA of the LoRA weights and use it for previews and the saved file.")
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0, description="EMA decay per optimizer step.")
    seed: int = Field(42, description="Seed of data order, noise and σ sampling.")
    timestep_sampling: Literal["sigmoid", "uniform"] = Field("sigmoid", description="σ distribution: sigmoid (logit-normal) or uniform on (0, 1).")
    timestep_shift: float = Field(1.0, gt=0, description="σ' = sσ/(1+(s-1)σ); 1 is no shift, kohya recommends 3.1582.")
    guidance: float = Field(1.0, ge=0, description="Guidance-embedding value fed to FLUX.1-dev while training.")
    mixed_precision: Literal["auto", "bf16", "no"] = Field("auto", description="Autocast dtype of the forward: `bf16`, `no` (fp32), or `auto` (bf16 on a GPU with bf16 or over a bf16 base, else `no`). The LoRA trains in fp32 either way; no fp16, which FLUX overflows.")
    gradient_checkpointing: Literal["auto", "on", "off"] = Field("auto", description="Recompute activations in backward; `auto` turns it on only when memory needs it.")
    compile: bool = Field(False, description="Compile the transformer with torch.compile through DeepSpeed's `engine.compile()` (the first steps are slower).")
    early_stop: bool = Field(False, description="Stop (and save) once the previews' likeness (with `validation.embedding_model`), or else the fixed-noise validation loss, has plateaued.")
    early_stop_patience: int = Field(5, ge=1, description="Validations (or scored previews) without an `early_stop_min_delta` improvement that count as a plateau.")
    early_stop_min_delta: float = Field(0.01, ge=0, lt=1, description="Relative drop of the smoothed validation loss (of the likeness: of its distance to a perfect match) that counts as an improvement.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _precision_words(cls, v: Any) -> Any:
        # YAML reads `no` as false.
        return "no" if v is False else _refuse_fp16(v)

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _bool_words(cls, v: Any) -> Any:
        # YAML reads `on`/`off` as booleans.
        if isinstance(v, bool):
            return "on" if v else "off"
        return v


class SamplePrompt(_Section):
    prompt: str = Field(..., min_length=1, description="Preview prompt; `[trigger]` is replaced by the trigger word.")
    seed: int | None = Field(None, description="Seed of this prompt; `None` takes `sample.seed` (+ index when `walk_seed`).")
    width: int | None = Field(None, description="Width override in pixels.")
    height: int | None = Field(None, description="Height override in pixels.")
    guidance: float | None = Field(None, description="Guidance-scale override.")
    steps: int | None = Field(None, description="Sampling-steps override.")
    lora_scale: float | None = Field(None, description="LoRA strength override (ai-toolkit `network_multiplier`).")


class SampleConfig(_Section):
    """Preview images made during training (the same function as `POST /v1/generate`)."""

    every: int = Field(50, ge=0, description="Make previews every N steps (and at step 0 and the end); 0 turns previews off.")
    prompts: list[Union[str, SamplePrompt]] = Field(DEFAULT_SAMPLE_PROMPTS, description="Preview prompts: strings or {prompt, seed, ...} objects.")
    seed: int = Field(42, description="Base seed of the previews.")
    walk_seed: bool = Field(True, description="Prompt i without its own seed uses `seed + i`.")
    width: int = Field(1024, ge=64, description="Preview width in pixels.")
    height: int = Field(1024, ge=64, description="Preview height in pixels.")
    steps: int = Field(20, ge=1, description="Flow-match Euler steps per preview.")
    guidance: float = Field(3.5, ge=0, description="Guidance scale of the previews (3.5-4 for dev).")
    mode: Literal["auto", "inline", "actor"] = Field("auto", description="Who renders: `inline` every rank, stopping training; `actor` one Ray actor, from each step's LoRA file, while training goes on; `auto` the actor under Ray where the cluster has room for it (with GPU workers: only if `actor_gpus` > 0), else inline (`--local` is always inline).")
    actor_cpus: float = Field(1, gt=0, description="CPUs reserved for the preview actor.")
    actor_gpus: float = Field(0, ge=0, description="GPUs (or a fraction) reserved for the preview actor; 0 renders on CPU, so `auto` stays inline on a GPU job.")

    @field_validator("prompts")
    @classmethod
    def _prompt_flags(cls, v: list) -> list:
        # Inline kohya/ai-toolkit flags (`--w 768 --d 42`) fail here, at load, not in a worker.
        for i, p in enumerate(v):
            try:
                parse_prompt_flags(p if isinstance(p, str) else p.prompt, f"prompt {i}")
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("width", "height")
    @classmethod
    def _mult16(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"must be a multiple of 16, got {v}")
        return v


class SaveConfig(_Section):
    """Checkpoints and LoRA files."""

    every: int = Field(250, ge=1, description="Save a checkpoint and a LoRA file every N steps.")
    keep_last: int = Field(3, ge=1, description="Checkpoints kept on disk; older ones are deleted.")
    name: str | None = Field(None, description="Name of the run and its LoRA file; `None` derives `<trigger>-<date>-<time>`.")
    dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Dtype of the saved LoRA tensors.")
    kohya: bool = Field(True, description="Also write `<name>.kohya.safetensors` in kohya's `lora_unet_*` format.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        # It names folders and files under storage.root: it must not climb out of them.
        if v is not None and (not v or "/" in v or "\\" in v or "\0" in v or v.startswith(".")
                              or len(v.encode("utf-8")) > 200):
            raise ValueError(f"must be a plain file name of at most 200 bytes (no '/', '\\', NUL or leading '.'), "
                             f"got {v!r}")
        return v


class DistributedConfig(_Section):
    """Ray Train workers and the DeepSpeed ZeRO stage inside them."""

    workers: int = Field(1, ge=1, description="Ray Train workers (one per GPU on a GPU cluster).")
    gpus_per_worker: Union[float, Literal["auto"]] = Field("auto", description="GPUs per worker; `auto` is 1 when the Ray cluster has GPUs, else 0 (CPU).")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker.")
    zero_stage: Union[Literal["auto"], Literal[0, 2, 3]] = Field("auto", description="DeepSpeed ZeRO stage: 0 replicated, 2 sharded optimizer+grads, 3 sharded base too; `auto`: the memory plan's fastest setting that fits each GPU (docs/memory.md).")
    max_failures: int = Field(2, ge=0, description="Worker failures survived by resuming from the last checkpoint.")
    resources_per_worker: dict[str, float] = Field({}, description="Other Ray resources each worker needs, e.g. a custom accelerator resource `{accel: 1}` that generation asks for too.")
    placement: Literal["pack", "spread"] = Field("pack", description="Where Ray puts the workers: `pack` fills a node first, `spread` one per node as far as it can.")
    start_timeout_s: float = Field(600, gt=0, description="Seconds a job first in the queue waits for resources no fluxray job holds, and its workers take to start, before it fails saying why.")

    @field_validator("zero_stage", mode="before")
    @classmethod
    def _stage(cls, v: Any) -> Any:
        if v not in ("auto", 0, 2, 3):
            raise ValueError(f"must be auto, 0, 2 or 3 (ZeRO-1 is not offered: stage 2 costs the same for a LoRA), got {v!r}")
        return v

    @field_validator("gpus_per_worker")
    @classmethod
    def _gpus(cls, v: Any) -> Any:
        if v != "auto" and v < 0:
            raise ValueError(f"must be >= 0 or 'auto', got {v}")
        return v

    @field_validator("resources_per_worker")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if name in ("CPU", "GPU"):
                raise ValueError(f"{name} has its own key: set distributed.{name.lower()}s_per_worker")
            if amount < 0:
                raise ValueError(f"{name}: must be >= 0, got {amount}")
        return v


class TrackingConfig(_Section):
    """MLflow tracking."""

    uri: str | None = Field(None, description="MLflow tracking URI; `None` takes $MLFLOW_TRACKING_URI, else a sqlite store under the storage root.")
    experiment: str = Field("fluxray", description="MLflow experiment of the runs.")
    register_model: str | None = Field(None, description="Register the final LoRA in the MLflow model registry under this name.")


class StorageConfig(_Section):
    """Where everything a job reads and writes lives."""

    root: str = Field("~/fluxray", description="Where datasets, caches, runs, LoRAs and the local MLflow store go: a path, the same on every node (an NFS/EFS mount on a cluster).")
    checkpoints: str | None = Field(None, description="Where Ray Train keeps the checkpoints: `None` is `<root>/ray`; any `storage_path` Ray accepts (s3://, gs://, a shared path).")

    @field_validator("root")
    @classmethod
    def _local_root(cls, v: str) -> str:
        if "://" in v:
            raise ValueError(f"must be a path mounted at the same place on every node; put an object-store URI in storage.checkpoints, got {v!r}")
        return v


class ValidationConfig(_Section):
    """The fixed-noise validation loss (fixed images, σ values and noise), comparable across runs,
    and optionally the previews' similarity to the training images.

    It is the loss of the weights the LoRA file holds (the EMA when `train.ema` is on), so the
    plateau and the best checkpoint judge the files a user keeps.
    """

    every: int | None = Field(None, ge=1, description="Fixed-noise validation loss every N steps; `None` follows `sample.every` (or `save.every` if previews are off).")
    images: int = Field(4, ge=1, description="Training images held fixed for the validation loss.")
    sigmas: list[float] = Field([0.1, 0.3, 0.5, 0.7, 0.9], min_length=1, description="Fixed σ values of the validation loss.")
    embedding_model: str | None = Field(None, min_length=1, description="CLIP vision model (a local folder or hub id, e.g. `openai/clip-vit-large-patch14`; `tiny`: the demo model's likeness embedder) that scores each preview step by the previews' similarity to the training images (`sample_similarity`); `None` turns it off.")


class JobConfig(_Section):
    """A whole training job. Every default of fluxray lives in this tree."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    save: SaveConfig = Field(default_factory=SaveConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "JobConfig":
        if self.model.dtype == "bf16" and self.train.mixed_precision == "no":
            raise ValueError("model.dtype=bf16 computes in bf16, which train.mixed_precision=no refuses: set "
                             "train.mixed_precision to bf16 (or auto), or model.dtype to fp32, got model.dtype=bf16 "
                             "with train.mixed_precision=no")
        if self.train.warmup_steps >= self.train.steps and self.train.warmup_steps > 0:
            raise ValueError(
                f"train.warmup_steps ({self.train.warmup_steps}) must be below train.steps ({self.train.steps})")
        if self.model.quantize in QUANTIZED and self.distributed.zero_stage == 3:
            raise ValueError(f"model.quantize={self.model.quantize} with distributed.zero_stage=3: ZeRO-3 shards plain "
                             "tensors, not quantized ones; use zero_stage 0 or 2 (each worker holds the quantized base) "
                             "or quantize none (ZeRO-3 shards the bf16 base), got distributed.zero_stage=3")
        if self.validation.embedding_model and not self.sample.every:
            raise ValueError("validation.embedding_model scores the previews, which sample.every = 0 turns off: "
                             "set sample.every or remove validation.embedding_model, got sample.every=0")
        return self

    # -- derived values ----------------------------------------------------------------
    @property
    def storage_root(self) -> Path:
        return Path(os.path.expanduser(self.storage.root)).resolve()

    @property
    def validation_every(self) -> int:
        return self.validation.every or self.sample.every or self.save.every

    def sample_prompts(self, trigger: str) -> list[SamplePrompt]:
        """The preview prompts resolved: `[trigger]` replaced, seed, size and guidance filled in."""
        out = []
        for i, p in enumerate(self.sample.prompts):
            p = SamplePrompt(prompt=p) if isinstance(p, str) else p
            text, flags = parse_prompt_flags(p.prompt, f"sample.prompts.{i}")
            p = p.model_copy(update={"prompt": text, **flags})  # flags win, as in ai-toolkit
            seed = p.seed if p.seed is not None else self.sample.seed + (i if self.sample.walk_seed else 0)
            out.append(SamplePrompt(
                prompt=p.prompt.replace("[trigger]", trigger), seed=seed,
                width=p.width or self.sample.width, height=p.height or self.sample.height,
                guidance=p.guidance if p.guidance is not None else self.sample.guidance,
                steps=p.steps or self.sample.steps,
                lora_scale=p.lora_scale if p.lora_scale is not None else 1.0))
        return out

    def flat(self) -> dict[str, Any]:
        """Dotted-key view of the whole resolved config (MLflow params)."""
        return _flatten(self.model_dump(mode="json"))


# ---------------------------------------------------------------------------------------
# Loading, overrides and error messages
# ---------------------------------------------------------------------------------------

def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def all_keys(model: type[BaseModel] = JobConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree, sections included."""
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel) and ann is not SamplePrompt:
            keys.extend(all_keys(ann, key + "."))
    return keys


def _suggest(key: str) -> str:
    keys = all_keys()
    head, _, leaf = key.rpartition(".")
    if head.startswith("sample.prompts."):  # a key inside one prompt object
        keys = [f"{head}.{f}" for f in SamplePrompt.model_fields]
    # The right word in the wrong section (`lr` -> `train.lr`) beats a spelling match.
    near = [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k != key][:1]
    if not near:
        near = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not near:
        leaves = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in keys], n=1, cutoff=0.6)
        near = [k for k in keys if leaves and k.rsplit(".", 1)[-1] == leaves[0]][:1]
    return f" (did you mean `{near[0]}`?)" if near else ""


def _loc_key(loc: tuple) -> str:
    # Drop pydantic's union-branch tags (`str`, `SamplePrompt`, `literal['auto']`) from the path.
    parts = [str(p) for p in loc
             if isinstance(p, int) or not (p[:1].isupper() or "[" in p or p in ("str", "int", "float", "bool"))]
    return ".".join(parts) or "(top level)"


# A value quoted in an error, bounded: YAML aliases can nest a small text exponentially deep
# (a "billion laughs"), and a full repr of that would take minutes.
_VALUE = reprlib.Repr()
_VALUE.maxlevel, _VALUE.maxstring, _VALUE.maxother = 3, 200, 200


def _format_errors(err: ValidationError, head: str) -> str:
    found: dict[str, list[str]] = {}
    for e in err.errors():
        key = _loc_key(e["loc"])
        if e["type"] == "extra_forbidden":
            found.setdefault(key, []).append(f"unknown key{_suggest(key)}")
        elif e["type"] == "missing":
            found.setdefault(key, []).append("required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "got " not in msg:
                msg += f", got {_VALUE.repr(e.get('input'))}"
            found.setdefault(key, []).append(msg)
    # A union reports every branch; keep the most specific path, and join a key's alternatives.
    keys = [k for k in found if not any(o != k and o.startswith(k + ".") for o in found)]
    lines = [f"{k}: {' or '.join(dict.fromkeys(found[k]))}" for k in keys]
    return f"{head}:\n  " + "\n  ".join(lines)


def parse_yaml_text(text: str, source: str = "") -> dict[str, Any]:
    """Safe-load YAML that must be a mapping; errors say where."""
    if "\t" in text:
        line = next(i for i, ln in enumerate(text.splitlines(), 1) if "\t" in ln)
        raise ConfigError(f"{source or 'config'}: line {line}: YAML forbids tabs for indentation; use spaces")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source or 'config'}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source or 'config'}: must be a mapping of sections (model, dataset, train, ...), got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected dotted.key=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {e}") from None
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: `{'.'.join(parts[:i + 1])}` is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def build_config(data: dict[str, Any], overrides: list[str] = (), source: str = "") -> JobConfig:
    """Validate a config mapping (plus overrides) into a JobConfig, or raise ConfigError naming
    `source`, or the `--set` values when the mapping is valid without them."""
    merged = copy.deepcopy(data)
    for o in overrides:
        apply_override(merged, o)
    try:
        return JobConfig.model_validate(merged)
    except ValidationError as e:
        head = f"invalid config{f' {source}' if source else ''}"
        if overrides and _valid(data):
            head = "invalid " + " ".join(f"--set {o}" for o in overrides)
        raise ConfigError(_format_errors(e, head)) from None


def _valid(data: dict[str, Any]) -> bool:
    try:
        JobConfig.model_validate(data)
        return True
    except ValidationError:
        return False


def read_yaml_file(path: str | Path, kind: str = "config") -> dict[str, Any]:
    """A YAML file that must be a mapping (a job config, an ai-toolkit config); errors name the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{kind} file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {kind} {p}: {e}") from None
    return parse_yaml_text(text, str(p))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> JobConfig:
    """Load a YAML job config (or the defaults when `path` is None) with `--set` overrides."""
    data = read_yaml_file(path) if path is not None else {}
    return build_config(data, overrides, str(path) if path else "")


def dump_config(cfg: JobConfig) -> str:
    """The resolved config as YAML (what a job actually ran with)."""
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=False), sort_keys=False)


def reference_markdown() -> str:
    """docs/config.md: every key, its type, default and doc, straight from the model tree."""
    lines = ["# Job config reference", "",
             "Generated from `fluxray/config.py` by `fluxray config --reference`; a test keeps it in sync.",
             "Set any key in a YAML file or with `--set dotted.key=value` (values are YAML).", ""]
    for section, field in JobConfig.model_fields.items():
        model = field.annotation
        lines += [f"## `{section}`", "", inspect.cleandoc(model.__doc__ or ""), "",
                  "| key | default | what it does |", "|---|---|---|"]
        for name, f in model.model_fields.items():
            default = f.default_factory() if f.default_factory else f.default
            shown = json_default(default)
            lines.append(f"| `{section}.{name}` | `{shown}` | {f.description or ''} |")
        lines.append("")
    return "\n".join(lines)


def json_default(value: Any) -> str:
    import json

    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
