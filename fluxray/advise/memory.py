"""Peak GPU memory of one training worker, part by part, and the settings `auto` takes.

Pure arithmetic on the model's configs and the job config, no torch. Each part counts the bytes a
FLUX LoRA step keeps, term by term from the architecture: the frozen base (bf16, quantized or a
ZeRO-3 shard), the LoRA with its gradients, Adam moments and EMA, the activations kept for the
backward pass, and the text encoders while the caches fill. tests/advise/test_memory.py checks
every part against bytes measured on CPU at a mid-size model, and the FLUX.1-dev totals against
the published figures. `choose` walks the settings fastest first and takes the first that fits.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path

from fluxray.config import JobConfig
from fluxray.errors import ConfigError
from fluxray.track.flops import FLUX1_DEV, GPUS, Gpu, find_gpu

#: Share of a card kept free: the CUDA context, the caching allocator's slack, fragmentation.
HEADROOM = 0.10
#: The GPU to plan for when neither `--gpu` nor this machine names one.
REFERENCE_GPU = "H100"
#: FLUX.1-dev's text encoders and VAE (their config.json fields the count uses), for a model not on disk.
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "num_heads": 64, "d_ff": 10240, "num_layers": 24,
          "relative_attention_num_buckets": 32, "feed_forward_proj": "gated-gelu"}
CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "max_position_embeddings": 77}
FLUX1_DEV_VAE = {"params": 83_819_683, "block_out_channels": [128, 256, 512, 512]}
#: Transformer config fields that FLUX1_DEV leaves to diffusers' defaults.
_DEFAULTS = {"pooled_projection_dim": 768, "guidance_embeds": True, "patch_size": 1, "out_channels": None}
#: DeepSpeed's default `stage3_prefetch_bucket_size`: elements fetched ahead of the module that runs.
ZERO3_PREFETCH = 50_000_000
_BF16 = 2


# ---------------------------------------------------------------------------------------
# The transformer, layer by layer
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Linear:
    """One `nn.Linear` of `FluxTransformer2DModel`; `stream` is which tokens pass through it."""

    name: str
    fan_in: int
    fan_out: int
    block: int | None  # index of its double (0..) or single (num_layers..) block; None outside them
    stream: str  # "image", "text", "joint" (single blocks) or "sample" (once per sample)


def transformer_linears(dims: dict) -> list[Linear]:
    """Every linear layer of `FluxTransformer2DModel` with this config, named as diffusers names them."""
    dims = {**_DEFAULTS, **dims}
    d = dims["num_attention_heads"] * dims["attention_head_dim"]
    mlp = 4 * d
    out = [Linear("time_text_embed.timestep_embedder.linear_1", 256, d, None, "sample"),
           Linear("time_text_embed.timestep_embedder.linear_2", d, d, None, "sample")]
    if dims["guidance_embeds"]:
        out += [Linear("time_text_embed.guidance_embedder.linear_1", 256, d, None, "sample"),
                Linear("time_text_embed.guidance_embedder.linear_2", d, d, None, "sample")]
    out += [Linear("time_text_embed.text_embedder.linear_1", dims["pooled_projection_dim"], d, None, "sample"),
            Linear("time_text_embed.text_embedder.linear_2", d, d, None, "sample"),
            Linear("context_embedder", dims["joint_attention_dim"], d, None, "text"),
            Linear("x_embedder", dims["in_channels"], d, None, "image")]
    for i in range(dims["num_layers"]):
        p = f"transformer_blocks.{i}."
        out += [Linear(p + "norm1.linear", d, 6 * d, i, "sample"), Linear(p + "norm1_context.linear", d, 6 * d, i, "sample")]
        for name, stream in (("to_q", "image"), ("to_k", "image"), ("to_v", "image"), ("to_out.0", "image"),
                             ("add_q_proj", "text"), ("add_k_proj", "text"), ("add_v_proj", "text"),
                             ("to_add_out", "text")):
            out.append(Linear(p + "attn." + name, d, d, i, stream))
        for ff, stream in (("ff", "image"), ("ff_context", "text")):
            out += [Linear(p + ff + ".net.0.proj", d, mlp, i, stream), Linear(p + ff + ".net.2", mlp, d, i, stream)]
    for j in range(dims["num_single_layers"]):
        p, i = f"single_transformer_blocks.{j}.", dims["num_layers"] + j
        out += [Linear(p + "norm.linear", d, 3 * d, i, "sample"), Linear(p + "proj_mlp", d, mlp, i, "joint"),
                Linear(p + "proj_out", d + mlp, d, i, "joint")]
        out += [Linear(p + "attn." + n, d, d, i, "joint") for n in ("to_q", "to_k", "to_v")]
    out_channels = dims["out_channels"] or dims["in_channels"]
    out += [Linear("norm_out.linear", d, 2 * d, None, "sample"),
            Linear("proj_out", d, dims["patch_size"] ** 2 * out_channels, None, "image")]
    return out


def _norm_scales(dims: dict) -> int:
    """RMSNorm weights on q and k (per head): 4 per double block, 2 per single; LayerNorms have none."""
    return dims["attention_head_dim"] * (4 * dims["num_layers"] + 2 * dims["num_single_layers"])


def transformer_params(dims: dict) -> int:
    """Parameters of `FluxTransformer2DModel` with this config (FLUX.1-dev: 11,901,408,320)."""
    return sum(li.fan_in * li.fan_out + li.fan_out for li in transformer_linears(dims)) + _norm_scales(dims)


# ---------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------

def weight_bytes(fan_in: int, fan_out: int, quantize: str, dtype_bytes: int = _BF16) -> int:
    """Bytes of one linear weight as `fluxray.model.quantize` stores it.

    int8 (torchao weight-only): a byte a weight, an fp32 scale and an int8 zero point per output
    row; fp8 the same without the zero point.
    NF4 (bitsandbytes, blocks of 64, double-quantized): half a byte a weight, a uint8 absmax per
    block, an fp32 absmax per 256 blocks, the 256-entry fp32 code of that second level, its fp32
    offset and the 16-entry fp32 NF4 code.
    """
    n = fan_in * fan_out
    if quantize == "int8":
        return n + 5 * fan_out
    if quantize == "fp8":
        return n + 4 * fan_out
    if quantize == "nf4":
        blocks = math.ceil(n / 64)
        return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 + 4 * 16
    return n * dtype_bytes


def base_bytes(dims: dict, quantize: str = "none", dtype_bytes: int = _BF16) -> int:
    """The frozen transformer held whole: block linears as `quantize` stores them, the rest in `dtype_bytes`."""
    total = _norm_scales(dims) * dtype_bytes
    for li in transformer_linears(dims):
        kind = quantize if li.block is not None else "none"
        total += weight_bytes(li.fan_in, li.fan_out, kind, dtype_bytes) + li.fan_out * dtype_bytes
    return total


def zero3_base_bytes(dims: dict, workers: int, persist_numel: int, dtype_bytes: int = _BF16) -> int:
    """One rank's share of the bf16 base under ZeRO-3, plus what it gathers to run a block.

    Tensors up to `persist_numel` elements (the engine sets it to the largest LoRA tensor) stay
    whole on every rank; each larger one is split into `workers` equal parts. To run, a rank
    gathers the largest block whole and prefetches DeepSpeed's default bucket ahead of it.
    """
    sizes = [li.fan_in * li.fan_out for li in transformer_linears(dims)]
    sizes += [li.fan_out for li in transformer_linears(dims)] + [dims["attention_head_dim"]] * (
        4 * dims["num_layers"] + 2 * dims["num_single_layers"])
    held = sum(n if n <= persist_numel else math.ceil(n / workers) for n in sizes)
    per_block: dict[int, int] = {}
    for li in transformer_linears(dims):
        if li.block is not None:
            per_block[li.block] = per_block.get(li.block, 0) + li.fan_in * li.fan_out + li.fan_out
    return (held + max(per_block.values()) + ZERO3_PREFETCH) * dtype_bytes


def lora_layers(dims: dict, targets: list[str]) -> list[Linear]:
    """The linears a LoRA with these target suffixes wraps (inside the blocks, as `fluxray.model.lora`)."""
    pattern = re.compile(r".*\.(?:" + "|".join(re.escape(t) for t in targets) + r")$")
    return [li for li in transformer_linears(dims) if li.block is not None and pattern.fullmatch(li.name)]


def lora_params(dims: dict, rank: int, targets: list[str]) -> int:
    return sum(rank * (li.fan_in + li.fan_out) for li in lora_layers(dims, targets))


def lora_state_bytes(n: int, *, zero_stage: int = 0, workers: int = 1, ema: bool = True) -> int:
    """The LoRA's fp32 weights, gradients and Adam moments, and its EMA, on one worker.

    Stage 0 keeps all of them on every worker, and with several workers DeepSpeed all-reduces the
    gradients through one flat fp32 copy. Stages 2 and 3 keep the weights whole (stage 3: LoRA
    tensors sit under the persistence threshold) but split an fp32 master copy, the gradients and
    the moments across workers, after a whole-size reduce bucket.
    """
    ema_bytes = 4 * n if ema else 0
    if zero_stage == 0:
        allreduce = 4 * n if workers > 1 else 0
        return 4 * n + 4 * n + 8 * n + allreduce + ema_bytes
    return 4 * n + 4 * n + (4 + 4 + 8) * n // workers + ema_bytes


def _tokens(li: Linear, image: int, text: int) -> int:
    return {"image": image, "text": text, "joint": image + text}.get(li.stream, 1)


def activation_bytes(dims: dict, width: int, height: int, text_tokens: int, *, batch: int = 1, rank: int = 16,
                     targets: list[str] | None = None, checkpointing: bool = False) -> int:
    """Peak bytes of the activations of one LoRA step (bf16 autocast, fp32 LoRA), beyond the weights.

    In units of `u` = one bf16 value per token per hidden unit (batch · T · d · 2 bytes), a
    middle double-stream block keeps 23u for the backward pass: per stream, its LoRA-wrapped
    linears' inputs (peft casts each to the fp32 LoRA dtype and autocast casts it back, so q, k,
    v, out and the MLP's first linear keep 1u each and the MLP's second 4u: 9u), the two
    LayerNorm inputs (2u), q and k in fp32 for their RMSNorm (4u) and the GELU's input (4u);
    across the joint sequence the attention's q, k, v and output (4u). A single-stream block
    keeps 22u: LoRA inputs 4u + 5u (the fused output's input is 5d wide), LayerNorm 1u, RMSNorm
    4u, GELU 4u, attention 4u. Per token and block, fp32 q/k norm statistics and the
    attention's log-sum-exp (12 bytes per head); per LoRA layer its bf16-cast weights and its
    rank-r output; once, the final norm's input (1u) and the fp32 RoPE table.

    Gradient checkpointing keeps each block's input (1u) and recomputes one block at a time, so
    the peak holds those plus one whole double block. On top, the backward of the widest
    LoRA-wrapped linear (the single block's fused output) holds its input's gradient in fp32 and
    in bf16 plus the hidden state's gradient: 16u.
    """
    from fluxray.config import DEFAULT_LORA_TARGETS

    dims = {**_DEFAULTS, **dims}
    d, heads, hd = (dims["num_attention_heads"] * dims["attention_head_dim"], dims["num_attention_heads"],
                    dims["attention_head_dim"])
    image = (width // 16) * (height // 16)
    tokens = image + text_tokens
    u = batch * tokens * d * _BF16
    stats = batch * tokens * 12 * heads
    layers = lora_layers(dims, targets or DEFAULT_LORA_TARGETS)
    lora = {}  # per block: bf16 casts of its LoRA weights + its LoRA layers' rank-r outputs
    for li in layers:
        lora[li.block] = (lora.get(li.block, 0) + _BF16 * rank * (li.fan_in + li.fan_out)
                          + _BF16 * batch * rank * _tokens(li, image, text_tokens))
    double = [23 * u + stats + lora.get(i, 0) for i in range(dims["num_layers"])]
    single = [22 * u + stats + lora.get(dims["num_layers"] + j, 0) for j in range(dims["num_single_layers"])]
    rope = 2 * tokens * hd * 4
    transient = 16 * u
    if checkpointing:
        blocks = dims["num_layers"] + dims["num_single_layers"]
        return (blocks + 1) * u + rope + max(double + single) + transient
    return sum(double) + sum(single) + u + rope + transient


def t5_params(c: dict) -> int:
    """T5 encoder: shared embedding, per layer attention (q k v o) + gated FFN + 2 norms, position bias."""
    inner = c["num_heads"] * c["d_kv"]
    ffn = (3 if c.get("feed_forward_proj", "").startswith("gated") else 2) * c["d_model"] * c["d_ff"]
    layer = 4 * c["d_model"] * inner + ffn + 2 * c["d_model"]
    return (c["vocab_size"] * c["d_model"] + c["num_layers"] * layer
            + c.get("relative_attention_num_buckets", 32) * c["num_heads"] + c["d_model"])


def t5_bytes(c: dict, quantize: bool = False, dtype_bytes: int = _BF16) -> int:
    """T5 on the device; `quantize`: its linears in int8 (a scale and a zero point per row), the rest as is."""
    n = t5_params(c)
    if not quantize:
        return n * dtype_bytes
    inner = c["num_heads"] * c["d_kv"]
    wi = 2 if c.get("feed_forward_proj", "").startswith("gated") else 1
    linear = c["num_layers"] * (4 * c["d_model"] * inner + (wi + 1) * c["d_model"] * c["d_ff"])
    rows = c["num_layers"] * (3 * inner + c["d_model"] + wi * c["d_ff"] + c["d_model"])
    return linear + 5 * rows + (n - linear) * dtype_bytes


def clip_params(c: dict) -> int:
    """CLIP text model: token and position embeddings, per layer attention + MLP (with biases) + 2 norms."""
    h, i = c["hidden_size"], c["intermediate_size"]
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
    return (c["vocab_size"] + c["max_position_embeddings"]) * h + c["num_hidden_layers"] * layer + 2 * h


def vae_encode_bytes(vae: dict, width: int, height: int, dtype_bytes: int = _BF16) -> int:
    """The VAE's weights plus its encoder's working set: four full-resolution maps of its first width
    are alive at once (its mid-block attention, at 1/8 of the resolution, is left out)."""
    return vae["params"] * dtype_bytes + 4 * vae["block_out_channels"][0] * width * height * dtype_bytes


# ---------------------------------------------------------------------------------------
# The plan of one job
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """The three knobs `auto` turns."""

    quantize: str
    zero_stage: int
    checkpointing: bool

    def describe(self) -> str:
        base = "bf16 base" if self.quantize == "none" else f"{self.quantize} base"
        return f"{base}, ZeRO-{self.zero_stage}, gradient checkpointing {'on' if self.checkpointing else 'off'}"


@dataclass(frozen=True)
class ModelConfigs:
    """The configs the plan reads: the transformer's, the text encoders', the VAE's; and where from."""

    transformer: dict
    t5: dict
    clip: dict
    vae: dict
    source: str


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one worker holds at its peak, by part."""

    setting: Setting
    workers: int
    base: int  # the frozen transformer (or this rank's ZeRO-3 share plus the block it gathers)
    lora: int  # LoRA weights, gradients, Adam moments, EMA
    activations: int  # kept for the backward pass at the largest bucket, plus the backward's working set
    caches: int  # while the caches fill, before the transformer is on the device: text encoders, VAE
    resolution: tuple[int, int]  # the bucket the activations are counted at

    @property
    def steps(self) -> int:
        return self.base + self.lora + self.activations

    @property
    def peak(self) -> int:
        return max(self.steps, self.caches)

    def fits(self, gpu_bytes: float) -> bool:
        return self.peak <= (1 - HEADROOM) * gpu_bytes

    def line(self, gpu: Gpu | None, gpu_bytes: float | None = None) -> str:
        """`peak GPU memory per worker: 17.9 GiB (fits RTX 4090 24 GB)`."""
        head = f"peak GPU memory per worker: {self.peak / 2**30:.1f} GiB"
        if gpu is None:
            return head
        total = gpu_bytes or gpu.memory_gib * 2**30
        return f"{head} ({'fits' if self.fits(total) else 'does not fit'} {gpu.label})"

    def breakdown(self) -> str:
        gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
        w, h = self.resolution
        workers = f"{self.workers} worker{'s' if self.workers > 1 else ''}"
        return (f"{self.setting.describe()}, {workers}: base weights {gib(self.base)} + LoRA and "
                f"optimizer {gib(self.lora)} + activations at {w}x{h} {gib(self.activations)} = {gib(self.steps)}; "
                f"filling the caches {gib(self.caches)}")


def plan(cfg: JobConfig, setting: Setting, models: ModelConfigs | None = None,
         sizes: list[tuple[int, int]] | None = None, workers: int | None = None) -> MemoryPlan:
    """The memory plan of this config under `setting` (pure arithmetic)."""
    from fluxray.advise.estimate import training_sizes

    models = models or model_configs(cfg)
    world = workers or cfg.distributed.workers
    dims = models.transformer
    width, height = max(training_sizes(cfg, sizes), key=lambda s: s[0] * s[1])
    n = lora_params(dims, cfg.lora.rank, cfg.lora.targets)
    if setting.zero_stage == 3:
        largest = max(max(cfg.lora.rank * li.fan_in, cfg.lora.rank * li.fan_out)
                      for li in lora_layers(dims, cfg.lora.targets))
        base = zero3_base_bytes(dims, world, largest)
    else:
        base = base_bytes(dims, setting.quantize)
    lora = lora_state_bytes(n, zero_stage=setting.zero_stage, workers=world, ema=cfg.train.ema)
    text = cfg.model.max_sequence_length
    acts = activation_bytes(dims, width, height, text, batch=cfg.train.batch_size, rank=cfg.lora.rank,
                            targets=cfg.lora.targets, checkpointing=setting.checkpointing)
    encoders = t5_bytes(models.t5, cfg.model.quantize_text_encoder) + clip_params(models.clip) * _BF16
    vae = vae_encode_bytes(models.vae, width, height)
    caches = encoders + vae
    # What the cache leaves out stays on the device through the steps.
    if not cfg.dataset.cache_text_embeddings:
        acts += encoders
    if not cfg.dataset.cache_latents:
        acts += vae
    return MemoryPlan(setting, world, base, lora, acts, caches, (width, height))


# ---------------------------------------------------------------------------------------
# auto: the fastest setting that fits
# ---------------------------------------------------------------------------------------

def candidates(cfg: JobConfig, workers: int | None = None) -> list[Setting]:
    """The settings `auto` may take, fastest first.

    A bf16 base before a quantized one (no dequantizing in every matmul, and the LoRA trains on
    the weights it will be used with); without recomputation before with it; replicated
    (ZeRO-0) before sharded (ZeRO-3 gathers every weight twice a step); int8 before NF4 (more
    precise, faster kernels). fp8 is never picked: it is the size of int8 and needs compute
    capability 8.9. ZeRO-2 is never picked: for a LoRA it saves almost nothing.
    """
    world = workers or cfg.distributed.workers
    qs = ["none", "int8", "nf4"] if cfg.model.quantize == "auto" else [cfg.model.quantize]
    stages = [0, 3] if cfg.distributed.zero_stage == "auto" else [int(cfg.distributed.zero_stage)]
    ckpts = [False, True] if cfg.train.gradient_checkpointing == "auto" else [cfg.train.gradient_checkpointing == "on"]
    out = []
    for q in qs:
        for stage in stages:
            if stage == 3 and (q != "none" or world == 1 and cfg.distributed.zero_stage == "auto"):
                continue  # ZeRO-3 shards plain tensors only, and one worker has nothing to shard with
            out += [Setting(q, stage, c) for c in ckpts]
    return out


def choose(cfg: JobConfig, gpu: Gpu | None, gpu_bytes: float | None = None, *, models: ModelConfigs | None = None,
           sizes: list[tuple[int, int]] | None = None, workers: int | None = None) -> tuple[MemoryPlan, str]:
    """The plan `auto` takes on `gpu` (None: no GPU, nothing to fit) and why, with its numbers."""
    problem = check_quantize(cfg.model.quantize, gpu)
    if problem:
        raise ConfigError(problem)
    models = models or model_configs(cfg)
    options = [plan(cfg, s, models, sizes, workers) for s in candidates(cfg, workers)]
    if gpu is None:
        # On CPU memory is not the limit: the fastest setting, as the config allows.
        return options[0], f"{options[0].setting.describe()} (no GPU: nothing to fit)"
    total = gpu_bytes or gpu.memory_gib * 2**30
    room = (1 - HEADROOM) * total / 2**30
    for p in options:
        if p.fits(total):
            return p, (f"{p.setting.describe()}: {p.peak / 2**30:.1f} GiB fits {gpu.label} "
                       f"(at most {room:.1f} GiB, {HEADROOM:.0%} kept free)")
    least = min(options, key=lambda p: p.peak)
    return least, (f"{least.setting.describe()}: {least.peak / 2**30:.1f} GiB does not fit {gpu.label} "
                   f"(at most {room:.1f} GiB) even so: use more workers with ZeRO-3, a smaller resolution "
                   "or a lower rank")


def check_quantize(quantize: str, gpu: Gpu | None) -> str | None:
    """Why `quantize` cannot run on `gpu` (fp8 below compute capability 8.9), or None."""
    from fluxray.errors import FluxrayError
    from fluxray.model.quantize import check_device

    try:
        check_device(quantize, None if gpu is None else gpu.capability, gpu.label if gpu else "")
    except FluxrayError as e:
        return str(e)
    return None


def local_gpu() -> Gpu | None:
    """This machine's first CUDA device (the only place torch is imported), with the memory it
    reports; a card the table does not know has no bf16 peak. None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    gib = props.total_memory / 2**30
    known = find_gpu(props.name)
    if known is not None:
        return replace(known, memory_gib=gib)
    return Gpu(props.name, f"{props.name} {gib:.0f} GB", 0.0, gib, (props.major, props.minor))


def target_gpu(cfg: JobConfig, name: str | None = None) -> tuple[Gpu, str]:
    """The card to plan memory and time for, and a note when it is not the one the job will use:
    the one `name` names, else this machine's, else `REFERENCE_GPU`."""
    if name:
        gpu = find_gpu(name)
        if gpu is None:
            raise ConfigError(f"gpu: unknown GPU {name!r} (known: {', '.join(g.name for g in GPUS)})")
        return gpu, ""
    here = local_gpu()
    gpu = here or find_gpu(REFERENCE_GPU)
    if cfg.distributed.gpus_per_worker == 0:
        return gpu, (f"this config trains on CPU (distributed.gpus_per_worker: 0): the figure is for {gpu.name} "
                     "GPUs; --gpu names another")
    if here is None:
        return gpu, f"no GPU on this machine: the figure is for {gpu.name} GPUs; --gpu names another"
    return gpu, ""


def memory_advice(cfg: JobConfig, gpu: Gpu, gpu_bytes: float | None = None,
                  sizes: list[tuple[int, int]] | None = None):
    """The plan as one advice item (the API and the page show it with the guide's advice)."""
    from fluxray.advise.rules import Advice

    chosen, why = choose(cfg, gpu, gpu_bytes, sizes=sizes)
    fits = chosen.fits(gpu_bytes or gpu.memory_gib * 2**30)
    return Advice(id="memory.peak", severity="info" if fits else "warning", key="model.quantize",
                  message=chosen.line(gpu, gpu_bytes), fix=why)


# ---------------------------------------------------------------------------------------
# Where the configs come from
# ---------------------------------------------------------------------------------------

def component_config(cfg: JobConfig, subfolder: str, name: str = "config.json") -> tuple[dict | None, str | None]:
    """`<model>/<subfolder>/<name>` from a local folder, the shipped demo model or the HF cache, else None."""
    from fluxray.model.source import local_model_folder

    folder = local_model_folder(cfg)
    found = folder / subfolder / name if folder else None
    if found is not None and found.is_file():
        return json.loads(found.read_text()), str(found)
    return None, None


def _safetensors_params(folder: Path) -> int:
    """Elements of every tensor in a folder's safetensors files, from their headers alone."""
    total = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def model_configs(cfg: JobConfig) -> ModelConfigs:
    """The configs of `model.path` where they can be read without downloading, else FLUX.1-dev's."""
    dims, found = component_config(cfg, "transformer")
    t5 = component_config(cfg, "text_encoder_2")[0] or T5_XXL
    clip = component_config(cfg, "text_encoder")[0] or CLIP_L
    vae_cfg, vae_found = component_config(cfg, "vae")
    vae = FLUX1_DEV_VAE
    if vae_cfg is not None and vae_found and Path(vae_found).parent.is_dir():
        params = _safetensors_params(Path(vae_found).parent)
        vae = {"params": params or FLUX1_DEV_VAE["params"], "block_out_channels": vae_cfg["block_out_channels"]}
    if dims is not None:
        return ModelConfigs(dims, t5, clip, vae, found)
    return ModelConfigs(dict(FLUX1_DEV), t5, clip, vae, "FLUX.1-dev (assumed)")
