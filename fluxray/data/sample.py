"""Small procedural datasets drawn with PIL, with detailed captions: the pxco man, and generic people.

`make_sample_images` draws one recognisable subject (short gray hair, a trimmed beard): the bundled
`samples/pxco/` set and what tests build datasets from, so it must stay deterministic. Regenerate it
with `python -m fluxray.data.sample samples/pxco`. `generic_portraits` draws varied people with the
same code and caption words, never the pxco man: what the demo model is pretrained on.
"""

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from fluxray.data.captions import TRIGGER_PLACEHOLDER

_SKIN = [(224, 182, 150), (214, 170, 138), (232, 194, 166)]
# The pxco man's gray hair.
_HAIR = (176, 176, 180)
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
_BOKEH = 5
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

# Generic people: more of everything, in the same words.
_GENERIC_SKIN = _SKIN + [(196, 146, 108), (160, 110, 76), (118, 80, 56), (86, 58, 42)]
_HAIR_COLOURS = [  # (caption word, RGB)
    ("black", (32, 28, 30)), ("dark brown", (68, 44, 30)), ("brown", (118, 80, 50)), ("auburn", (140, 62, 36)),
    ("red", (196, 84, 40)), ("blonde", (226, 196, 122)), ("gray", _HAIR), ("white", (236, 236, 236)),
]
_GRAYS = {"gray", "white"}
_HAIR_STYLES = ["short", "long", "curly", "bob", "bald"]
_BEARDS = ["none", "trimmed", "full", "moustache"]
_GENERIC_OUTFITS = _OUTFITS + [
    ("a red sweater", None, (170, 40, 40)),
    ("a green t-shirt", None, (60, 140, 70)),
    ("a yellow hoodie", None, (230, 190, 60)),
    ("a white t-shirt", None, (240, 240, 240)),
    ("a black turtleneck", None, (26, 26, 28)),
    ("a denim jacket over a white t-shirt", (70, 100, 150), (240, 240, 240)),
    ("a purple blouse", None, (120, 70, 150)),
    ("an orange jacket and a black shirt", (220, 120, 40), (30, 30, 30)),
]
_SUITS = {0, 1, 3, 4}  # "formal attire"
_GENERIC_BACKGROUNDS = _BACKGROUNDS + [
    ("in front of a green backdrop", (60, 130, 80), (20, 60, 30)),
    ("against a pink wall", (230, 170, 180), (190, 130, 140)),
    ("in front of a dark red curtain", (120, 20, 30), (50, 8, 12)),
    ("against a white studio background", (245, 245, 245), (205, 205, 208)),
    ("under a sunset sky", (250, 160, 90), (120, 60, 90)),
    ("in a library with wooden shelves", (120, 85, 50), (70, 45, 25)),
]
_STUDIOS = {0, 1, 6, 9}  # "studio lighting"
# Words of the guide's sample prompts: some say something about the picture, the rest nothing.
_STYLE_WORDS = ["professional portrait photo", "high quality", "detailed", "photorealistic", "sharp focus"]


@dataclass(frozen=True)
class Person:
    """What stays the same from picture to picture of one person."""

    hair: int  # index into _HAIR_COLOURS
    hair_style: str  # one of _HAIR_STYLES
    beard: str  # one of _BEARDS
    skin: tuple[int, int, int] | None  # None: drawn from _SKIN per picture (the pxco man)
    sex: str = "man"

    @property
    def is_pxco(self) -> bool:
        """Short gray hair and a trimmed beard: the bundled subject, whom generic people never are."""
        return _HAIR_COLOURS[self.hair][0] == "gray" and self.hair_style == "short" and self.beard == "trimmed"


PXCO = Person(hair=6, hair_style="short", beard="trimmed", skin=None)


