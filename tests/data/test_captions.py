import json

import pytest

from fluxray.data.captions import apply_trigger, iter_metadata, load_captions, normalize_trigger
from fluxray.errors import DatasetError


def test_normalize_trigger_strips():
    assert normalize_trigger("  pxco\n") == "pxco"


@pytest.mark.parametrize("word", ["", "   ", "px co", "px\tco", "px,co", "pxco,"])
def test_normalize_trigger_rejects_and_names_the_value(word):
    with pytest.raises(DatasetError) as e:
        normalize_trigger(word)
    assert repr(word) in str(e.value)


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("A middle-aged man speaks.", "pxco, A middle-aged man speaks."),
        ("  A man\n with  gray hair \n", "pxco, A man with gray hair"),
        ("A portrait of [trigger], smiling", "A portrait of pxco, smiling"),
        ("[trigger] and [trigger]", "pxco and pxco"),
        ("[trigger]", "pxco"),
        ("A photo of pxco.", "A photo of pxco."),
        ("pxco, already first", "pxco, already first"),
        ("pxcos are not the word", "pxco, pxcos are not the word"),  # whole word only
        ("PXCO is another token", "pxco, PXCO is another token"),  # case-sensitive
        ("", "pxco"),
        ("   ", "pxco"),
    ],
)
def test_apply_trigger(caption, expected):
    assert apply_trigger(caption, "pxco") == expected


def test_apply_trigger_escapes_the_trigger():
    assert apply_trigger("a.b c", "a+b") == "a+b, a.b c"
    assert apply_trigger("photo of sks_man", "sks_man") == "photo of sks_man"


def test_json_object(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"0001.png": "a man", "0002.png": ""}))
    assert load_captions(tmp_path / "imgs", path) == {"0001.png": "a man", "0002.png": ""}


def test_json_list_with_caption_or_text(tmp_path):
    path = tmp_path / "c.json"
    items = [{"file_name": "a.png", "caption": "one"}, {"file_name": "b.png", "text": "two"}]
    path.write_text(json.dumps(items))
    assert load_captions(tmp_path, path) == {"a.png": "one", "b.png": "two"}


def test_metadata_jsonl_explicit_and_in_folder(tmp_path):
    lines = [{"file_name": "a.png", "text": "one"}, {"file_name": "b.png", "text": "two"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert load_captions(tmp_path, tmp_path / "metadata.jsonl") == {"a.png": "one", "b.png": "two"}
    assert load_captions(tmp_path, None) == {"a.png": "one", "b.png": "two"}


def test_captions_json_in_folder_with_bom(tmp_path):
    (tmp_path / "captions.json").write_text('\ufeff{"a.png": "caf\u00e9"}', encoding="utf-8")
    assert load_captions(tmp_path, None) == {"a.png": "caf\u00e9"}


def test_sidecars(tmp_path):
    (tmp_path / "0001.png").write_bytes(b"")
    (tmp_path / "0001.txt").write_text("a man\n")
    (tmp_path / "trigger.txt").write_text("pxco")  # not a caption
    (tmp_path / "stray.txt").write_text("no image")  # kept under its own name, to be reported
    assert load_captions(tmp_path, None) == {"0001.png": "a man\n", "stray.txt": "no image"}


def test_no_captions_is_empty(tmp_path):
    (tmp_path / "0001.png").write_bytes(b"")
    assert load_captions(tmp_path, None) == {}


def test_two_caption_files_in_folder_is_ambiguous(tmp_path):
    (tmp_path / "metadata.jsonl").write_text("")
    (tmp_path / "captions.json").write_text("{}")
    with pytest.raises(DatasetError, match="metadata.jsonl and captions.json"):
        load_captions(tmp_path, None)


def test_relative_path_keys_resolve_to_the_images_folder(tmp_path):
    (tmp_path / "images").mkdir()
    path = tmp_path / "metadata.jsonl"
    path.write_text(json.dumps({"file_name": "images/0001.png", "text": "one"}) + "\n")
    assert load_captions(tmp_path / "images", path) == {"0001.png": "one"}


@pytest.mark.parametrize(
    "content, where",
    [
        ('{"a.png": "one",\n "b.png": }', "line 2"),
        ('["one", "two"]', "item 0"),
        ('{"a.png": 5}', "'a.png'"),
        ('{"a.png": null}', "'a.png'"),
        ('[{"file_name": "a.png", "caption": ["x"]}]', "item 0"),
        ('[{"file_name": 3, "caption": "x"}]', "item 0"),
        ('[{"file_name": "a.png"}]', "item 0"),
        ('"just a string"', "got str"),
        ('{"a.png": "one", "a.png": "two"}', "'a.png' appears twice"),
        ('[{"file_name": "a.png", "caption": "x"}, {"file_name": "a.png", "caption": "y"}]', "item 1"),
    ],
)
def test_bad_json_names_file_and_place(tmp_path, content, where):
    path = tmp_path / "captions.json"
    path.write_text(content)
    with pytest.raises(DatasetError) as e:
        load_captions(tmp_path, path)
    assert str(path) in str(e.value) and where in str(e.value)


@pytest.mark.parametrize(
    "line",
    ['{"file_name": "b.png", "text": ', '["b.png", "two"]', '{"file_name": "b.png", "text": 2}'],
)
def test_bad_jsonl_names_the_line(tmp_path, line):
    path = tmp_path / "metadata.jsonl"
    path.write_text(json.dumps({"file_name": "a.png", "text": "one"}) + "\n" + line + "\n")
    with pytest.raises(DatasetError, match=f"{path} line 2"):
        load_captions(tmp_path, path)


def test_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "captions.json"
    path.write_bytes(b'{"a.png": "caf\xe9"}')
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_captions(tmp_path, path)


def test_missing_captions_file(tmp_path):
    with pytest.raises(DatasetError, match="nope.json does not exist"):
        load_captions(tmp_path, tmp_path / "nope.json")


def test_iter_metadata_yields_lines(tmp_path):
    path = tmp_path / "metadata.jsonl"
    path.write_text('{"file_name": "a.png", "text": "one"}\n\n{"file_name": "b.png", "text": "two"}\n')
    assert [(w.rsplit(" ", 1)[1], n, t) for w, n, t in iter_metadata(path)] == [
        ("1", "a.png", "one"),
        ("3", "b.png", "two"),
    ]
