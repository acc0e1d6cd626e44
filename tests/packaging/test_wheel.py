"""The project installed like a library: a wheel, installed non-editable into a fresh venv, run
from a directory outside the checkout.

The wheel is built from a copy of the source tree (nothing of the checkout's build/ or egg-info
gets in, and the checkout stays clean). The fresh venv's own site-packages holds only the wheel;
torch, megatron-core and the other dependencies come from the running interpreter's site-packages,
appended after it by a .pth file (a plain path: the checkout's editable finder, itself a .pth hook,
is not activated). So every import of megatron_grouter below is the wheel's copy, and the configs
it composes are the ones packaged in it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.tiny_dataset import TINY_MODEL, tiny_dataset

REPO = Path(__file__).resolve().parents[2]
CONF_FILES = sorted(str(path.relative_to(REPO)) for path in (REPO / "megatron_grouter" / "conf").rglob("*.yaml"))
# Not part of the source: at the top, environments, data, run outputs and build leftovers (only
# there: megatron_grouter/data and conf/data are source); anywhere, caches and egg-info.
TOP_LEVEL_NOT_SOURCE = {".venv", ".git", "data", "outputs", "build", "dist", "wandb", ".pytest_cache"}
NOWHERE = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache")


def _not_source(directory: str, names: list[str]) -> set[str]:
    ignored = set(NOWHERE(directory, names))
    return ignored | (TOP_LEVEL_NOT_SOURCE & set(names) if Path(directory) == REPO else set())

pytestmark = pytest.mark.slow


def _require_build_tools() -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:  # versions only: importing setuptools here would fight distutils already imported by others
        versions = {name: version(name) for name in ("pip", "setuptools")}
    except PackageNotFoundError as missing:
        pytest.skip(f"building the wheel needs pip and setuptools in this interpreter ({missing} is missing)")
    major, minor = (int(part) for part in versions["pip"].split(".")[:2])
    if (major, minor) < (22, 3):
        pytest.skip(f"pip {versions['pip']} < 22.3 has no --python to install into the fresh venv")
    major, minor = (int(part) for part in versions["setuptools"].split(".")[:2])
    if (major, minor) < (62, 3):
        pytest.skip(f"setuptools {versions['setuptools']} < 62.3 cannot expand package_data's `**` globs "
                    "(pyproject.toml's build-system asks for >= 62.3; --no-build-isolation uses this one)")


def _run(command: list, cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(map(str, command))} failed ({result.returncode}):\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The wheel (built from a copy of this tree), installed non-editable with --no-deps into a fresh venv."""
    _require_build_tools()
    root = tmp_path_factory.mktemp("wheel")
    base_env = {key: value for key, value in os.environ.items()
                if key not in ("PYTHONPATH", "PYTHONHOME", "MG_CONF_DIR", "PYTHONSTARTUP")}
    base_env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONNOUSERSITE="1", PIP_NO_INPUT="1",
                    PIP_DISABLE_PIP_VERSION_CHECK="1")

    source = root / "src"
    shutil.copytree(REPO, source, ignore=_not_source)
    wheels = root / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", wheels, source], cwd=root, env=base_env)
    (wheel,) = wheels.glob("megatron_grouter-*.whl")

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root, env=base_env)
    python = venv / "bin" / "python"
    venv_site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          cwd=root, env=base_env).stdout.strip())
    parent = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (venv_site / "zz_parent_site_packages.pth").write_text("".join(f"{path}\n" for path in parent))
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
         cwd=root, env=base_env)

    work = root / "work"  # outside the checkout: no conf/ here, no megatron_grouter/ to import by accident
    work.mkdir()
    return {"wheel": wheel, "venv": venv, "site": venv_site, "bin": venv / "bin", "python": python,
            "env": base_env, "work": work}


def test_wheel_holds_the_configs_and_the_kernel_source(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    assert CONF_FILES and set(CONF_FILES) <= names, sorted(set(CONF_FILES) - names)
    assert "megatron_grouter/routing/probmoe_kernel.c" in names
    assert not any(name.startswith(("tests/", "conf/")) for name in names)


def test_the_installed_copy_is_imported(installed):
    probe = ("import json, megatron_grouter, megatron_grouter.app as app; "
             "print(json.dumps([megatron_grouter.__file__, str(app.CONF_DIR)]))")
    module_file, conf_dir = json.loads(_run([installed["python"], "-c", probe], cwd=installed["work"],
                                            env=installed["env"]).stdout.strip().splitlines()[-1])
    assert Path(module_file).is_relative_to(installed["site"]), module_file
    assert Path(conf_dir) == installed["site"] / "megatron_grouter" / "conf"
    assert not Path(module_file).is_relative_to(REPO)


def test_mg_train_composes_its_config(installed):
    result = _run([installed["bin"] / "mg-train", "--cfg", "job", "router=probmoe_exact_k"],
                  cwd=installed["work"], env=installed["env"])
    assert "name: tiny_cpu" in result.stdout and "name: probmoe_exact_k" in result.stdout, result.stdout
    assert "corpus: stdlib" in result.stdout


def test_tool_and_reproduce_apps_find_their_groups(installed):
    result = _run([installed["bin"] / "mg-reproduce", "experiment=quick", "--help"],
                  cwd=installed["work"], env=installed["env"])
    assert "experiment: ablations, paper, quick, standard" in result.stdout, result.stdout
    result = _run([installed["bin"] / "mg-plan-ep", "--cfg", "job"], cwd=installed["work"], env=installed["env"])
    assert result.stdout.strip(), result.stderr


def test_mg_train_runs_a_few_steps(installed):
    work = installed["work"]
    data = tiny_dataset(work / "data")
    _run([installed["bin"] / "mg-train", f"data.prefix={data['prefix']}", f"data.tokenizer={data['tokenizer']}",
          f"data.out_dir={data['out_dir']}", *TINY_MODEL, "train.steps=3", "train.eval_interval=0",
          "train.save_interval=0", "train.out_dir=run"], cwd=work, env=installed["env"])
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines() if line]
    steps = sorted(record["step"] for record in records if "loss" in record)
    assert steps[-1] == 3, records
