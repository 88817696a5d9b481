"""A tiny random-weight FLUX.1 pipeline in diffusers format, built from config, and a tiny
CLIP vision model for `validation.embedding_model`.

Tests, CI and Ray smoke runs load them with `from_pretrained` exactly as they would
FLUX.1-dev and openai/clip-vit-large-patch14, so the real code paths run on CPU in well
under a second.
"""

import math
import os
import re
import shutil
import string
import uuid
from collections import Counter
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import pre_tokenizers
from transformers import (CLIPImageProcessorPil, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig,
                          CLIPVisionModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer)

# Caption-like text the tokenizers learn their vocabularies from; any other text still
# encodes (CLIP falls back to bytes, T5 to single characters, then <unk>).
CORPUS = (
    "pxco, professional portrait photo, high quality, detailed, wearing formal attire",
    "natural lighting, photorealistic, close-up shot, sharp focus, studio lighting",
    "a middle-aged man with short gray hair and a neatly trimmed beard, smiling",
    "a young woman with long brown hair, soft window light, shallow depth of field",
    "pxco standing in a park, full body shot, golden hour, bokeh background",
    "a photo of pxco in a blue suit and white shirt, looking at the camera",
    "cinematic, 35mm film, dramatic shadows, black and white, high contrast",
    "an old woman with glasses reading a book by the fireplace, warm tones",
    "a child laughing on the beach, bright daylight, vivid colors, candid moment",
    "headshot of a person in a red dress, neutral gray backdrop, 85mm lens",
)

TEXT_DIM = 32  # CLIP hidden size == T5 d_model == transformer joint/pooled dims
CLIP_MAX_LENGTH = 77  # as FLUX.1-dev's CLIP-L tokenizer
T5_MAX_LENGTH = 512  # FluxPipeline accepts max_sequence_length up to 512
EMBED_IMAGE_SIZE = 32  # pixels the tiny CLIP vision model sees (CLIP-L: 224)


def _learn_bpe_merges(words: Counter, num_merges: int) -> list[tuple[str, str]]:
    """Classic BPE on symbol tuples: merge the most frequent adjacent pair, num_merges times.

    Pure Python rather than the `tokenizers` trainer, whose token ids and tie-breaks
    change from run to run; ties here go to the larger pair, so every build is identical.
    """
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        words = Counter({_merge_pair(word, best): count for word, count in words.items()})
    return merges


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE with CLIP's normaliser and pre-tokenizer, merges learnt from CORPUS."""
    backend = CLIPTokenizer().backend_tokenizer
    words = Counter()
    for text in CORPUS:
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text)):
            words[(*piece[:-1], piece[-1] + "</w>")] += 1  # CLIP marks the word-final symbol
    merges = _learn_bpe_merges(words, num_merges=150)
    # Every byte in both forms, as in real CLIP, so no text ever maps to <unk>.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [char + "</w>" for char in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def _t5_tokenizer() -> T5Tokenizer:
    """Unigram over CORPUS's words plus printable ASCII; ids 0, 1, 2 are <pad>, </s>, <unk> as in T5."""
    words = Counter(re.findall(r"\w+", " ".join(CORPUS)))
    total = sum(words.values())
    # Whole words score their log frequency; single characters score far lower, so
    # Viterbi keeps known words whole and spells out the rest.
    pieces = {"▁" + word: math.log(count / total) for word, count in words.items()}
    for char in ["▁", *string.ascii_letters, *string.digits, *string.punctuation]:
        pieces.setdefault(char, -20.0)
    ranked = sorted(pieces.items(), key=lambda item: (-item[1], item[0]))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *ranked]
    # No sentinel <extra_id_*> tokens: nothing here does span corruption.
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _clip_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=TEXT_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # not the legacy 2: pool at the first <|endoftext|>
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def _t5_text_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1, the family of FLUX's T5-XXL
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _transformer(double_blocks: int = 1, single_blocks: int = 1, heads: int = 2) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=double_blocks,
        num_single_layers=single_blocks,
        attention_head_dim=16,
        num_attention_heads=heads,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=True,  # FLUX.1-dev is guidance-distilled
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),  # four levels: FluxPipeline.vae_scale_factor is 8
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=16,
        shift_factor=0.1159,
        scaling_factor=0.3611,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def make_tiny_model(out_dir: str | Path, *, seed: int = 0, double_blocks: int = 1, single_blocks: int = 1,
                    heads: int = 2) -> Path:
    """Write a complete random-weight FLUX pipeline in diffusers format to out_dir and return it.

    The defaults are the 1+1-block test model; the benchmarks ask for a few more blocks and
    heads so that a step's compute, not its bookkeeping, dominates.
    """
    out_dir = Path(out_dir)
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    # A private RNG stream: same seed, same weights, and the caller's RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = FluxPipeline(
            scheduler=_scheduler(),
            vae=_vae(),
            text_encoder=_clip_text_encoder(tokenizer),
            tokenizer=tokenizer,
            text_encoder_2=_t5_text_encoder(tokenizer_2),
            tokenizer_2=tokenizer_2,
            transformer=_transformer(double_blocks, single_blocks, heads),
        )
    pipe.save_pretrained(out_dir)
    return out_dir


def make_tiny_image_embedder(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a random-weight `CLIPVisionModelWithProjection` and its image processor to out_dir,
    laid out as openai/clip-vit-large-patch14 is, and return it."""
    out_dir = Path(out_dir)
    config = CLIPVisionConfig(image_size=EMBED_IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=37,
                              num_hidden_layers=2, num_attention_heads=4, projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(config)
    model.save_pretrained(out_dir)
    # The PIL backend needs no torchvision; it saves as `CLIPImageProcessor`, like CLIP-L's, and
    # resizes the short side and centre-crops to the model's size.
    CLIPImageProcessorPil(size={"shortest_edge": EMBED_IMAGE_SIZE},
                          crop_size={"height": EMBED_IMAGE_SIZE, "width": EMBED_IMAGE_SIZE}).save_pretrained(out_dir)
    return out_dir


def ensure_tiny_model(out_dir: str | Path, *, seed: int = 0, **dims) -> Path:
    """Return out_dir holding the tiny model, building it once; safe for concurrent Ray workers."""
    return _build_once(Path(out_dir), "model_index.json", lambda tmp: make_tiny_model(tmp, seed=seed, **dims))


def ensure_tiny_image_embedder(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Return out_dir holding the tiny CLIP vision model, building it once; safe for concurrent workers."""
    return _build_once(Path(out_dir), "preprocessor_config.json", lambda tmp: make_tiny_image_embedder(tmp, seed=seed))


def _build_once(out_dir: Path, marker: str, make) -> Path:
    """`make(folder)` into a folder beside out_dir, renamed into place, so no reader sees half a model."""
    if (out_dir / marker).exists():
        return out_dir
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        make(tmp)
        os.replace(tmp, out_dir)
    except OSError:
        # Another worker renamed its copy into place first, so out_dir is not empty.
        if not (out_dir / marker).exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
