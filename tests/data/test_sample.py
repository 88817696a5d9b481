"""The drawn datasets: the bundled pxco set is reproduced exactly, and the generic people vary in every
way a portrait can but are never the pxco man."""

import filecmp
import json
import re
from collections import Counter
from pathlib import Path

from fluxray.data.sample import PXCO, caption_corpus, generic_people, generic_portraits, likeness_labels, \
    make_sample_images

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "pxco"


def test_the_bundled_pxco_set_is_what_the_code_draws(tmp_path):
    captions = make_sample_images(tmp_path)
    assert captions == json.loads((SAMPLES / "captions.json").read_text())
    for name in captions:
        assert filecmp.cmp(SAMPLES / name, tmp_path / name, shallow=False), name


def test_generic_people_vary_and_are_never_the_pxco_man():
    portraits = generic_portraits(1000, size=16, seed=0)
    assert PXCO.is_pxco and not any(p.person.is_pxco for p in portraits)
    for p in portraits:
        # Gray or white hair never comes with a beard: no one resembles the subject's pairing.
        assert not (re.search(r"\b(gray|white)\b", p.phrases[0]) and re.search(r"beard|moustache", p.phrases[0])), \
            p.caption
    counts = [Counter(likeness_labels(p)[k] for p in portraits) for k in range(6)]
    # Every hair colour, hair style, beard kind, skin tone, glasses or not, man or woman occurs.
    assert [len(c) for c in counts] == [8, 5, 4, 7, 2, 2]
    assert len({(look.outfit, look.background, look.turn, look.shot) for _, look in generic_people(1000, seed=0)}) > 300


def test_portraits_are_deterministic_and_captioned_with_what_is_drawn():
    a, b = generic_portraits(6, size=32, seed=3), generic_portraits(6, size=32, seed=3)
    assert [p.caption for p in a] == [p.caption for p in b]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b))
    assert a[0].image.size == (32, 32)
    for p in a:
        assert p.caption.startswith(p.phrases[0][0].upper() + p.phrases[0][1:])  # who, first
        assert "pxco" not in p.caption


def test_the_corpus_holds_every_caption_word_and_no_trigger():
    words = set(re.findall(r"[\w-]+", " ".join(caption_corpus())))
    seen = set()
    for p in generic_portraits(50, size=16, seed=123):  # people the corpus was not built from
        seen |= set(re.findall(r"[\w-]+", " ".join([p.caption, *p.phrases])))
    seen |= set(re.findall(r"[\w-]+", " ".join(json.loads((SAMPLES / "captions.json").read_text()).values())))
    seen -= {"trigger"}  # the `[trigger]` placeholder
    assert seen <= words, seen - words
    assert "pxco" not in words
