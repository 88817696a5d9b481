"""Training-side security: user input is only ever read by safe loaders, and no config value makes
fluxray write outside its storage root (uploads are read, never written, symlinks included)."""

import ast
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fluxray.config import load_config
from fluxray.data.sample import make_sample_images
from fluxray.errors import ConfigError
from fluxray.train.job import run_job

REPO = Path(__file__).resolve().parents[2]
FLUXRAY = str(Path(sys.executable).parent / "fluxray")

# -- safe loaders ----------------------------------------------------------------------------

_PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
_SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}

#: "path:line" -> why that call is safe. Empty: nothing in fluxray needs an exception.
ALLOWED: dict[str, str] = {}


def _name(node: ast.AST) -> str:
    """`a.b.c` for a Name/Attribute chain, else ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def unsafe_calls(source: str) -> list[tuple[int, str]]:
    """(line, what) for each call in `source` that can run code hidden in the data it reads."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in _PICKLERS:
            found += [(node.lineno, f"from {node.module} import {a.name}")
                      for a in node.names if "load" in a.name.lower()]
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        if name in ("eval", "exec"):
            found.append((node.lineno, f"{name}()"))
        elif name.split(".")[0] in _PICKLERS and ("load" in name.rsplit(".", 1)[-1].lower()
                                                  or name.endswith("Unpickler")):
            found.append((node.lineno, f"{name}()"))
        elif name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
            found.append((node.lineno, f"{name}()"))
        elif name in ("yaml.load", "yaml.load_all"):
            loader = kw.get("Loader", node.args[1] if len(node.args) > 1 else None)
            if loader is None or _name(loader).rsplit(".", 1)[-1] not in _SAFE_YAML_LOADERS:
                found.append((node.lineno, f"{name}() without a safe Loader"))
        elif name == "torch.load":
            flag = kw.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append((node.lineno, "torch.load() without weights_only=True"))
        elif name.endswith(("np.load", "numpy.load")) and isinstance(kw.get("allow_pickle"), ast.Constant) \
                and kw["allow_pickle"].value is True:
            found.append((node.lineno, f"{name}(allow_pickle=True)"))
        elif name in ("pandas.read_pickle", "pd.read_pickle"):
            found.append((node.lineno, f"{name}()"))
    return sorted(found)


@pytest.mark.parametrize("snippet", [
    "import pickle\npickle.load(open('x', 'rb'))",
    "import pickle\npickle.loads(data)",
    "from pickle import loads",
    "import dill\ndill.load(f)",
    "import yaml\nyaml.load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.Loader)",
    "import yaml\nyaml.unsafe_load(text)",
    "import yaml\nyaml.full_load(text)",
    "import torch\ntorch.load('ckpt.pt')",
    "import torch\ntorch.load('ckpt.pt', weights_only=False)",
    "eval(user_text)",
    "exec(code)",
    "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
])
def test_the_scanner_finds_unsafe_loaders(snippet):
    assert unsafe_calls(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "import yaml\nyaml.safe_load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
    "import torch\ntorch.load('ckpt.pt', weights_only=True)",
    "engine.eval()",
    "module.eval()\nmodel.train()",
    "import json\njson.loads(text)",
    "from safetensors.torch import load_file\nload_file('a.safetensors')",
])
def test_the_scanner_passes_safe_loaders(snippet):
    assert unsafe_calls(snippet) == []


def test_fluxray_reads_user_input_only_with_safe_loaders():
    sources = sorted((REPO / "fluxray").rglob("*.py")) + sorted((REPO / "jobs").glob("*.py"))
    assert len(sources) > 20
    found = [f"{path.relative_to(REPO)}:{line}: {what}" for path in sources
             for line, what in unsafe_calls(path.read_text(encoding="utf-8"))]
    assert [f for f in found if f.rsplit(":", 1)[0] not in ALLOWED] == []


# -- nothing written outside the storage root ------------------------------------------------

@pytest.mark.parametrize("name", ["../x", "../../etc/cron.d/x", "/abs", "/tmp/x", ".hidden", "..", ".",
                                  "a/b", "a\\b", "", "nul\0byte", "x" * 201])
def test_save_name_cannot_leave_the_storage_root(name):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "tiny.yaml", [f"save.name={name}"])
    assert "save.name" in str(e.value) and repr(name)[:40] in str(e.value)


def _tree(folder: Path, skip: Path) -> dict[str, tuple]:
    """Every entry under `folder` but `skip`, never following links: kind and content hash or target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != skip]
        for n in dirnames + filenames:
            p = here / n
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            else:
                out[rel] = ("dir",)
    return out


def test_a_job_reads_its_upload_and_writes_only_under_the_root(tiny_config, tmp_path):
    """A raw upload outside the root, holding symlinks to a file and a folder outside it: the job
    prepares a copy under the root (regular files only) and leaves everything else as it was."""
    root = tmp_path / "root"
    up, outside = tmp_path / "upload", tmp_path / "outside"
    make_sample_images(up, n=4, size=64)
    outside.mkdir()
    Image.new("RGB", (64, 64), (0, 120, 0)).save(outside / "secret.png")
    (outside / "notes.txt").write_text("keep me")
    (up / "linked.png").symlink_to(outside / "secret.png")
    (up / "escape").symlink_to(outside, target_is_directory=True)
    captions = (up / "captions.json").read_text().rstrip().rstrip("}")
    (up / "captions.json").write_text(captions + ', "linked.png": "a green square"}')
    before = _tree(tmp_path, skip=root)

    cfg = tiny_config(f"dataset.path={up}", "train.steps=2", "save.every=2", "sample.every=0", "validation.images=1",
                      "validation.sigmas=[0.5]", "distributed.workers=1", "save.name=confined", root=root)
    summary = run_job(cfg, local=True)

    assert _tree(tmp_path, skip=root) == before
    assert Path(summary["lora"]).is_relative_to(root)
    prepared = [p for p in (root / "datasets").iterdir() if p.name.startswith("upload-")]
    assert len(prepared) == 1
    entries = list(prepared[0].iterdir())
    assert "linked.png" in {p.name for p in entries} and "escape" not in {p.name for p in entries}
    assert not any(p.is_symlink() for p in entries) and all(p.is_file() for p in entries)


def test_a_traversing_run_name_fails_before_anything_is_written(tmp_path):
    root = tmp_path / "root"
    r = subprocess.run([FLUXRAY, "train", "--config", "configs/tiny.yaml", "--local", "--set", f"storage.root={root}",
                        "--set", "save.name=../escaped"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2 and "save.name" in r.stderr and "'../escaped'" in r.stderr, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("trigger, name", [("../escaped", "escaped-"), (".pxco", "pxco-"), ("..", "run-")])
def test_a_run_named_after_its_trigger_stays_under_the_root(tiny_config, tmp_path, trigger, name):
    from fluxray.train.job import resolve_job, run_dir

    # The raw sample folder: it is prepared with this trigger (a prepared one keeps its own).
    cfg = resolve_job(tiny_config(f"dataset.path={REPO / 'samples' / 'pxco'}", f"dataset.trigger_word={trigger}",
                                  "save.name=null"))
    assert cfg.save.name.startswith(name) and run_dir(cfg).parent == cfg.storage_root / "runs"