@dataclass(frozen=True)
class Look:
    """How one picture of a person is taken: age words, framing, pose, clothes, place, light."""

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
    """Draw `n` images `0001.png`... of the pxco man into `out_dir` and write `captions.json` and
    `trigger.txt`.

    Returns the captions, keyed by file name. Most captions leave the trigger word out (it is
    prepended at prepare time); every seventh opens with the `[trigger]` placeholder instead.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions = {}
    for i, look in enumerate(_pxco_looks(n)):
        name = f"{i + 1:04d}.png"
        draw_portrait(PXCO, look, size, rng).save(out_dir / name, optimize=True)
        captions[name] = _caption(PXCO, look, placeholder=i % 7 == 3)
    (out_dir / "captions.json").write_text(json.dumps(captions, indent=2) + "\n", encoding="utf-8")
    (out_dir / "trigger.txt").write_text(trigger_word + "\n", encoding="utf-8")
    return captions


def _pxco_looks(n: int) -> list[Look]:
    return [Look(
        age=["A middle-aged man", "An older man", "A man in his fifties"][i % 3],
        shot=i % len(_SHOTS),
        turn=(i // 3) % len(_TURNS),
        outfit=(i * 2) % len(_OUTFITS),
        background=i % len(_BACKGROUNDS),
        lighting=(i // 2) % len(_LIGHTING),
        glasses=i % 3 == 1,
        microphone=i % 4 == 0,
        expression=["smiling", "neutral", "speaking"][(i + i // 3) % 3] if i % 4 else "speaking",
    ) for i in range(n)]


@dataclass(frozen=True)
class Portrait:
    """One generic picture: the image, its caption, and the phrases the caption is made of."""

    image: Image.Image
    caption: str
    phrases: list[str]  # who first, then what they do and wear, where, and words of the guide's prompts
    person: Person
    glasses: bool


def random_person(rng: random.Random) -> tuple[Person, str]:
    """A generic person and the words that open their caption ("A young woman"); never the pxco man:
    gray or white hair never comes with a beard or a moustache."""
    sex = rng.choice(["man", "woman"])
    age = rng.choice(["young", "middle-aged", "older", "twenties", "thirties", "fifties"])
    grays = [i for i, (word, _) in enumerate(_HAIR_COLOURS) if word in _GRAYS]
    others = [i for i in range(len(_HAIR_COLOURS)) if i not in grays]
    hair = rng.choice(grays if rng.random() < (0.6 if age in ("older", "fifties") else 0.1) else others)
    style = rng.choice(_HAIR_STYLES if sex == "man" else _HAIR_STYLES[:-1])
    beard = "none" if sex == "woman" or hair in grays or rng.random() < 0.4 else rng.choice(_BEARDS[1:])
    words = {"young": f"A young {sex}", "middle-aged": f"A middle-aged {sex}", "older": f"An older {sex}"}.get(
        age, f"A {sex} in {'his' if sex == 'man' else 'her'} {age}")
    return Person(hair, style, beard, rng.choice(_GENERIC_SKIN), sex), words


def generic_people(n: int, seed: int = 0, plain: bool = False) -> list[tuple[Person, Look]]:
    """`n` varied people (hair colour and style, beard, skin, glasses) in varied clothes, backgrounds,
    framing, poses and light; deterministic for a seed. Never the pxco man.

    `plain`: close-up and head-and-shoulders portraits without microphones or bokeh, plainer pictures
    than his, which a small model learns to draw in minutes.
    """
    rng = random.Random(seed)
    backgrounds = [k for k in range(len(_GENERIC_BACKGROUNDS)) if not plain or k != _BOKEH]
    out = []
    for _ in range(n):
        person, age = random_person(rng)
        out.append((person, Look(
            age=age, shot=rng.randrange(2 if plain else len(_SHOTS)), turn=rng.randrange(len(_TURNS)),
            outfit=rng.randrange(len(_GENERIC_OUTFITS)), background=rng.choice(backgrounds),
            lighting=rng.randrange(len(_LIGHTING)), glasses=rng.random() < 0.3,
            microphone=not plain and rng.random() < 0.15, expression=rng.choice(["smiling", "neutral", "speaking"]))))
    return out


def generic_portraits(n: int, size: int = 64, seed: int = 0, plain: bool = False) -> list[Portrait]:
    """`generic_people(n, seed, plain)` drawn and captioned as the pxco set is."""
    rng = random.Random(seed + 1)  # the drawing's own stream: the people do not depend on `size`
    return [Portrait(draw_portrait(person, look, size, rng), _caption(person, look, placeholder=False),
                     _phrases(person, look), person, look.glasses) for person, look in generic_people(n, seed, plain)]


def caption_corpus() -> list[str]:
    """Captions and phrases with every word the pxco and generic captions use, and the words of the
    guide's sample prompts (never the trigger): what the tokenizers learn their vocabularies from."""
    texts = [_caption(PXCO, look, placeholder=False) for look in _pxco_looks(18)]
    for person, look in generic_people(400, seed=0):
        texts += [_caption(person, look, placeholder=False), *_phrases(person, look)]
    return texts


