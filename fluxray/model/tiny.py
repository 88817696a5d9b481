"""The parts of a small FLUX.1 pipeline in diffusers format, and the 1+1-block random-weight one.

Tokenizers whose vocabulary is every word of the drawn portraits' captions, tiny CLIP and T5 text
encoders, the transformer, the VAE and the scheduler, each built from config. The demo model
(`fluxray.model.demo`) is pretrained from these parts; `make_random_flux` writes them with random
weights, a model that draws noise but runs the real code paths on CPU in well under a second, for the
tests that need speed. Both load with `FluxPipeline.from_pretrained`, exactly as FLUX.1-dev does.
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
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from fluxray.data.sample import caption_corpus

TEXT_DIM = 32  # CLIP hidden size == T5 d_model == transformer joint/pooled dims
CLIP_MAX_LENGTH = 77  # as FLUX.1-dev's CLIP-L tokenizer
T5_MAX_LENGTH = 512  # FluxPipeline accepts max_sequence_length up to 512


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


def clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE with CLIP's normaliser and pre-tokenizer, merged until every caption word is one token."""
    backend = CLIPTokenizer().backend_tokenizer
    words = Counter()
    for text in caption_corpus():
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text)):
            words[(*piece[:-1], piece[-1] + "</w>")] += 1  # CLIP marks the word-final symbol
    merges = _learn_bpe_merges(words, num_merges=10_000)  # stops once no pair is left
    # Every byte in both forms, as in real CLIP, so no text ever maps to <unk>.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [char + "</w>" for char in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer() -> T5Tokenizer:
    """Unigram over the caption words plus printable ASCII; ids 0, 1, 2 are <pad>, </s>, <unk> as in T5."""
    words = Counter(re.findall(r"[\w-]+", " ".join(caption_corpus())))
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


def clip_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
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


def t5_text_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
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


def transformer(double_blocks: int = 1, single_blocks: int = 1, heads: int = 2,
                head_dim: int = 16) -> FluxTransformer2DModel:
    # Rotary axes (index, row, col) as FLUX.1 splits its 128: a small first axis, the rest halved.
    axis = head_dim // 8
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=double_blocks,
        num_single_layers=single_blocks,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=True,  # FLUX.1-dev is guidance-distilled
        axes_dims_rope=(2 * axis, 3 * axis, 3 * axis),  # sums to attention_head_dim
    )


def vae(channels: tuple[int, int, int, int] = (8, 8, 8, 8), groups: int = 4) -> AutoencoderKL:
    """FLUX's VAE layout (16 latent channels, four levels: 8x down) at `channels` widths. The shift and
    scaling factors are FLUX.1's until a trained VAE measures its own."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels,  # four levels: FluxPipeline.vae_scale_factor is 8
        layers_per_block=1,
        norm_num_groups=groups,
        latent_channels=16,
        shift_factor=0.1159,
        scaling_factor=0.3611,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's: flow-match Euler with resolution-dependent shift."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def make_random_flux(out_dir: str | Path, *, seed: int = 0, double_blocks: int = 1, single_blocks: int = 1,
                     heads: int = 2) -> Path:
    """Write a complete random-weight FLUX pipeline in diffusers format to out_dir and return it.

    The defaults are the 1+1-block test model; the benchmarks ask for a few more blocks and
    heads so that a step's compute, not its bookkeeping, dominates.
    """
    out_dir = Path(out_dir)
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    # A private RNG stream: same seed, same weights, and the caller's RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = FluxPipeline(scheduler=scheduler(), vae=vae(), text_encoder=clip_text_encoder(clip), tokenizer=clip,
                            text_encoder_2=t5_text_encoder(t5), tokenizer_2=t5,
                            transformer=transformer(double_blocks, single_blocks, heads))
    pipe.save_pretrained(out_dir)
    return out_dir


def ensure_random_flux(out_dir: str | Path, *, seed: int = 0, **dims) -> Path:
    """Return out_dir holding the random-weight model, building it once; safe for concurrent Ray workers."""
    return _build_once(Path(out_dir), "model_index.json", lambda tmp: make_random_flux(tmp, seed=seed, **dims))


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
