"""Advice before a job starts: one case per rule, the guide's own settings pass strict mode,
the dataset is read from disk, the module imports without torch, and the CLI's --strict."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fluxray.advise.rules import AdviceError, advise, check_strict, dataset_facts, format_advice
from fluxray.config import load_config
from fluxray.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent.parent
GUIDE_IMAGES = [(1024, 1024)] * 18  # the guide's 18 images, large enough for every bucket


def guide(*overrides):
    """configs/flux-dev.yaml (the guide's settings) with overrides; no dataset on disk."""
    return load_config(REPO / "configs" / "flux-dev.yaml", ["dataset.path=null", *overrides])


def ids(cfg, **kw):
    kw.setdefault("image_sizes", GUIDE_IMAGES)
    found = {}
    for a in advise(cfg, **kw):
        found.setdefault(a.id, a)
    return found


def test_the_guides_settings_get_no_warning_and_pass_strict_mode():
    items = advise(guide(), image_sizes=GUIDE_IMAGES)
    assert [a.severity for a in items] == ["info"] * len(items)
    check_strict(items)
    assert "nothing to change" in format_advice([])


CASES = [
    # (id, overrides, advise kwargs, the config key it names, words the message or fix must carry)
    ("steps.too_few", ["train.steps=100"], {}, "train.steps", ["generic face", "set train.steps to 1000"]),
    ("steps.below_recommended", ["train.steps=600"], {}, "train.steps", ["1000"]),
    ("steps.beyond_guide", ["train.steps=4000"], {}, "train.steps", ["early_stop"]),
    ("steps.few_repeats", ["train.steps=100"], {}, "train.steps", ["~5.6 times", "~5-6 times"]),
    ("steps.few_repeats", ["train.steps=1000"], {"image_sizes": [(1024, 1024)] * 200}, "train.steps", ["5.0 times"]),
    ("steps.many_repeats", ["train.steps=2000"], {"image_sizes": [(1024, 1024)] * 8}, "train.steps", ["memorises"]),
    ("sample.no_prompts", ["sample.prompts=[]"], {}, "sample.prompts", ["nothing to watch"]),
    ("prompt.no_trigger", ["sample.prompts=['portrait photo']"], {}, "sample.prompts.0", ["'pxco'", "[trigger]"]),
    ("prompt.trigger_only", ["sample.prompts=['[trigger]']"], {}, "sample.prompts.0", ["too short"]),
    ("prompt.too_long", ["sample.prompts=['[trigger], " + "very " * 70 + "long']"], {}, "sample.prompts.0",
     ["dilute"]),
    ("prompt.truncated", ["model.max_sequence_length=8"], {}, "sample.prompts.0", ["max_sequence_length is 8"]),
    ("lr.too_low", ["train.lr=1e-6"], {}, "train.lr", ["0.0005"]),
    ("lr.too_high", ["train.lr=5e-3"], {}, "train.lr", ["burn"]),
    ("batch.exceeds_dataset", ["train.batch_size=8", "distributed.workers=8"], {}, "train.batch_size", ["will fail"]),
    ("batch.exceeds_dataset", ["train.batch_size=4", "distributed.workers=5"], {"image_sizes": [(512, 512)] * 18},
     "train.batch_size", ["= 20", "largest bucket (18"]),
    ("batch.exceeds_dataset", ["train.batch_size=8", "distributed.workers=8", "dataset.resolutions=[512]"],
     {"image_sizes": None, "num_images": 18}, "train.batch_size", ["= 64"]),
    ("batch.large_for_dataset", ["distributed.workers=8", "train.steps=250"], {}, "distributed.workers",
     ["shorter run"]),
    ("batch.above_guide", ["train.batch_size=2", "train.steps=500"], {}, "train.batch_size", ["batch 1"]),
    ("lora.rank_low", ["lora.rank=2", "lora.alpha=null"], {}, "lora.rank", ["set lora.rank to 16"]),
    ("lora.rank_high", ["lora.rank=256", "lora.alpha=null"], {}, "lora.rank", ["set lora.rank to 16"]),
    ("lora.alpha_low", ["lora.alpha=1"], {}, "lora.alpha", ["16x"]),
    ("save.kohya_unmapped", ["lora.targets=['attn.to_q', 'x_embedder']"], {}, "lora.targets", ["x_embedder"]),
    ("ema.off", ["train.ema=false"], {}, "train.ema", ["EMA"]),
    ("ema.too_slow", ["train.ema_decay=0.999"], {}, "train.ema_decay", ["~1000 steps", "0.996"]),
    ("sample.off", ["sample.every=0"], {}, "sample.every", ["every 50"]),
    ("sample.rare", ["sample.every=500"], {}, "sample.every", ["too rare"]),
    ("sample.guidance", ["sample.guidance=7"], {}, "sample.guidance", ["outside 2-5"]),
    ("sample.guidance", ["sample.prompts=[{prompt: '[trigger], portrait', guidance: 1.0}]"], {}, "sample.prompts.0",
     ["guidance 1"]),
    ("sample.steps_few", ["sample.steps=8"], {}, "sample.steps", ["set sample.steps to 20"]),
    ("sample.costly", ["sample.every=20"], {}, "sample.every", ["of the run's compute", "sample.every: 40"]),
    ("caption_dropout.zero", ["dataset.caption_dropout=0"], {}, "dataset.caption_dropout", ["0.05"]),
    ("caption_dropout.high", ["dataset.caption_dropout=0.5"], {}, "dataset.caption_dropout", ["0.05"]),
    ("train.guidance", ["train.guidance=3.5"], {}, "train.guidance", ["1.0"]),
    ("resolution.unused", [], {"image_sizes": [(640, 640)] * 18}, "dataset.resolutions", ["[768, 1024]"]),
    ("resolution.small_images", [], {"image_sizes": [(256, 256)] * 18}, "dataset.resolutions", ["18 of 18", "256x256"]),
    ("sample.larger_than_training", ["dataset.resolutions=[512]"], {}, "sample.width", ["~512px"]),
    ("save.only_final", ["save.every=1000"], {}, "save.every", ["only the final"]),
]


@pytest.mark.parametrize("rule, overrides, kw, key, words", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_rule_fires_with_its_key_and_fix(rule, overrides, kw, key, words):
    assert rule not in ids(guide()), "the guide's settings must not trigger it"
    found = ids(guide(*overrides), **kw)
    assert rule in found, format_advice(list(found.values()))
    a = found[rule]
    assert a.key == key and a.fix and a.severity in ("info", "warning", "error")
    for w in words:
        assert w in a.message + " fix: " + a.fix, (w, a)


def test_dev_only_rules_stay_quiet_for_schnell():
    found = ids(guide("model.path=black-forest-labs/FLUX.1-schnell", "train.guidance=3.5", "sample.guidance=0",
                      "sample.steps=4"))
    assert not {"train.guidance", "sample.guidance", "sample.steps_few"} & set(found)


def test_errors_come_first_and_strict_mode_raises():
    items = advise(guide("train.steps=100", "train.batch_size=8", "distributed.workers=8"), image_sizes=GUIDE_IMAGES)
    assert items[0].severity == "error"
    with pytest.raises(AdviceError, match="batch.exceeds_dataset"):
        check_strict(items)


def test_dataset_is_read_from_a_prepared_folder_and_from_a_raw_one(prepared_sample):
    assert dataset_facts(guide(f"dataset.path={prepared_sample}")) == (18, [(256, 256)] * 18, "pxco")
    n, sizes, trigger = dataset_facts(guide(f"dataset.path={REPO / 'samples' / 'pxco'}"))
    assert (n, trigger) == (18, "pxco") and sizes == [(256, 256)] * 18
    # A prompt without the dataset's trigger is caught with no trigger in the config.
    cfg = guide(f"dataset.path={prepared_sample}", "dataset.trigger_word=null", "sample.prompts=['a photo of a man']")
    assert "prompt.no_trigger" in {a.id for a in advise(cfg)}


def test_advice_imports_and_runs_without_torch(prepared_sample):
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'diffusers', 'deepspeed', 'ray'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from fluxray.advise.rules import advise\n"
        "from fluxray.config import load_config\n"
        f"cfg = load_config({str(REPO / 'configs' / 'flux-dev.yaml')!r}, ['dataset.path={prepared_sample}', 'train.steps=100'])\n"
        "print(sorted(a.id for a in advise(cfg)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "steps.too_few" in r.stdout and "resolution.small_images" in r.stdout


def test_cli_prints_advice_and_estimate_and_strict_exits_non_zero(tmp_path):
    fluxray = str(Path(sys.executable).parent / "fluxray")
    args = [fluxray, "advise", "--config", "configs/flux-dev.yaml", "--set", "dataset.path=null"]
    ok = subprocess.run(args + ["--strict"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "GPU-hours" in ok.stdout and "1 x H100" in ok.stdout
    bad = subprocess.run(args + ["--set", "train.steps=100", "--strict", "--gpu", "A100"], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "steps.too_few" in bad.stdout and "strict mode" in bad.stderr
    assert "Traceback" not in bad.stderr and "1 x A100" in bad.stdout


def test_the_shipped_demo_config_draws_no_warning_and_says_once_why(tmp_path, random_flux):
    demo = [f"dataset.path={REPO / 'samples' / 'pxco'}", f"storage.root={tmp_path}"]
    items = advise(load_config(REPO / "configs" / "tiny.yaml", demo))
    assert [a.id for a in items if a.severity != "info"] == []
    check_strict(items)
    assert [a.id for a in items].count("model.demo") == 1
    # The guide's likeness advice is left out for the demo model only: the same settings on a
    # model folder get it.
    other = {a.id for a in advise(load_config(REPO / "configs" / "tiny.yaml", demo + [f"model.path={random_flux}"]))}
    assert "lr.too_high" in other and "model.demo" not in other


def test_captions_longer_than_clip_or_t5_reads_are_counted_once(tiny_config, random_flux, prepared_sample, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    # The sample's captions, each written twice: longer than CLIP's 77 tokens too (its tokenizer knows
    # every caption word, so one caption is some 55 tokens).
    shutil.copytree(prepared_sample, tmp_path / "long")
    rows = [json.loads(line) for line in (prepared_sample / "metadata.jsonl").read_text().splitlines()]
    rows = [{**r, "text": r["text"] + " " + r["text"]} if k % 3 else r for k, r in enumerate(rows)]
    (tmp_path / "long" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [r["text"] for r in rows]
    clip = AutoTokenizer.from_pretrained(random_flux, subfolder="tokenizer")
    t5 = AutoTokenizer.from_pretrained(random_flux, subfolder="tokenizer_2")
    over_clip = sum(len(clip(t).input_ids) > 77 for t in texts)
    over_32 = sum(len(t5(t).input_ids) > 32 for t in texts)
    assert 0 < over_clip < over_32  # the doubled captions are long for both, the others for T5's 32
    long = f"dataset.path={tmp_path / 'long'}"
    a = ids(tiny_config(long), image_sizes=None)["captions.truncated"]  # tiny.yaml: model.max_sequence_length 32
    assert a.severity == "info" and a.key == "model.max_sequence_length"
    assert a.message == (f"{over_clip} of the 18 captions are longer than the 77 CLIP tokens: CLIP sees their first "
                         f"77; {over_32} are longer than model.max_sequence_length=32 T5 tokens: T5 sees their first 32")
    a = ids(tiny_config(long, "model.max_sequence_length=512"), image_sizes=None)["captions.truncated"]
    assert a.message.endswith("CLIP sees their first 77, T5 the whole caption") and a.key == "dataset.path"
    assert "captions.truncated" not in ids(tiny_config("dataset.path=null"), image_sizes=None)


def test_a_bad_model_path_is_one_config_error(tiny_config):
    with pytest.raises(ConfigError, match=r"^model.path: '/data/no-such-model' does not exist .*FLUX.1-dev"):
        advise(tiny_config("model.path=/data/no-such-model"))