def likeness_labels(portrait: Portrait) -> list[int]:
    """Who the picture shows, as class indices: hair colour, hair style, beard, skin, glasses, man or
    woman. Not clothes, background, framing or light: two pictures of one person share these."""
    p = portrait.person
    return [p.hair, _HAIR_STYLES.index(p.hair_style), _BEARDS.index(p.beard), _GENERIC_SKIN.index(p.skin),
            int(portrait.glasses), int(p.sex == "woman")]


def _features(person: Person, glasses: bool) -> str:
    colour = _HAIR_COLOURS[person.hair][0]
    article = "an" if colour[0] in "aeiou" else "a"
    hair = {"bald": "a bald head", "bob": f"{article} {colour} bob"}.get(person.hair_style,
                                                                           f"{person.hair_style} {colour} hair")
    parts = [hair] + ([f"a {person.beard} beard" if person.beard != "moustache" else "a moustache"]
                      if person.beard != "none" else []) + (["glasses"] if glasses else [])
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def _caption(person: Person, look: Look, placeholder: bool) -> str:
    subject = f"{look.age} with {_features(person, look.glasses)}"
    action = "microphone" if look.microphone else look.expression
    verb, participle = _ACTIONS[action]
    if placeholder:
        subject = subject[0].lower() + subject[1:]
        # Placeholder first, so the prepared caption still starts with the trigger (the guide's form).
        head = f"{TRIGGER_PLACEHOLDER}, a {_SHOTS[look.shot]} of {subject}, {participle}"
    else:
        head = f"{subject} {verb} in a {_SHOTS[look.shot]}"
    return (
        f"{head}, {_TURNS[look.turn][0]}, wearing {_GENERIC_OUTFITS[look.outfit][0]}, "
        f"{_GENERIC_BACKGROUNDS[look.background][0]} {_LIGHTING[look.lighting][0]}."
    )


def _phrases(person: Person, look: Look) -> list[str]:
    """The caption cut into phrases, plus the guide's prompt words that are true of the picture."""
    subject = f"{look.age[0].lower()}{look.age[1:]} with {_features(person, look.glasses)}"
    action = "microphone" if look.microphone else look.expression
    phrases = [subject, _ACTIONS[action][1], f"a {_SHOTS[look.shot]}", _TURNS[look.turn][0],
               f"wearing {_GENERIC_OUTFITS[look.outfit][0]}", _GENERIC_BACKGROUNDS[look.background][0],
               _LIGHTING[look.lighting][0]]
    if look.shot == 0:
        phrases.append("close-up shot")
    if look.outfit in _SUITS:
        phrases.append("wearing formal attire")
    if look.background in _STUDIOS:
        phrases.append("studio lighting")
    if look.lighting in (0, 1) and look.background not in _STUDIOS:
        phrases.append("natural lighting")
    return phrases + _STYLE_WORDS


def _shade(colour: tuple[int, int, int], by: int) -> tuple[int, int, int]:
    return tuple(max(0, c - by) for c in colour)


