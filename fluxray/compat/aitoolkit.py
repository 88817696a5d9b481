"""Import an ai-toolkit FLUX LoRA config (`config.process[0]`) as a fluxray job config.

Every key of the file either maps to a fluxray key or is listed in the report with the
reason it did not; nothing is dropped silently. The result is validated like any config,
and errors name both the ai-toolkit key and the fluxray key it became.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from fluxray.config import JobConfig, build_config, read_yaml_file
from fluxray.errors import ConfigError

_DTYPES = {"float16": "fp16", "fp16": "fp16", "half": "fp16", "bfloat16": "bf16", "bf16": "bf16",
           "float32": "fp32", "fp32": "fp32", "float": "fp32"}
_PRECISION = {"bf16": "bf16", "fp32": "no"}  # train.dtype -> train.mixed_precision; no fp16 (see precision)
_OPTIMIZERS = ("adamw", "adamw8bit", "adam8bit", "adam")
_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
_TIMESTEPS = {"sigmoid": "sigmoid", "linear": "uniform"}  # ai-toolkit `linear` spaces σ evenly


@dataclass
class ImportReport:
    """The imported config, where each ai-toolkit key went, and what did not map."""

    source: str
    config: JobConfig
    data: dict[str, Any]  # only the fluxray keys set from the file: defaults stay defaults
    mapped: list[tuple[str, str, str]] = field(default_factory=list)  # (ai-toolkit key, fluxray key, note)
    same: list[tuple[str, str]] = field(default_factory=list)  # (ai-toolkit key, what fluxray always does)
    unmapped: list[tuple[str, str]] = field(default_factory=list)  # (ai-toolkit key, why)

    def format(self) -> str:
        lines = [f"imported {self.source}: {len(self.mapped)} key(s) mapped, {len(self.same)} already fluxray's "
                 f"behaviour, {len(self.unmapped)} not mapped"]
        for src, dst, note in self.mapped:
            lines.append(f"  {src} -> {dst}{f'  ({note})' if note else ''}")
        if self.same:
            lines.append("already what fluxray does:")
            lines += [f"  {src}: {what}" for src, what in self.same]
        if self.unmapped:
            lines.append("not mapped:")
            lines += [f"  {src}: {why}" for src, why in self.unmapped]
        return "\n".join(lines)

    def to_yaml(self, out_name: str = "CONFIG.yaml") -> str:
        """The fluxray YAML, opened (as every shipped config) with the command that runs it."""
        head = [f"# Imported from the ai-toolkit config {self.source} (fluxray import-config ai-toolkit).",
                f"#   fluxray train --config {out_name} --local",
                f"#   ray job submit --working-dir . -- python jobs/train.py --config {out_name}"]
        if self.unmapped:
            head.append("# Not mapped:")
            head += [f"#   {src}: {why}" for src, why in self.unmapped]
        ordered = {k: self.data[k] for k in JobConfig.model_fields if k in self.data}
        return "\n".join(head) + "\n" + yaml.safe_dump(ordered, sort_keys=False)


class _Importer:
    """Walks the ai-toolkit tree; each visit either sets a fluxray key or records why not."""

    def __init__(self):
        self.data: dict[str, Any] = {}
        self.mapped: list[tuple[str, str, str]] = []
        self.same: list[tuple[str, str]] = []
        self.unmapped: list[tuple[str, str]] = []

    def set(self, src: str, dst: str, value: Any, note: str = "") -> None:
        section, _, key = dst.partition(".")
        self.data.setdefault(section, {})[key] = value
        self.mapped.append((src, dst, note))

    def skip(self, src: str, why: str) -> None:
        self.unmapped.append((src, why))

    def keep(self, src: str, what: str) -> None:
        """A key whose value is what fluxray always does: nothing to set."""
        self.same.append((src, what))

    def only(self, expected: Any, what: str, why: str) -> Callable[[str, Any], None]:
        """A key fluxray supports only at `expected` (its fixed behaviour, `what`)."""
        return lambda p, v: self.keep(p, what) if v == expected else self.skip(p, why)

    def section(self, src: str, node: Any, table: dict[str, Callable[[str, Any], None]], default_why: str) -> None:
        if node is None:
            return
        if not isinstance(node, dict):
            raise ConfigError(f"{src}: must be a mapping, got {type(node).__name__}")
        for key, value in node.items():
            path = f"{src}.{key}"
            if key in table:
                table[key](path, value)
            else:
                self.skip(path, default_why)


def import_aitoolkit(path: str | Path) -> ImportReport:
    """Read an ai-toolkit YAML file and convert it; see `convert_aitoolkit`."""
    return convert_aitoolkit(read_yaml_file(path, "ai-toolkit config"), str(path))


def convert_aitoolkit(doc: dict[str, Any], source: str = "ai-toolkit config") -> ImportReport:
    """A fluxray config from an ai-toolkit FLUX LoRA config mapping, with the report."""
    im = _Importer()
    config = doc.get("config")
    processes = config.get("process") if isinstance(config, dict) else None
    if not isinstance(processes, list) or not processes or not isinstance(processes[0], dict):
        raise ConfigError(f"{source}: not an ai-toolkit config: expected config.process[0] (a list of mappings)")
    for key in doc:
        if key == "meta":
            im.skip("meta", "ai-toolkit's own metadata; fluxray writes trigger, base model and steps into the LoRA header")
        elif key == "job":
            im.only("extension", "a training job", f"not an ai-toolkit training job: {doc[key]!r}")("job", doc[key])
        elif key != "config":
            im.skip(key, "not an ai-toolkit key fluxray knows")
    for key, value in config.items():
        if key == "name":
            im.set("config.name", "save.name", str(value), "run and LoRA file name")
        elif key != "process":
            im.skip(f"config.{key}", "not an ai-toolkit key fluxray knows")
    for i in range(1, len(processes)):
        im.skip(f"config.process[{i}]", "fluxray imports the first process only")
    _process(im, "config.process[0]", processes[0])
    try:
        cfg = build_config(im.data, source=f"{source} (imported from ai-toolkit)")
    except ConfigError as e:
        origins = [f"{src} -> {dst}" for src, dst, _ in im.mapped if dst in str(e)]
        raise ConfigError(f"{e}\n  from the ai-toolkit key(s): {', '.join(origins)}" if origins else str(e)) from None
    return ImportReport(source, cfg, im.data, im.mapped, im.same, im.unmapped)


# ---------------------------------------------------------------------------------------
# One function per ai-toolkit section
# ---------------------------------------------------------------------------------------

def _process(im: _Importer, src: str, proc: dict) -> None:
    kind = proc.get("type", "sd_trainer")
    if kind not in ("sd_trainer", "ui_trainer"):
        raise ConfigError(f"{src}.type: fluxray imports LoRA training processes (sd_trainer), got {kind!r}")
    model = proc.get("model") or {}
    if model.get("is_flux") is False or model.get("arch", "flux") not in ("flux", "flux1"):
        raise ConfigError(f"{src}.model: fluxray trains FLUX.1 LoRAs, got "
                          f"is_flux={model.get('is_flux')!r} arch={model.get('arch')!r}")
    table = {
        "type": lambda p, v: im.keep(p, "a LoRA training job"),
        "trigger_word": lambda p, v: im.set(p, "dataset.trigger_word", str(v)),
        "training_folder": lambda p, v: im.skip(p, "fluxray writes runs, LoRAs and caches under storage.root"),
        "device": lambda p, v: im.skip(p, "Ray places the workers on GPUs (distributed.workers)"),
        "performance_log_every": lambda p, v: im.skip(p, "fluxray logs step time and MFU every step"),
        "network": lambda p, v: im.section(p, v, _network(im), "no fluxray equivalent"),
        "save": lambda p, v: im.section(p, v, _save(im), "no fluxray equivalent"),
        "datasets": lambda p, v: _datasets(im, p, v),
        "train": lambda p, v: im.section(p, v, _train(im), "no fluxray equivalent"),
        "model": lambda p, v: im.section(p, v, _model(im), "no fluxray equivalent"),
        "sample": lambda p, v: im.section(p, v, _sample(im), "no fluxray equivalent"),
        "logging": lambda p, v: im.skip(p, "fluxray logs every step to MLflow (tracking.*)"),
    }
    im.section(src, proc, table, "not an ai-toolkit key fluxray knows")


def _network(im: _Importer) -> dict:
    return {"type": lambda p, v: im.only("lora", "a plain LoRA", f"fluxray trains plain LoRA, not {v!r}")(p, str(v).lower()),
            "linear": lambda p, v: im.set(p, "lora.rank", _int(p, v)),
            "linear_alpha": lambda p, v: im.set(p, "lora.alpha", _float(p, v), "baked into the saved weights"),
            "conv": lambda p, v: im.skip(p, "FLUX has no conv layers to adapt"),
            "conv_alpha": lambda p, v: im.skip(p, "FLUX has no conv layers to adapt"),
            "network_kwargs": lambda p, v: im.skip(p, "set the modules with lora.targets")}


def _save(im: _Importer) -> dict:
    def dtype(p, v):
        if str(v).lower() not in _DTYPES:
            raise ConfigError(f"{p}: unknown dtype {v!r} (float16, bfloat16 or float32)")
        im.set(p, "save.dtype", _DTYPES[str(v).lower()])

    hub = "fluxray does not push to the Hub; register the LoRA with tracking.register_model or upload the file"
    return {"dtype": dtype,
            "save_every": lambda p, v: im.set(p, "save.every", _int(p, v)),
            "max_step_saves_to_keep": lambda p, v: im.set(p, "save.keep_last", _int(p, v)),
            "push_to_hub": im.only(False, "no Hub upload", hub),
            "hf_repo_id": lambda p, v: im.skip(p, hub),
            "hf_private": lambda p, v: im.skip(p, hub),
            "save_format": lambda p, v: im.skip(p, "fluxray writes the diffusers file and, with save.kohya, a kohya one")}


def _datasets(im: _Importer, src: str, datasets: Any) -> None:
    if not isinstance(datasets, list) or not datasets:
        raise ConfigError(f"{src}: must be a list of datasets, got {datasets!r}")
    for i in range(1, len(datasets)):
        im.skip(f"{src}[{i}]", "fluxray trains on one dataset folder; merge the folders or run one job each")

    def caption_ext(p, v):
        im.only("txt", ".txt caption sidecars", "fluxray reads .txt sidecars, captions.json or metadata.jsonl")(
            p, str(v).lstrip(".").lower())

    def resolution(p, v):
        im.set(p, "dataset.resolutions", [_int(p, r) for r in (v if isinstance(v, list) else [v])])

    table = {"folder_path": lambda p, v: im.set(p, "dataset.path", str(v), "prepared on submit"),
             "caption_ext": caption_ext,
             "caption_dropout_rate": lambda p, v: im.set(p, "dataset.caption_dropout", _float(p, v)),
             "shuffle_tokens": im.only(False, "captions in their order", "fluxray keeps caption order"),
             "cache_latents_to_disk": lambda p, v: im.set(p, "dataset.cache_latents", bool(v)),
             "cache_latents": lambda p, v: im.set(p, "dataset.cache_latents", bool(v)),
             "cache_text_embeddings": lambda p, v: im.set(p, "dataset.cache_text_embeddings", bool(v)),
             "resolution": resolution}
    im.section(f"{src}[0]", datasets[0], table, "no fluxray equivalent")


def _train(im: _Importer) -> dict:
    def optimizer(p, v):
        name = str(v).lower()
        if name not in _OPTIMIZERS:
            return im.skip(p, f"fluxray uses torch AdamW; {v!r} has no equivalent (the default adamw applies)")
        im.set(p, "train.optimizer", "adamw", "" if name == "adamw" else f"{v} -> torch AdamW (32-bit state)")

    def scheduler(p, v):
        if str(v) in _SCHEDULERS:
            im.set(p, "train.lr_scheduler", str(v))
        else:
            im.skip(p, f"no {v!r} schedule in fluxray ({', '.join(_SCHEDULERS)})")

    def timesteps(p, v):
        if str(v) in _TIMESTEPS:
            im.set(p, "train.timestep_sampling", _TIMESTEPS[str(v)])
        else:
            im.skip(p, f"no {v!r} timestep sampling in fluxray (sigmoid or uniform; shift with train.timestep_shift)")

    def precision(p, v):
        if str(v).lower() not in _DTYPES:
            raise ConfigError(f"{p}: unknown dtype {v!r} (bf16, fp16 or fp32)")
        dtype = _DTYPES[str(v).lower()]
        if dtype not in _PRECISION:
            return im.skip(p, f"fluxray does not train in {v} (FLUX's activations overflow fp16): it trains the LoRA in "
                              "fp32 with a bf16 forward (train.mixed_precision: auto, which is bf16 on a GPU)")
        im.set(p, "train.mixed_precision", _PRECISION[dtype])

    def ema(p, v):
        table = {"use_ema": lambda q, w: im.set(q, "train.ema", bool(w)),
                 "ema_decay": lambda q, w: im.set(q, "train.ema_decay", _float(q, w))}
        im.section(p, v, table, "no fluxray equivalent")

    return {"batch_size": lambda p, v: im.set(p, "train.batch_size", _int(p, v)),
            "steps": lambda p, v: im.set(p, "train.steps", _int(p, v)),
            "gradient_accumulation_steps": lambda p, v: im.set(p, "train.grad_accum", _int(p, v)),
            "gradient_accumulation": lambda p, v: im.set(p, "train.grad_accum", _int(p, v)),
            "train_unet": im.only(True, "trains the transformer", "fluxray always trains the transformer"),
            "train_text_encoder": im.only(False, "text encoders frozen",
                                          "fluxray trains the transformer only (FLUX's text encoders stay frozen)"),
            "gradient_checkpointing": lambda p, v: im.set(p, "train.gradient_checkpointing", "on" if v else "off"),
            "noise_scheduler": im.only("flowmatch", "rectified flow", "fluxray trains FLUX with rectified flow only"),
            "optimizer": optimizer,
            "lr": lambda p, v: im.set(p, "train.lr", _float(p, v)),
            "lr_scheduler": scheduler,
            "max_grad_norm": lambda p, v: im.set(p, "train.max_grad_norm", _float(p, v)),
            "ema_config": ema,
            "dtype": precision,
            "timestep_type": timesteps,
            "disable_sampling": lambda p, v: im.set(p, "sample.every", 0) if v else im.keep(p, "previews on"),
            "linear_timesteps": im.only(False, "unweighted loss", "fluxray has no timestep loss weighting"),
            "skip_first_sample": im.only(False, "a preview at step 0",
                                         "fluxray always previews step 0 (the base model)")}


def _model(im: _Importer) -> dict:
    return {"name_or_path": lambda p, v: im.set(p, "model.path", str(v)),
            "is_flux": lambda p, v: im.keep(p, "FLUX.1"),
            "arch": lambda p, v: im.keep(p, "FLUX.1"),
            "quantize": im.only(False, "a bf16 base", "fluxray keeps the base in bf16; on 24 GB GPUs train with "
                                                      "several workers (ZeRO-3) and gradient checkpointing"),
            "low_vram": im.only(False, "no low-VRAM mode", "no low-VRAM mode; see quantize")}


def _sample(im: _Importer) -> dict:
    def prompts(p, v):
        if not isinstance(v, list):
            raise ConfigError(f"{p}: must be a list of prompts, got {v!r}")
        im.set(p, "sample.prompts", [str(x) for x in v], "inline --w --h --seed --steps flags kept")

    def samples(p, v):
        if not isinstance(v, list):
            raise ConfigError(f"{p}: must be a list of {{prompt, ...}} mappings, got {v!r}")
        keys = {"prompt": "prompt", "seed": "seed", "width": "width", "height": "height",
                "guidance_scale": "guidance", "sample_steps": "steps", "network_multiplier": "lora_scale"}
        out = []
        for i, item in enumerate(v):
            if not isinstance(item, dict):
                raise ConfigError(f"{p}[{i}]: must be a mapping with a prompt, got {item!r}")
            for k, w in item.items():
                if k == "neg" and w:
                    im.skip(f"{p}[{i}].neg", "FLUX.1-dev ignores negative prompts")
                elif k not in keys and k != "neg":
                    im.skip(f"{p}[{i}].{k}", "no fluxray equivalent")
            out.append({keys[k]: w for k, w in item.items() if k in keys})
        im.set(p, "sample.prompts", out)

    return {"sampler": im.only("flowmatch", "flow-match Euler previews",
                               "fluxray previews with FLUX's flow-match Euler scheduler"),
            "sample_every": lambda p, v: im.set(p, "sample.every", _int(p, v)),
            "width": lambda p, v: im.set(p, "sample.width", _int(p, v)),
            "height": lambda p, v: im.set(p, "sample.height", _int(p, v)),
            "prompts": prompts,
            "samples": samples,
            "neg": im.only("", "no negative prompt", "FLUX.1-dev ignores negative prompts"),
            "seed": lambda p, v: im.set(p, "sample.seed", _int(p, v)),
            "walk_seed": lambda p, v: im.set(p, "sample.walk_seed", bool(v)),
            "guidance_scale": lambda p, v: im.set(p, "sample.guidance", _float(p, v)),
            "sample_steps": lambda p, v: im.set(p, "sample.steps", _int(p, v))}


def _int(src: str, v: Any) -> int:
    try:
        if isinstance(v, bool) or float(v) != int(float(v)):
            raise ValueError
        return int(float(v))
    except (TypeError, ValueError):
        raise ConfigError(f"{src}: must be an integer, got {v!r}") from None


def _float(src: str, v: Any) -> float:
    # YAML 1.1 reads `1e-4` (no dot) as a string; ai-toolkit's examples write it that way.
    try:
        if isinstance(v, bool):
            raise ValueError
        return float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{src}: must be a number, got {v!r}") from None
