"""A small procedural dataset: one recognisable subject drawn with PIL, with detailed captions.

It is the bundled `samples/pxco/` set and what tests build datasets from, so it must stay
deterministic. Regenerate the bundled set with `python -m fluxray.data.sample samples/pxco`.
"""

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from fluxray.data.captions import TRIGGER_PLACEHOLDER

_SKIN = [(224, 182, 150), (214, 170, 138), (232, 194, 166)]
_HAIR = (176, 176, 180)
_BEARD = (150, 150, 154)
# (caption words, jacket colour or None for shirt sleeves, shirt colour)
_OUTFITS = [
    ("a dark navy suit and a white shirt", (28, 38, 70), (240, 240, 240)),
    ("a charcoal gray suit with a burgundy tie", (58, 58, 62), (235, 235, 235)),
    ("a light blue shirt", None, (160, 196, 232)),
    ("a black suit jacket over an open-collared white shirt", (22, 22, 24), (245, 245, 245)),
    ("a brown tweed blazer and a cream shirt", (110, 80, 55), (238, 228, 205)),
]
# (caption words, top colour, bottom colour)
_BACKGROUNDS = [
    ("in front of a blue stage backdrop", (30, 60, 130), (10, 20, 60)),
    ("against a plain gray studio background", (190, 190, 192), (120, 120, 124)),
    ("outdoors under a clear sky", (140, 190, 240), (90, 150, 80)),
    ("in a bright office with beige walls", (230, 215, 190), (180, 165, 140)),
    ("on a dark conference stage", (40, 34, 48), (12, 10, 16)),
    ("in front of a warm bokeh background", (120, 70, 40), (50, 30, 20)),
]
# (caption words, RGB multipliers, side shadow strength)
_LIGHTING = [
    ("with soft front lighting", (1.0, 1.0, 1.0), 0.0),
    ("in warm afternoon light", (1.08, 1.0, 0.86), 0.15),
    ("under cool overhead light", (0.9, 0.97, 1.08), 0.1),
    ("with dramatic side lighting", (1.0, 1.0, 1.0), 0.55),
]
_ACTIONS = {  # (as the verb of a sentence, as a participle)
    "microphone": ("speaks into a microphone", "speaking into a microphone"),
    "smiling": ("is smiling warmly", "smiling warmly"),
    "neutral": ("looks calmly at the viewer", "looking calmly at the viewer"),
    "speaking": ("is talking mid-sentence", "talking mid-sentence"),
}
_SHOTS = ["close-up portrait", "head-and-shoulders portrait", "half-body shot"]
_TURNS = [
    ("facing the camera", 0.0),
    ("turned slightly to the left", -0.35),
    ("turned slightly to the right", 0.35),
]


@dataclass(frozen=True)
class _Look:
    age: str
    shot: int
    turn: int
    outfit: int
    background: int
    lighting: int
    glasses: bool
    microphone: bool
    expression: str  # "smiling", "speaking" or "neutral"


