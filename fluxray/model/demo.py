"""The demo model behind `model.path: tiny`: a small FLUX.1 pipeline pretrained on drawn portraits of
generic people, and the likeness embedder trained with it (`validation.embedding_model: tiny`).

Both ship with fluxray as package data, in folders named by version: a new build is a new folder, so
nothing made from an older one (the caches are also keyed by content) is mixed with it.
`python -m fluxray.train.pretrain_demo` rebuilds them.
"""

from pathlib import Path

#: Bumped whenever the shipped weights change.
DEMO_VERSION = 1
#: T5 tokens of a caption: the demo was pretrained with this many, so its configs use it too.
DEMO_MAX_SEQUENCE_LENGTH = 32
#: Side in pixels of what the likeness embedder sees.
LIKENESS_IMAGE_SIZE = 64
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def demo_dir_names() -> tuple[str, str]:
    """Folder names of the pipeline and of the likeness embedder, for this version."""
    return f"demo-flux-v{DEMO_VERSION}", f"demo-likeness-v{DEMO_VERSION}"


def demo_model_dir() -> Path:
    """The shipped demo pipeline, a diffusers folder (`FluxPipeline.from_pretrained` loads it)."""
    return WEIGHTS_DIR / demo_dir_names()[0]


def likeness_model_dir() -> Path:
    """The shipped likeness embedder, laid out as openai/clip-vit-large-patch14 is."""
    return WEIGHTS_DIR / demo_dir_names()[1]
