"""pyproject.toml, constraints.txt and environment.yml name the same packages, and
pyproject.toml's dependencies are what the package imports."""

import ast
import re
import tomllib
from importlib.metadata import packages_distributions, version

from packaging.requirements import Requirement

from sdscratch.book import ROOT


def name(requirement: str) -> str:
    return Requirement(requirement).name.lower().replace("_", "-")


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pyproject_names() -> set[str]:
    extras = [r for group in project()["optional-dependencies"].values() for r in group]
    names = {name(r) for r in project()["dependencies"] + extras}
    return names - {"sdscratch"}  # an extra that includes another one


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


# ----------------------------------------------------------------------------------
# What the package imports


COURSE_TOOLING = {"book.py", "pages.py"}  # the website and lesson runner: course extra


def imported_distributions(files, top_level=False) -> set[str]:
    """The installed distributions that `files` import (at the top, or also inside
    functions), standard library and sdscratch left out."""
    distributions = packages_distributions()
    found = set()
    for file in files:
        tree = ast.parse(file.read_text())
        for node in tree.body if top_level else ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                found |= {name(d) for d in distributions.get(top, [])}
    return found - {"sdscratch"}


def requirement_names(requirements) -> set[str]:
    return {name(r) for r in requirements} - {"sdscratch"}


def test_runtime_dependencies_are_what_the_package_imports():
    package = ROOT / "sdscratch"
    core = [f for f in package.glob("*.py") if f.name not in COURSE_TOOLING]
    runtime = requirement_names(project()["dependencies"])
    lessons = requirement_names(project()["optional-dependencies"]["lessons"])
    assert imported_distributions(core, top_level=True) <= runtime
    assert runtime <= imported_distributions(core)
    # Optional features import their libraries inside the function that needs them,
    # from the lessons extra: to_diffusers (diffusers, transformers), downloads from
    # the Hub (huggingface_hub).
    assert imported_distributions(core) - runtime <= lessons


def test_course_tooling_imports_only_the_course_extra():
    extras = project()["optional-dependencies"]
    allowed = requirement_names(project()["dependencies"] + extras["course"])
    tooling = [ROOT / "sdscratch" / file for file in COURSE_TOOLING]
    # nbformat, nbclient, jupyter-client and jinja2 come with nbconvert and nbval
    indirect = {"nbformat", "nbclient", "jupyter-client", "jinja2"}
    assert imported_distributions(tooling) - indirect <= allowed
    assert {"jupyterlab", "nbval", "nbconvert"} <= requirement_names(extras["course"])
    assert "sdscratch[course]" in extras["test"]
    assert "sdscratch[lessons]" in extras["course"]


def test_requires_python_admits_no_version_without_tomllib():
    from packaging.specifiers import SpecifierSet

    supported = SpecifierSet(project()["requires-python"])
    assert "3.10.12" not in supported and "3.11.0" in supported


def test_the_colab_cell_installs_a_tag_and_says_one_sentence_offline(monkeypatch):
    """Run the lessons' setup cell as if on Kaggle, with pip failing."""
    import subprocess

    from sdscratch import __version__
    from sdscratch.book import load_book, setup_code

    calls = []

    def offline_pip(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, returncode=1)

    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.setattr(subprocess, "run", offline_pip)
    printed = []
    exec(setup_code(load_book()), {"print": lambda *a: printed.append(a)})
    (command,) = calls
    requirement = Requirement(command[-1])
    assert requirement.url.endswith(f"@v{__version__}")  # a tag, not a branch
    assert requirement.extras == {"lessons"}
    assert "lessons" in project()["optional-dependencies"]
    assert len(printed) == 1 and "offline" in printed[0][0]
