"""The documentation: README.md as the front page, and the site MkDocs builds from docs/.

- The site builds with ``mkdocs build --strict`` and mkdocs.yml's link validation: a link to a page
  or an anchor that does not exist, a page left out of the navigation, or any other warning fails
  it (and a deliberately broken copy of the docs shows that it does).
- README.md stays a front page (250 lines at most), and its links lead to files and anchors that
  exist.
- The settings reference (docs/configuration.md) lists every setting of specdec/config.py with its
  flag, its variable and its default, and every other ``SPECDEC_*`` variable specdec reads.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from specdec import config

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 250
BUILD_TIMEOUT_S = 300

HAVE_MKDOCS = importlib.util.find_spec("mkdocs") is not None and importlib.util.find_spec("material") is not None
needs_mkdocs = pytest.mark.skipif(
    not HAVE_MKDOCS, reason="mkdocs and mkdocs-material are not installed (pip install 'mkdocs-material>=9.5')")


def mkdocs_build(config_file: Path, site_dir: Path) -> subprocess.CompletedProcess:
    # NO_MKDOCS_2_WARNING: Material's notice about MkDocs 2 on stderr, which is no build warning.
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config_file),
         "--site-dir", str(site_dir)],
        cwd=config_file.parent, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)


def warnings_in(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once, strictly, from the repository's mkdocs.yml and docs/."""
    site_dir = tmp_path_factory.mktemp("site")
    done = mkdocs_build(ROOT / "mkdocs.yml", site_dir)
    assert done.returncode == 0 and not warnings_in(done), done.stdout + done.stderr
    return site_dir


def page_html(site_dir: Path, page: str) -> str:
    """The built HTML of docs/<page> (use_directory_urls: docs/x.md is x/index.html)."""
    stem = page.removesuffix(".md")
    return (site_dir / ("index.html" if stem == "index" else f"{stem}/index.html")).read_text()


# --------------------------------------------------------------------------- the site


@needs_mkdocs
def test_site_builds_strict_without_warnings(site):
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert "index.md" in pages
    for page in pages:
        assert "<h1" in page_html(site, page), page
    for image in (ROOT / "docs").glob("*.png"):
        assert (site / image.name).is_file(), f"{image.name} is not in the built site"


@needs_mkdocs
def test_strict_build_fails_on_broken_links(tmp_path):
    """The validation settings of mkdocs.yml really fail the build: a missing page, a missing anchor
    and a page left out of the navigation each give a warning, and strict mode makes it an error."""
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    with open(tmp_path / "docs" / "index.md", "a") as page:
        page.write("\n[gone](no-such-page.md) and [lost](architecture.md#no-such-anchor)\n")
    (tmp_path / "docs" / "orphan.md").write_text("# Orphan\n")
    done = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert len(warnings_in(done)) >= 3, output
    for what in ("no-such-page.md", "no-such-anchor", "orphan.md"):
        assert what in output, (what, output)


# --------------------------------------------------------------------------- the README


def readme_links() -> list[str]:
    text = re.sub(r"```.*?```", "", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", target)]


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it to {README_MAX_LINES} and move the rest to docs/")
    text = "\n".join(lines)
    for command in ("make demo", "make test"):
        assert command in text


def test_readme_links_lead_to_files():
    links = readme_links()
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        path = link.partition("#")[0]
        assert path, f"README.md links to {link!r}: an anchor of the README itself, which the docs site does not carry"
        assert (ROOT / path).exists(), f"README.md links to {link}, which does not exist"


@needs_mkdocs
def test_readme_links_lead_to_anchors_of_the_site(site):
    for link in readme_links():
        path, _, anchor = link.partition("#")
        if anchor and path.startswith("docs/") and path.endswith(".md"):
            assert f'id="{anchor}"' in page_html(site, path.removeprefix("docs/")), f"README.md: no anchor for {link}"


# --------------------------------------------------------------------------- the settings reference

# docs/configuration.md: each "### " table and the settings class whose defaults it shows.
SECTIONS = {
    "Every service": config.ServerSettings,
    "Draft and verify services": config.ModelServiceSettings,
    "Verify service": config.VerifySettings,
    "Draft service": config.DraftSettings,
    "Speculation limits": config.SpeculationLimits,
    "Orchestrator": config.OrchestratorSettings,
    "Speculation defaults": config.SpeculationDefaults,
    "Front-door limits": config.DoorLimits,
    "TLS client and token": config.OrchestratorSettings,
    "specdec cluster up": config.ClusterSettings,
}


def shown(value) -> str:
    """A default as the reference writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        value = ",".join(value)
    return str(value) if value != "" else "''"


def expected_default(cls: type, name: str) -> str:
    if cls is config.ClusterSettings and name == "http_port":
        from specdec.tools import cli

        return shown(cli.CLUSTER_HTTP_PORT)  # `specdec cluster up` serves HTTP by default
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return shown(f.default if f.default is not dataclasses.MISSING else f.default_factory())


def reference_rows() -> dict[str, list[list[str]]]:
    """The settings tables of docs/configuration.md: section title -> rows of cells."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    tables: dict[str, list[list[str]]] = {}
    section = None
    for line in text.splitlines():
        if line.startswith("### "):
            section = line[4:].strip()
        elif section and line.startswith("| `--"):
            tables.setdefault(section, []).append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return tables


def all_settings_classes() -> list[type]:
    return [value for value in vars(config).values() if isinstance(value, type) and dataclasses.is_dataclass(value)]


def test_every_setting_is_in_the_reference_with_its_default():
    tables = reference_rows()
    assert set(tables) == set(SECTIONS), "docs/configuration.md's settings tables and SECTIONS differ"
    listed: set[str] = set()
    for section, rows in tables.items():
        cls = SECTIONS[section]
        names = {f.name for f in dataclasses.fields(cls)}
        for cells in rows:
            flags = re.findall(r"`--([a-z0-9-]+)` \(`(SPECDEC_[A-Z0-9_]+)`\)", cells[0])
            assert len(flags) == 1, f"{section}: one setting per row, as `--flag` (`SPECDEC_FLAG`): {cells[0]}"
            flag, variable = flags[0]
            name = flag.replace("-", "_")
            assert name in names, f"{section}: {config.flag_name(name)} is no setting of {cls.__name__}"
            assert variable == config.env_name(name), f"{section}: {config.flag_name(name)} is set by {config.env_name(name)}"
            default = re.match(r"`([^`]*)`", cells[1])
            assert default and default.group(1) == expected_default(cls, name), (
                f"{section}: {config.flag_name(name)} defaults to {expected_default(cls, name)!r}, "
                f"not {cells[1]!r} (specdec/config.py)")
            listed.add(name)
    every = {f.name for cls in all_settings_classes() for f in dataclasses.fields(cls)}
    missing = sorted(config.flag_name(name) for name in every - listed)
    assert not missing, f"settings missing from docs/configuration.md: {missing}"


def test_every_other_variable_is_documented():
    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [name for name in config.OTHER_VARIABLES if f"`{name}`" not in text]
    assert not missing, f"variables missing from docs/configuration.md: {missing}"
