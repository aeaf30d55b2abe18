"""The recipes shipped inside the package (align_distill.recipes): names, `--config` resolution, the quickstart
requirement check, `align-distill recipes list | show | copy`, and (slow) that a built wheel carries them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from align_distill import recipes
from align_distill.errors import ConfigError
from align_distill.recipes import check_requirements, list_recipes, recipe_path, resolve_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "align_distill" / "configs"
YAMLS = sorted(p for p in CONFIGS.glob("*/*.yaml") if p.parent.name not in recipes.LAUNCHER_DIRS)


def classify(values: dict) -> set[str]:
    """What a recipe is, by its keys: a pipeline, a generate job, a training recipe, an evaluation."""
    kinds = set()
    if "stages" in values:
        kinds.add("pipeline")
    if "input" in values:
        kinds.add("generate")
    if "model_name_or_path" in values:
        kinds.add("train")
    if "prompts" in values and "models" in values:
        kinds.add("evaluate")
    return kinds


# -- names ------------------------------------------------------------------------------------------------------------
def test_list_names_every_shipped_file():
    assert YAMLS, CONFIGS
    names = list_recipes()
    assert names == sorted(names)
    assert names == sorted(f"{p.parent.name}/{p.stem}" for p in YAMLS)
    assert {"dckd/cache", "adpa/plus_pipeline", "quickstart/teacher", "mod/vision_tiny"} <= set(names)
    launchers = recipes.list_launcher_configs()
    shipped = {f"{p.parent.name}/{p.name}" for d in recipes.LAUNCHER_DIRS for p in (CONFIGS / d).iterdir()}
    assert set(launchers) == shipped and {"accelerate/zero3.yaml", "deepspeed/zero3.json"} <= shipped
    for name in names + launchers:
        assert recipe_path(name).is_file(), name
        assert "\n" not in recipes.describe(name), name
    assert recipes.describe("dckd/cache").startswith("DCKD")
    assert "offload" in recipes.describe("deepspeed/zero3_offload.json")


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_recipe_is_one_kind(path):
    values = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(values, dict), path
    kinds = classify(values)
    assert len(kinds) == 1, (path, kinds)
    (kind,) = kinds
    first = path.read_text(encoding="utf-8").splitlines()[0]
    for command, expected in (("align-distill pipeline", "pipeline"), ("align-distill generate", "generate"),
                              ("align-distill train", "train"), ("align-distill evaluate", "evaluate")):  # fmt: skip
        if first.startswith(f"# {command}"):
            assert kind == expected, (path, first)
    if kind == "pipeline":
        assert isinstance(values["stages"], list) and values["stages"], path


def test_recipe_path_names_and_unknown_name():
    cache = recipe_path("dckd/cache")
    assert cache == (CONFIGS / "dckd" / "cache.yaml") and recipe_path("dckd/cache.yaml") == cache
    assert recipe_path("deepspeed/zero3.json").name == "zero3.json"
    assert recipe_path("accelerate/zero3") == recipe_path("accelerate/zero3.yaml")
    with pytest.raises(ConfigError) as error:
        recipe_path("dckd/cach")
    message = str(error.value)
    assert message.startswith("unknown recipe `dckd/cach` (did you mean `dckd/cache`")
    assert message.endswith("; `align-distill recipes list` shows them")
    for bad in ("../pyproject", "dckd/../dckd/cache", "dckd", ""):
        with pytest.raises(ConfigError):
            recipe_path(bad)


# -- --config -------------------------------------------------------------------------------------------------------
def test_resolve_config_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config("dckd/cache") == recipe_path("dckd/cache")
    assert resolve_config("dckd/cache.yaml") == recipe_path("dckd/cache")
    assert resolve_config("deepspeed/zero3.json") == recipe_path("deepspeed/zero3.json")
    # the docs' repository path names the shipped file from any directory
    assert resolve_config("align_distill/configs/dckd/cache.yaml") == recipe_path("dckd/cache")
    # a real file named like a recipe wins
    (tmp_path / "dckd").mkdir()
    mine = tmp_path / "dckd" / "cache.yaml"
    mine.write_text("max_steps: 1\n")
    assert resolve_config("dckd/cache.yaml") == Path("dckd/cache.yaml")
    assert resolve_config(str(mine)) == mine
    assert resolve_config("dckd/cache") == recipe_path("dckd/cache")  # no such file: the recipe
    unknown = r"^`dckd/cach`: no such file, and not a recipe name \(did you mean `dckd/cache`"
    with pytest.raises(ConfigError, match=unknown):
        resolve_config("dckd/cach")
    with pytest.raises(ConfigError, match="no such file, and not a recipe name; `align-distill recipes list`"):
        resolve_config("zzzz/qqqq.yaml")


def quickstart_paths(values) -> list[str]:
    found = []
    if isinstance(values, dict):
        for key, value in values.items():
            if key not in ("output_dir", "run_dir"):
                found += quickstart_paths(value)
    elif isinstance(values, list):
        for value in values:
            found += quickstart_paths(value)
    elif isinstance(values, str) and values.startswith("runs/quickstart/"):
        found.append(values)
    return found


@pytest.mark.parametrize("name", ["dckd/cache", "adpa/plus_pipeline"])
def test_check_requirements_names_the_quickstart(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = recipe_path(name)
    values = yaml.safe_load(path.read_text(encoding="utf-8"))
    needed = sorted(set(quickstart_paths(values)))
    assert needed, f"{name} reads no quickstart output any more: pick another recipe for this test"
    with pytest.raises(ConfigError) as error:
        check_requirements(path, values)
    message = str(error.value)
    assert message.startswith(f"`{name}.yaml` needs the quickstart's outputs (`runs/quickstart/")
    assert message.endswith("is missing): run `align-distill quickstart` first")
    # the quickstart has run: its outputs exist
    for item in needed:
        target = tmp_path / item
        target.parent.mkdir(parents=True, exist_ok=True)
        target.mkdir() if not Path(item).suffix else target.write_text("")
    check_requirements(path, values)
    # one of them gone again: named
    victim = tmp_path / needed[0]
    victim.rmdir() if victim.is_dir() else victim.unlink()
    with pytest.raises(ConfigError, match=f"`{needed[0]}`"):
        check_requirements(path, values)


def test_check_requirements_is_generic(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = tmp_path / "mine.yaml"
    check_requirements(plain, {"model_name_or_path": "runs/other/model", "n": 3, "flag": True})
    needs = r"^`mine.yaml` needs the quickstart's outputs \(`runs/quickstart/a` and 1 more is missing\)"
    with pytest.raises(ConfigError, match=needs):
        check_requirements(plain, {"x": {"y": ["runs/quickstart/a", {"z": "./runs/quickstart/b"}]}})
    # outputs are not requirements, nor is anything a pipeline writes under its own run_dir
    check_requirements(plain, {"output_dir": "runs/quickstart/new"})
    check_requirements(plain, {"run_dir": "runs/quickstart", "stages": [{"config": {"input": "runs/quickstart/d"}}]})
    # another quickstart folder
    with pytest.raises(ConfigError, match="`qs/model`"):
        check_requirements(plain, {"model_name_or_path": "qs/model"}, quickstart_dir="qs")
    check_requirements(plain, {"model_name_or_path": "runs/quickstart/model"}, quickstart_dir="qs")


# -- align-distill recipes --------------------------------------------------------------------------------------------
def test_main_list_and_show(capsys):
    assert recipes.main(["list"]) == 0
    out = capsys.readouterr().out
    recipe_part, launcher_part = out.split("Launcher configs", 1)
    for name in list_recipes():
        assert f"  {name} " in recipe_part, name
    assert "deepspeed/zero3.json" in launcher_part and "accelerate/zero3.yaml" in launcher_part
    assert "deepspeed/zero3.json" not in recipe_part

    assert recipes.main(["show", "dckd/cache"]) == 0
    assert capsys.readouterr().out == recipe_path("dckd/cache").read_text(encoding="utf-8")
    assert recipes.main(["show", "deepspeed/zero3.json"]) == 0
    assert json.loads(capsys.readouterr().out)["zero_optimization"]["stage"] == 3


def test_main_unknown_name_is_one_line_exit_2(capsys, tmp_path):
    for argv in (["show", "dckd/cach"], ["copy", "dckd/cach", str(tmp_path)]):
        assert recipes.main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.count("\n") == 1
        assert "unknown recipe `dckd/cach` (did you mean `dckd/cache`" in captured.err
    assert list(tmp_path.iterdir()) == []
    assert recipes.main([]) == 2 and "usage:" in capsys.readouterr().err
    assert recipes.main(["--help"]) == 0


def test_main_copy(tmp_path, capsys, monkeypatch):
    target = tmp_path / "mine"
    assert recipes.main(["copy", "dckd/cache", str(target)]) == 0
    written = target / "dckd_cache.yaml"
    assert capsys.readouterr().out.strip() == str(written)
    assert written.read_bytes() == recipe_path("dckd/cache").read_bytes()

    # no overwrite without --force; the existing file is untouched and nothing else is left behind
    written.write_text("mine: 1\n")
    assert recipes.main(["copy", "dckd/cache.yaml", str(target)]) == 2
    captured = capsys.readouterr()
    assert "exists; pass --force" in captured.err and captured.err.count("\n") == 1
    assert written.read_text() == "mine: 1\n" and sorted(p.name for p in target.iterdir()) == ["dckd_cache.yaml"]
    assert recipes.main(["copy", "dckd/cache", str(target), "--force"]) == 0
    assert written.read_bytes() == recipe_path("dckd/cache").read_bytes()

    # launcher files keep their extension; DIR defaults to the current directory
    monkeypatch.chdir(tmp_path)
    assert recipes.main(["copy", "deepspeed/zero3.json"]) == 0
    assert (tmp_path / "deepspeed_zero3.json").read_bytes() == recipe_path("deepspeed/zero3.json").read_bytes()

    # a failed write leaves neither a half-written target nor a temporary file
    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(recipes.os, "replace", broken_replace)
    assert recipes.main(["copy", "dckd/live", str(target)]) == 2
    assert "disk full" in capsys.readouterr().err
    assert sorted(p.name for p in target.iterdir()) == ["dckd_cache.yaml"]


# -- the wheel ------------------------------------------------------------------------------------------------------
def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, (command, result.stdout[-3000:], result.stderr[-3000:])
    return result


@pytest.mark.slow
def test_wheel_ships_the_recipes(tmp_path):
    """A wheel built from the project holds the recipes and launcher files, and an installed wheel finds them from
    outside the repository.

    The wheel is built from a copy of the project's package files (setuptools writes build/ and *.egg-info into the
    source folder, which must not appear in a shared checkout), without build isolation (no network needed). The
    throw-away venv gets the project venv's dependencies (torch, trl, ...) through a plain path line in a .pth file,
    which does NOT run that site's own .pth files: the project's editable finder is never installed, so only the
    wheel's align_distill can be imported (asserted)."""
    started = time.monotonic()
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            (source / name).write_bytes((REPO / name).read_bytes())
    for file in (REPO / "align_distill").rglob("*"):
        if file.is_file() and "__pycache__" not in file.parts and file.suffix != ".pyc":
            target = source / file.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), source])
    (wheel,) = dist.glob("align_distill-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = [("dckd", "cache.yaml"), ("deepspeed", "zero3.json"), ("accelerate", "zero3.yaml")]
    expected = ["/".join(("align_distill", "configs", *parts)) for parts in expected]
    for name in [*expected, "align_distill/recipes.py", "align_distill/py.typed"]:
        assert name in names, name
    shipped = {f"align_distill/configs/{p.relative_to(CONFIGS).as_posix()}" for p in CONFIGS.glob("*/*.*")}
    assert shipped <= names, shipped - names

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)])
    python = venv / "bin" / "python"
    # pip runs against the new interpreter, which cannot see the project's install yet (nothing to "upgrade")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env)
    site = Path(purelib.stdout.strip())
    (site / "_project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = run([str(python), "-c", "import align_distill; print(align_distill.__file__)"], cwd=outside, env=env)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout  # the wheel's files, not the checkout's
    listing = run([str(python), "-m", "align_distill.recipes", "list"], cwd=outside, env=env).stdout
    assert "dckd/cache" in listing and f"files: {site / 'align_distill' / 'configs'}" in listing

    cli = str(venv / "bin" / "align-distill")
    listing = run([cli, "recipes", "list"], cwd=outside, env=env).stdout
    assert "dckd/cache" in listing and "deepspeed/zero3.json" in listing
    help_text = run([cli, "train", "dckd", "--help"], cwd=outside, env=env).stdout
    assert "chosen_kl_weight" in help_text
    print(f"wheel test: {time.monotonic() - started:.1f} s")
