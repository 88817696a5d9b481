"""Every file in cluster/ loads, and the commands in it (and in docs/cluster.md) name what this
repo really has: packages from pyproject.toml, the `fluxray` script and its subcommands, the Ray
version it pins, and files in jobs/ and configs/ that exist and load with their --set overrides."""

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from fluxray.cli import build_parser
from fluxray.config import load_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER_FILES = sorted((REPO / "cluster").glob("*.yaml"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DEPENDENCIES = {canonicalize_name(Requirement(d).name): Requirement(d) for d in PYPROJECT["project"]["dependencies"]}
RAY_VERSION = next(iter(DEPENDENCIES["ray"].specifier)).version
SUBCOMMANDS = set(next(a for a in build_parser()._actions if a.dest == "command").choices)
MOUNT = "/mnt/fluxray"


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _commands(path: Path) -> list[str]:
    """Shell commands of a file: its string values, its `#   command` header lines, or the
    bash blocks of a markdown page, cut at `&&`, `||`, `;` and `|`."""
    text = path.read_text()
    if path.suffix == ".md":
        lines = [ln for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S) for ln in block.splitlines()]
    else:
        lines = [ln[1:] for ln in text.splitlines() if ln.startswith("#   ")]
        lines += [s for d in _docs(path) for s in _strings(d)]
    lines = [ln.split(" #", 1)[0] for ln in lines]  # trailing comments
    return [part.strip(" ()") for ln in lines for part in re.split(r"&&|\|\||;|\|(?!\|)", ln) if part.strip(" ()")]


def _check(cmd: str, seen: dict) -> list[str]:
    try:
        words = shlex.split(cmd)
    except ValueError:  # not shell (a description, a YAML value): nothing to check
        return []
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    problems = []
    for i, w in enumerate(words):
        if re.fullmatch(r"(cluster|configs|jobs)/[\w./-]+", w) and not (REPO / w).exists():
            problems.append(f"{w}: no such file in the repo")
    if words[:2] == ["pip", "install"]:
        seen["pip"] += 1
        args, skip = words[2:], False
        for a in args:
            if skip:
                skip = False
            elif a in ("--index-url", "-i", "--extra-index-url"):
                skip = True
            elif a.startswith("-"):
                continue
            elif a.startswith((".", "/", "~")):
                if not (a in (".", "/app") or a.rstrip("/").endswith("fluxray")):
                    problems.append(f"pip install {a}: not this repo")
            else:
                req = Requirement(a)
                dep = DEPENDENCIES.get(canonicalize_name(req.name))
                if dep is None:
                    problems.append(f"pip install {a}: {req.name} is not a dependency in pyproject.toml")
                elif req.specifier and str(req.specifier) != str(dep.specifier):
                    problems.append(f"pip install {a}: pyproject.toml pins {dep}")
    if "python" in words and words.index("python") + 1 < len(words):
        script = words[words.index("python") + 1]
        if script.endswith(".py"):
            seen["python"] += 1
            if not (REPO / script).is_file():
                problems.append(f"python {script}: no such file")
    if words[:1] == ["fluxray"] and len(words) > 1:  # a bare `fluxray` is a name (cluster, metadata)
        seen["fluxray"] += 1
        if "fluxray" not in PYPROJECT["project"]["scripts"] or words[1] not in SUBCOMMANDS:
            problems.append(f"{cmd}: not a fluxray command")
    if "--config" in words:
        seen["config"] += 1
        config = words[words.index("--config") + 1]
        sets = [words[j + 1] for j, w in enumerate(words[:-1]) if w == "--set"]
        try:
            cfg = load_config(REPO / config, sets)
        except Exception as e:  # noqa: BLE001 - the message is the finding
            problems.append(f"{config} with {sets}: {e}")
        else:
            if any(s.startswith("storage.root=") for s in sets) and cfg.storage.root != MOUNT:
                problems.append(f"{cmd}: storage.root {cfg.storage.root} is not the shared mount {MOUNT}")
    return problems


@pytest.mark.parametrize("path", CLUSTER_FILES + [REPO / "docs" / "cluster.md"], ids=lambda p: p.name)
def test_commands_name_real_packages_scripts_and_files(path):
    seen = {"pip": 0, "python": 0, "fluxray": 0, "config": 0}
    problems = [p for cmd in _commands(path) for p in _check(cmd, seen)]
    assert not problems, "\n".join(problems)
    assert seen["python"] + seen["fluxray"] >= 1 and seen["config"] >= 1, f"no training command found in {path.name}"


def test_cluster_folder_has_a_launcher_config_and_kuberay_cluster_and_job():
    kinds = {d.get("kind", "launcher" if "head_node_type" in d else None) for p in CLUSTER_FILES for d in _docs(p)}
    assert {"launcher", "RayCluster", "RayJob"} <= kinds


def test_launcher_installs_torch_then_fluxray_and_starts_ray_with_token_auth():
    (launcher,) = [d for p in CLUSTER_FILES for d in _docs(p) if "head_node_type" in d]
    setup = " ; ".join(launcher["setup_commands"])
    assert setup.index("pip install torch") < setup.index("pip install -e")
    starts = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts if "ray start" in c)
    assert any(MOUNT in c for c in launcher["setup_commands"])  # the shared storage root on every node


def test_kuberay_pins_the_ray_version_mounts_shared_storage_and_uses_token_auth():
    resources = [d for p in CLUSTER_FILES for d in _docs(p) if d.get("kind") in ("RayCluster", "RayJob")]
    assert resources
    for res in resources:
        spec = res["spec"] if res["kind"] == "RayCluster" else res["spec"]["rayClusterSpec"]
        assert spec["rayVersion"] == RAY_VERSION and spec["authOptions"]["mode"] == "token"
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            for c in pod["spec"]["containers"]:
                assert MOUNT in [m["mountPath"] for m in c["volumeMounts"]], f"{res['kind']} {c['name']}"
    (job,) = [r for r in resources if r["kind"] == "RayJob"]
    assert job["spec"]["entrypoint"].startswith("python jobs/train.py --config configs/flux-dev.yaml")
    assert f"storage.root={MOUNT}" in job["spec"]["entrypoint"]


def test_ray_images_and_wheels_are_the_pinned_ray_version():
    texts = [p.read_text() for p in CLUSTER_FILES + [REPO / "docs" / "cluster.md"]]
    versions = [v for t in texts for v in re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", t)]
    assert versions and set(versions) == {RAY_VERSION}