def draw_portrait(person: Person, look: Look, size: int, rng: random.Random) -> Image.Image:
    """`person` as `look` says, `size` pixels square; `rng` places the head and the bokeh."""
    s = size * 2  # drawn at twice the size and downsampled, for smooth edges
    top, bottom = _GENERIC_BACKGROUNDS[look.background][1:]
    img = Image.new("RGB", (s, s))
    draw = ImageDraw.Draw(img)
    for y in range(s):
        t = y / (s - 1)
        draw.line([(0, y), (s, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    if look.background == _BOKEH:
        for _ in range(12):
            x, y, r = rng.randrange(s), rng.randrange(s), rng.randrange(s // 30, s // 10)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(230, 170, 90))
        img = img.filter(ImageFilter.GaussianBlur(s / 60))
        draw = ImageDraw.Draw(img)

    scale = [1.45, 1.0, 0.72][look.shot] * s / 512
    turn = _TURNS[look.turn][1]
    cx = s / 2 + rng.uniform(-0.06, 0.06) * s - turn * 30 * scale
    cy = s * [0.52, 0.42, 0.36][look.shot]
    skin = person.skin or _SKIN[rng.randrange(len(_SKIN))]
    hair = _HAIR_COLOURS[person.hair][1]

    def box(x: float, y: float, w: float, h: float) -> list[float]:
        return [cx + (x - w) * scale, cy + (y - h) * scale, cx + (x + w) * scale, cy + (y + h) * scale]

    def pt(x: float, y: float) -> tuple[float, float]:
        return cx + x * scale, cy + y * scale

    def w(width: float) -> int:
        return max(1, round(width * scale))

    # Body: jacket (or shirt) shoulders, collar, tie.
    _, jacket, shirt = _GENERIC_OUTFITS[look.outfit]
    draw.rectangle(box(0, 120, 26, 40), fill=skin)  # neck
    draw.chord(box(0, 330, 190, 180), 180, 360, fill=jacket or shirt)
    draw.rectangle(box(0, 420, 190, 90), fill=jacket or shirt)
    draw.polygon([pt(-40, 150), pt(40, 150), pt(0, 240)], fill=shirt)
    if jacket:
        draw.polygon([pt(-40, 150), pt(-5, 235), pt(-70, 190)], fill=tuple(c + 18 for c in jacket))
        draw.polygon([pt(40, 150), pt(5, 235), pt(70, 190)], fill=tuple(c + 18 for c in jacket))
        if look.outfit == 1:
            draw.polygon([pt(-9, 158), pt(9, 158), pt(12, 230), pt(0, 245), pt(-12, 230)], fill=(120, 20, 40))

    # Hair that falls behind the head, then the head: ears, face, hair on top, beard.
    if person.hair_style == "long":
        draw.rounded_rectangle(box(0, 45, 104, 135), radius=60 * scale, fill=hair)
    elif person.hair_style == "bob":
        draw.rounded_rectangle(box(0, 5, 102, 95), radius=50 * scale, fill=hair)
    fx = turn * 22  # facial features shift towards the turn
    draw.ellipse(box(-88 - fx / 2, 5, 14, 24), fill=skin)
    draw.ellipse(box(88 - fx / 2, 5, 14, 24), fill=skin)
    draw.ellipse(box(0, 0, 86, 112), fill=skin)
    if person.hair_style == "curly":
        for k in range(9):
            x = -88 + k * 22
            draw.ellipse(box(x, -70 + abs(x) * 0.45, 26, 26), fill=hair)
    elif person.hair_style != "bald":
        draw.chord(box(0, -52, 90, 64), 180, 360, fill=hair)
    side = 22 if person.hair_style != "bald" else 14
    draw.rectangle(box(-82, -36 + 22 - side, 9, side), fill=hair)
    draw.rectangle(box(82, -36 + 22 - side, 9, side), fill=hair)
    beard = _shade(hair, 26)
    if person.beard == "trimmed":
        draw.chord(box(fx / 3, 34, 84, 76), 0, 180, fill=beard)
    elif person.beard == "full":
        draw.chord(box(fx / 3, 30, 90, 104), 0, 180, fill=beard)
    if person.beard != "none":
        draw.ellipse(box(fx, 44, 30, 9), fill=beard)  # moustache

    # Face: brows, eyes, nose, mouth, glasses.
    for side in (-1, 1):
        ex = fx + side * 34
        draw.line([pt(ex - 18, -34), pt(ex + 18, -36 - side * 2)], fill=_shade(hair, 56), width=w(6))
        draw.ellipse(box(ex, -14, 10, 7), fill=(255, 255, 255))
        draw.ellipse(box(ex + turn * 6, -14, 6, 6), fill=(60, 45, 35))
        if look.glasses:
            draw.rounded_rectangle(box(ex, -14, 27, 19), radius=10 * scale, outline=(30, 30, 30), width=w(5))
    if look.glasses:
        draw.line([pt(fx - 7, -16), pt(fx + 7, -16)], fill=(30, 30, 30), width=w(4))
    draw.line([pt(fx + 4, -4), pt(fx + 10, 26), pt(fx - 4, 30)], fill=_shade(skin, 40), width=w(4))
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
