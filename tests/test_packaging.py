"""The package as the Comfy Registry and ComfyUI-Manager take it.

pyproject.toml is read the way comfy-cli's `comfy node publish` reads it (comfy_cli/registry/config_parser.py:
the OS/accelerator classifier sets, the requires-comfyui version pattern, a non-empty version) plus the
registry's naming rules (docs.comfy.org/registry/specifications); the package is what `comfy node publish`
zips: git-tracked files minus .comfyignore, with [tool.comfy] includes always in.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONF = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT, COMFY = CONF["project"], CONF["tool"]["comfy"]
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
        "GPU :: Apple Metal"}
VERSION_SPEC = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")
# Our bound, not a documented registry number (comfy-cli checks none): the biggest file today is the demo's
# 7.2 MB world UNet; anything near this is a model file that belongs in the user's models folder instead.
MAX_FILE_BYTES = 16 * 2**20


def test_registry_id_and_version():
    name = PROJECT["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", name), name
    assert "comfyui" not in name.lower(), "the registry asks ids not to contain 'ComfyUI' (ids are permanent)"
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"]), "semantic version X.Y.Z"
    top = re.search(r"^## \[?(\d+\.\d+\.\d+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert top and top.group(1) == PROJECT["version"], "CHANGELOG.md's newest entry names the pyproject version"
    assert (ROOT / PROJECT["license"]["file"]).is_file()
    assert PROJECT["description"].strip()


def test_the_version_every_lora_header_records_is_the_pyproject_one(tmp_path):
    import cat_train
    from cat_train.adapters.export import training_metadata

    assert cat_train.__version__ == PROJECT["version"]
    meta = training_metadata(cat_factor=1.0, triggers=["sks"], preservation="class", steps=1, rank=4, alpha=4, lr=1e-4)
    assert meta["cat_version"] == PROJECT["version"]
    # read as written, whatever else the file holds: a pyproject with another version gives that one
    (tmp_path / "cat_train").mkdir()
    (tmp_path / "cat_train" / "__init__.py").write_text((ROOT / "cat_train" / "__init__.py").read_text())
    (tmp_path / "pyproject.toml").write_text('[tool.x]\nversion = "9.9.9"\n[project]\nname = "x"\nversion = "1.2.3"\n')
    out = subprocess.run([sys.executable, "-c", "import cat_train; print(cat_train.__version__)"], cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1.2.3"


def test_tool_comfy_table_as_the_registry_reads_it():
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui", "includes"):
        assert COMFY.get(key), f"[tool.comfy] {key} is empty"
    assert PROJECT["urls"]["Repository"].startswith("https://")
    assert all(VERSION_SPEC.match(p.strip()) for p in COMFY["requires-comfyui"].split(",")), COMFY["requires-comfyui"]
    classifiers = PROJECT["classifiers"]
    os_values = [c.removeprefix("Operating System :: ") for c in classifiers if c.startswith("Operating System :: ")]
    acc_values = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment ::")]
    assert os_values and all(v.startswith(OS_PREFIXES) for v in os_values)
    assert acc_values and set(acc_values) <= ACCELERATORS
    # the placeholders are marked for the publisher to set, and the publish workflow refuses them
    workflow = (ROOT / ".github" / "workflows" / "publish.yml").read_text()
    for placeholder in ("your-publisher-id", "your-github-user"):
        assert placeholder in workflow and "PUBLISH" in (ROOT / "pyproject.toml").read_text()
    assert "publish-node-action" in workflow and "paths: [pyproject.toml]" in workflow


def test_icon_is_a_square_png_in_the_repo():
    rel = COMFY["Icon"].split("/main/", 1)[1]
    with Image.open(ROOT / rel) as im:
        assert im.format == "PNG" and im.width == im.height <= 400, (im.format, im.size)


def test_requirements_leave_torch_to_the_host():
    for f in ("requirements.txt",):
        reqs = [ln.split("#")[0].strip() for ln in (ROOT / f).read_text().splitlines()]
        names = {re.split(r"[<>=!~ \[]", r)[0].lower() for r in reqs if r}
        assert not names & {"torch", "torchvision", "torchaudio"}, f"{f} names {names & {'torch', 'torchvision'}}"
    deps = {re.split(r"[<>=!~ \[]", d)[0].lower() for d in PROJECT["dependencies"]}
    assert not deps & {"torch", "torchvision"}


def _package_files() -> list[str]:
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the registry package is made from git-tracked files")
    ignored = [ln.strip() for ln in (ROOT / ".comfyignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    assert all(p.endswith("/") and "*" not in p for p in ignored), ("keep .comfyignore to folder names (read here "
                                                                    "without pathspec)")
    forced = [i.rstrip("/") + "/" for i in COMFY["includes"]]
    return [f for f in tracked if any(f.startswith(i) for i in forced) or not any(f.startswith(p) for p in ignored)]


def test_package_ships_what_the_nodes_and_demo_need_and_nothing_huge():
    files = _package_files()
    for needed in ("__init__.py", "web/cat_live_view.js", "cat_train/world/base.safetensors",
                   "cat_train/world/clip.safetensors", "requirements.txt", "LICENSE"):
        assert needed in files, f"{needed} would not be in the registry package"
    assert all(any(f.startswith(i.rstrip("/") + "/") for f in files) for i in COMFY["includes"])
    assert not [f for f in files if f.startswith("tests/")], "tests are left out of the package (.comfyignore)"
    big = [(f, (ROOT / f).stat().st_size) for f in files if (ROOT / f).stat().st_size > MAX_FILE_BYTES]
    assert big == []


def test_template_folder_holds_only_ui_graphs():
    """ComfyUI serves every *.json directly in workflows/ as a template: API-format graphs live in workflows/api/."""
    import json

    for p in (ROOT / "workflows").glob("*.json"):
        g = json.loads(p.read_text())
        assert "nodes" in g and "links" in g, f"{p.name} is not a UI graph"
    api = list((ROOT / "workflows" / "api").glob("*.api.json"))
    assert len(api) >= 6 and all("class_type" in next(iter(json.loads(p.read_text()).values())) for p in api)
