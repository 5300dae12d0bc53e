"""pyproject.toml, constraints.txt and environment.yml name the same packages."""

import re
from importlib.metadata import version

import tomllib
from packaging.requirements import Requirement

from sdscratch.book import ROOT


def name(requirement: str) -> str:
    return Requirement(requirement).name.lower().replace("_", "-")


def pyproject_names() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return {name(r) for r in project["dependencies"] + extras}


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            assert str(requirement.specifier).startswith("=="), f"{line} is not pinned"
            pins[name(line)] = str(requirement.specifier)[2:]
    return pins


def environment_names() -> set[str]:
    text = (ROOT / "environment.yml").read_text()
    pip_section = text.split("- pip:")[1]
    entries = re.findall(r"^\s+- (\S+)", pip_section, flags=re.MULTILINE)
    return {name(e) for e in entries if not e.startswith("-")}


def test_all_three_files_name_the_same_packages():
    assert pyproject_names() == set(constraints()) == environment_names()


def test_torch_is_pinned_to_the_cpu_wheel_on_disk():
    assert constraints()["torch"] == "2.13.0"


def test_installed_versions_are_the_pinned_ones():
    for package, pinned in constraints().items():
        installed = version(package).split("+")[0]  # 2.13.0+cpu is 2.13.0
        assert installed == pinned, f"{package} {installed} installed, {pinned} pinned"


def test_environment_yml_keeps_conda_to_python_and_pip():
    text = (ROOT / "environment.yml").read_text().split("dependencies:")[1]
    conda_level = re.findall(r"^  - ([^\s:]+)$", text, flags=re.MULTILINE)
    assert [entry.split("=")[0] for entry in conda_level] == ["python", "pip"]
    assert "-c constraints.txt" in text