def make_sample_images(
    out_dir: Path, n: int = 18, size: int = 256, seed: int = 0, trigger_word: str = "pxco"
) -> dict[str, str]:
    """Draw `n` images `0001.png`... into `out_dir` and write `captions.json` and `trigger.txt`.

    Returns the captions, keyed by file name. Most captions leave the trigger word out (it is
    prepended at prepare time); every seventh opens with the `[trigger]` placeholder instead.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions = {}
    for i in range(n):
        look = _Look(
            age=["A middle-aged man", "An older man", "A man in his fifties"][i % 3],
            shot=i % len(_SHOTS),
            turn=(i // 3) % len(_TURNS),
            outfit=(i * 2) % len(_OUTFITS),
            background=i % len(_BACKGROUNDS),
            lighting=(i // 2) % len(_LIGHTING),
            glasses=i % 3 == 1,
            microphone=i % 4 == 0,
            expression=["smiling", "neutral", "speaking"][(i + i // 3) % 3] if i % 4 else "speaking",
        )
        name = f"{i + 1:04d}.png"
        _draw(look, size, rng).save(out_dir / name, optimize=True)
        captions[name] = _caption(look, placeholder=i % 7 == 3)
    (out_dir / "captions.json").write_text(json.dumps(captions, indent=2) + "\n", encoding="utf-8")
    (out_dir / "trigger.txt").write_text(trigger_word + "\n", encoding="utf-8")
    return captions


def _caption(look: _Look, placeholder: bool) -> str:
    features = "short gray hair, a trimmed beard and glasses" if look.glasses else (
        "short gray hair and a trimmed beard"
    )
    subject = f"{look.age} with {features}"
    action = "microphone" if look.microphone else look.expression
    verb, participle = _ACTIONS[action]
    if placeholder:
        subject = subject[0].lower() + subject[1:]
        # Placeholder first, so the prepared caption still starts with the trigger (the guide's form).
        head = f"{TRIGGER_PLACEHOLDER}, a {_SHOTS[look.shot]} of {subject}, {participle}"
    else:
        head = f"{subject} {verb} in a {_SHOTS[look.shot]}"
    return (
        f"{head}, {_TURNS[look.turn][0]}, wearing {_OUTFITS[look.outfit][0]}, "
        f"{_BACKGROUNDS[look.background][0]} {_LIGHTING[look.lighting][0]}."
    )


def _draw(look: _Look, size: int, rng: random.Random) -> Image.Image:
    s = size * 2  # drawn at twice the size and downsampled, for smooth edges
    top, bottom = _BACKGROUNDS[look.background][1:]
    img = Image.new("RGB", (s, s))
    draw = ImageDraw.Draw(img)
    for y in range(s):
        t = y / (s - 1)
        draw.line([(0, y), (s, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    if look.background == 5:  # bokeh
        for _ in range(12):
            x, y, r = rng.randrange(s), rng.randrange(s), rng.randrange(s // 30, s // 10)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(230, 170, 90))
        img = img.filter(ImageFilter.GaussianBlur(s / 60))
        draw = ImageDraw.Draw(img)

    scale = [1.45, 1.0, 0.72][look.shot] * s / 512
    turn = _TURNS[look.turn][1]
    cx = s / 2 + rng.uniform(-0.06, 0.06) * s - turn * 30 * scale
    cy = s * [0.52, 0.42, 0.36][look.shot]
    skin = _SKIN[rng.randrange(len(_SKIN))]

    def box(x: float, y: float, w: float, h: float) -> list[float]:
        return [cx + (x - w) * scale, cy + (y - h) * scale, cx + (x + w) * scale, cy + (y + h) * scale]

    def pt(x: float, y: float) -> tuple[float, float]:
        return cx + x * scale, cy + y * scale

    def w(width: float) -> int:
        return max(1, round(width * scale))

    # Body: jacket (or shirt) shoulders, collar, tie.
    _, jacket, shirt = _OUTFITS[look.outfit]
    draw.rectangle(box(0, 120, 26, 40), fill=skin)  # neck
    draw.chord(box(0, 330, 190, 180), 180, 360, fill=jacket or shirt)
    draw.rectangle(box(0, 420, 190, 90), fill=jacket or shirt)
    draw.polygon([pt(-40, 150), pt(40, 150), pt(0, 240)], fill=shirt)
    if jacket:
        draw.polygon([pt(-40, 150), pt(-5, 235), pt(-70, 190)], fill=tuple(c + 18 for c in jacket))
        draw.polygon([pt(40, 150), pt(5, 235), pt(70, 190)], fill=tuple(c + 18 for c in jacket))
        if look.outfit == 1:
            draw.polygon([pt(-9, 158), pt(9, 158), pt(12, 230), pt(0, 245), pt(-12, 230)], fill=(120, 20, 40))

    # Head: ears, face, short gray hair, trimmed beard.
    fx = turn * 22  # facial features shift towards the turn
    draw.ellipse(box(-88 - fx / 2, 5, 14, 24), fill=skin)
    draw.ellipse(box(88 - fx / 2, 5, 14, 24), fill=skin)
    draw.ellipse(box(0, 0, 86, 112), fill=skin)
    draw.chord(box(0, -52, 90, 64), 180, 360, fill=_HAIR)
    draw.rectangle(box(-82, -36, 9, 22), fill=_HAIR)
    draw.rectangle(box(82, -36, 9, 22), fill=_HAIR)
    draw.chord(box(fx / 3, 34, 84, 76), 0, 180, fill=_BEARD)
    draw.ellipse(box(fx, 44, 30, 9), fill=_BEARD)  # moustache

    # Face: brows, eyes, nose, mouth, glasses.
    for side in (-1, 1):
        ex = fx + side * 34
        draw.line([pt(ex - 18, -34), pt(ex + 18, -36 - side * 2)], fill=(120, 120, 124), width=w(6))
        draw.ellipse(box(ex, -14, 10, 7), fill=(255, 255, 255))
        draw.ellipse(box(ex + turn * 6, -14, 6, 6), fill=(60, 45, 35))
        if look.glasses:
            draw.rounded_rectangle(box(ex, -14, 27, 19), radius=10 * scale, outline=(30, 30, 30), width=w(5))
    if look.glasses:
        draw.line([pt(fx - 7, -16), pt(fx + 7, -16)], fill=(30, 30, 30), width=w(4))
    draw.line([pt(fx + 4, -4), pt(fx + 10, 26), pt(fx - 4, 30)], fill=tuple(c - 40 for c in skin), width=w(4))
    lips = (150, 70, 70)
    if look.expression == "smiling":
        draw.chord(box(fx, 52, 28, 16), 0, 180, fill=(250, 250, 250), outline=lips, width=w(3))
    elif look.expression == "speaking":
        draw.ellipse(box(fx, 60, 15, 11), fill=(80, 25, 30))
    else:
        draw.line([pt(fx - 20, 58), pt(fx + 20, 58)], fill=lips, width=w(5))

    if look.microphone:
        draw.line([pt(fx + 60, 100), pt(fx + 110, 260)], fill=(40, 40, 40), width=max(2, round(12 * scale)))
        draw.ellipse(box(fx + 52, 82, 22, 22), fill=(70, 70, 74), outline=(20, 20, 20), width=w(3))

    return _light(img, look.lighting).resize((size, size), Image.Resampling.LANCZOS)


def _light(img: Image.Image, lighting: int) -> Image.Image:
    _, gains, shadow = _LIGHTING[lighting]
    r, g, b = (band.point(lambda v, k=k: min(255, round(v * k))) for band, k in zip(img.split(), gains))
    img = Image.merge("RGB", (r, g, b))
    if shadow:
        mask = Image.linear_gradient("L").rotate(90).point(lambda v: round(v * shadow))
        img = Image.composite(Image.new("RGB", img.size), img, mask.resize(img.size))
    return img


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "samples/pxco")
    print(f"wrote {len(make_sample_images(target))} images and captions to {target}")
