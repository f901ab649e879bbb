"""The documentation is kept honest by tests, not by good intentions.

* ``docs/hooks.md`` shows every hook spec with its exact signature and docstring, and no
  hook that does not exist.
* Every built-in component has a config file and a docs page under the one name it is
  registered with; every config file names a registered plugin; every docs page lists
  the plugin's options and shows it on the command line and in Python.
* Every plugin module's docstring names its paper (an arXiv id) or says it is a baseline.
* Relative links in the docs point at files that exist, and the index links every page.
"""

from __future__ import annotations

import ast
import shutil
import inspect
import re
from pathlib import Path

import pytest

import embplex
from embplex import hookspecs
from embplex.registry import KINDS

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
CONF = REPO / "conf"
PLUGINS = REPO / "plugins"

HOOKSPECS = sorted(
    (name for name, value in vars(hookspecs).items() if callable(value) and hasattr(value, "embplex_spec")),
    key=list(vars(hookspecs)).index,
)
BUILTINS = sorted(
    (info.kind, info.name)
    for info in embplex.load_registry()
    if info.distribution is not None and info.distribution.name == "embplex"
)
CONFIG_FILES = sorted((path.parent.name, path.stem) for kind in KINDS for path in (CONF / kind).glob("*.yaml"))
PLUGIN_MODULES = sorted(
    (path.parent.name, path.stem)
    for kind in KINDS
    for path in (PLUGINS / kind).glob("*.py")
    if path.stem != "__init__"
)
PLUGIN_PAGES = sorted((path.parent.name, path.stem) for path in (DOCS / "plugins").glob("*/*.md"))
ARXIV_ID = re.compile(r"arXiv:\s*\d{4}\.\d{4,5}")


def _ids(pair: tuple[str, str]) -> str:
    return "/".join(pair)


def _squash(text: str) -> str:
    return " ".join(text.split())


def signature_text(function) -> str:
    """``name(param: Type) -> Return`` as written in the source, without the string quotes
    that ``from __future__ import annotations`` leaves around each annotation."""

    def clean(annotation) -> str:
        return str(annotation).strip("'\"")

    parameters = []
    for p in inspect.signature(function).parameters.values():
        text = p.name if p.annotation is p.empty else f"{p.name}: {clean(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {p.default!r}"
        parameters.append(text)
    returns = inspect.signature(function).return_annotation
    arrow = "" if returns is inspect.Signature.empty else f" -> {clean(returns)}"
    return f"{function.__name__}({', '.join(parameters)}){arrow}"


# ---------------------------------------------------------------------------
# Hooks reference
# ---------------------------------------------------------------------------


def test_there_are_hookspecs():
    assert "register_poolings" in HOOKSPECS and "register_config_paths" in HOOKSPECS


@pytest.mark.parametrize("hook", HOOKSPECS)
def test_hooks_reference_shows_exact_signature_and_docstring(hook):
    reference = (DOCS / "hooks.md").read_text()
    function = getattr(hookspecs, hook)
    assert signature_text(function) in reference, f"docs/hooks.md lacks `{signature_text(function)}`"
    docstring = inspect.getdoc(function)
    assert docstring, f"hookspec {hook} has no docstring"
    assert _squash(docstring) in _squash(reference), f"docs/hooks.md lacks the docstring of {hook}"


def test_hooks_reference_documents_no_hook_that_does_not_exist():
    reference = (DOCS / "hooks.md").read_text()
    documented = set(re.findall(r"def (register_\w+)\(", reference))
    assert documented == set(HOOKSPECS)


# ---------------------------------------------------------------------------
# One name everywhere: registry, config file, docs page
# ---------------------------------------------------------------------------


def test_builtins_are_registered():
    assert ("backbone", "hf_encoder") in BUILTINS and ("pooling", "mean") in BUILTINS


@pytest.mark.parametrize("component", BUILTINS, ids=_ids)
def test_builtin_has_config_file(component):
    kind, name = component
    assert (CONF / kind / f"{name}.yaml").is_file(), f"add conf/{kind}/{name}.yaml"


@pytest.mark.parametrize("component", BUILTINS, ids=_ids)
def test_builtin_has_docs_page(component):
    kind, name = component
    assert (DOCS / "plugins" / kind / f"{name}.md").is_file(), f"add docs/plugins/{kind}/{name}.md"


@pytest.mark.parametrize("config", CONFIG_FILES, ids=_ids)
def test_config_file_names_a_registered_plugin(config, registry):
    kind, name = config
    assert name in registry.names(kind), f"conf/{kind}/{name}.yaml names no registered {kind}"


@pytest.mark.parametrize("page", PLUGIN_PAGES, ids=_ids)
def test_docs_page_names_a_registered_plugin(page, registry):
    kind, name = page
    assert kind in KINDS, f"docs/plugins/{kind}/ is not a component kind"
    assert name in registry.names(kind), f"docs/plugins/{kind}/{name}.md documents no registered {kind}"


@pytest.mark.parametrize("page", PLUGIN_PAGES, ids=_ids)
def test_docs_page_covers_paper_options_and_examples(page, registry):
    kind, name = page
    text = (DOCS / "plugins" / kind / f"{name}.md").read_text()
    assert text.startswith("# "), "the page starts with a title"
    assert ARXIV_ID.search(text) or "baseline" in text.lower(), "name the paper (arXiv id) or say baseline"
    undocumented = [o for o in registry.get(kind, name).option_names() if f"`{o}`" not in text]
    assert undocumented == [], f"options missing from the options table: {undocumented}"
    assert f"{kind}={name}" in text, f"show it on the command line: embplex ... {kind}={name}"
    assert "```python" in text, "show it in Python"


# ---------------------------------------------------------------------------
# Plugin module docstrings
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("module", PLUGIN_MODULES, ids=_ids)
def test_plugin_docstring_names_its_paper_or_says_baseline(module):
    kind, name = module
    docstring = ast.get_docstring(ast.parse((PLUGINS / kind / f"{name}.py").read_text())) or ""
    assert docstring, f"plugins/{kind}/{name}.py has no module docstring"
    assert ARXIV_ID.search(docstring) or "baseline" in docstring.lower(), (
        f"plugins/{kind}/{name}.py: name the paper (title, year, arXiv id) or say it is a baseline"
    )


# ---------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)  # code is not links
    return [
        target.split("#")[0]
        for target in LINK.findall(text)
        if not re.match(r"[a-z]+:", target) and not target.startswith("#")
    ]


@pytest.mark.parametrize(
    "page", sorted([*DOCS.rglob("*.md"), REPO / "README.md"]), ids=lambda p: p.relative_to(REPO).as_posix()
)
def test_relative_links_resolve(page):
    broken = [t for t in _relative_links(page) if t and not (page.parent / t).exists()]
    assert broken == [], f"{page.relative_to(REPO)} links to missing files: {broken}"


def test_index_links_every_page():
    linked = {(DOCS / target).resolve() for target in _relative_links(DOCS / "index.md")}
    pages = {p.resolve() for p in DOCS.rglob("*.md") if p.name != "index.md" and "examples" not in p.parts}
    missing = sorted(p.relative_to(DOCS).as_posix() for p in pages - linked)
    assert missing == [], f"docs/index.md does not link: {missing}"


# ---------------------------------------------------------------------------
# The configuration table of getting-started.md is generated from the config
# ---------------------------------------------------------------------------


def _config_table_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_table", DOCS / "config_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _documented_keys() -> list[str]:
    text = (DOCS / "getting-started.md").read_text()
    table = text.split("<!-- config-table:start -->")[1].split("<!-- config-table:end -->")[0]
    return re.findall(r"^\| `([\w.]+)` \|", table, flags=re.MULTILINE)


def test_config_table_is_up_to_date():
    generator = _config_table_module()
    page = (DOCS / "getting-started.md").read_text()
    assert generator.updated(page, generator.render()) == page, "run `python docs/config_table.py`"


def test_config_table_lists_every_key_of_the_default_config_and_no_other():
    from embplex.config import compose_config

    groups = [group for group, _ in _config_table_module().default_groups()]
    config = compose_config([])

    def leaves(node, prefix=""):
        if isinstance(node, dict) and node:
            return [leaf for key, value in node.items() for leaf in leaves(value, f"{prefix}{key}.")]
        return [prefix.rstrip(".")]

    expected = groups + leaves({k: v for k, v in config.items() if k not in groups})
    assert set(groups) >= {"backbone", "pooling", "data"}
    assert _documented_keys() == expected


def test_every_training_setting_is_a_config_key():
    import dataclasses

    from embplex.config import compose_config
    from embplex.training import TrainSettings

    settings = {f.name for f in dataclasses.fields(TrainSettings)} - {"seed"}  # seed is top-level
    assert settings == set(compose_config([])["train"])


def test_config_table_generator_refuses_an_undocumented_key(tmp_path, monkeypatch):
    generator = _config_table_module()
    conf = tmp_path / "embplex.yaml"
    conf.write_text(generator.primary_config().read_text() + "\nextra_section:\n  no_comment_here: 1\n")
    monkeypatch.setattr(generator, "primary_config", lambda: conf)
    monkeypatch.setattr(
        "embplex.config.compose_config", lambda overrides: {"seed": 1, "extra_section": {"no_comment_here": 1}}
    )
    with pytest.raises(SystemExit, match="extra_section.no_comment_here"):
        generator.rows()


# ---------------------------------------------------------------------------
# The site: mkdocs build --strict (mkdocs is in the test extra: no skip when missing)
# ---------------------------------------------------------------------------


def _build_site(config: Path, site: Path):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def test_site_builds_in_strict_mode_with_the_api_reference(tmp_path):
    import mkdocs  # a missing docs extra is a failure, not a skip

    assert mkdocs.__version__

    built = _build_site(REPO / "mkdocs.yml", tmp_path / "site")
    assert built.returncode == 0, built.stdout + built.stderr
    components = (tmp_path / "site" / "api" / "components" / "index.html").read_text()
    assert "negatives_per_anchor" in components, "the API reference is generated from the docstrings"
    testing = (tmp_path / "site" / "api" / "testing" / "index.html").read_text()
    assert "IndexContract" in testing
    for page in DOCS.rglob("*.md"):  # every page is part of the site
        if "examples" in page.parts and page.name != "README.md":
            continue
        relative = page.relative_to(DOCS).with_suffix("")
        html = relative.parent / "index.html" if relative.name in ("index", "README") else relative / "index.html"
        assert (tmp_path / "site" / html).is_file(), f"{page.relative_to(REPO)} was not built"


def test_strict_build_fails_on_a_broken_link_and_a_page_left_out(tmp_path):
    shutil.copytree(DOCS, tmp_path / "docs", ignore=shutil.ignore_patterns("*.png"))
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    (tmp_path / "core").symlink_to(REPO / "core")
    with (tmp_path / "docs" / "concepts.md").open("a") as page:
        page.write("\nSee [the missing page](no-such-page.md).\n")
    (tmp_path / "docs" / "orphan.md").write_text("# Nobody links or lists me\n")
    built = _build_site(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert built.returncode != 0
    assert "no-such-page.md" in built.stderr and "orphan.md" in built.stderr, built.stderr


# ---------------------------------------------------------------------------
# Claims docs/writing-plugins.md makes about config folders
# ---------------------------------------------------------------------------


def test_a_disabled_plugins_config_folder_disappears_with_it(monkeypatch):
    from importlib.metadata import EntryPoint
    from importlib.metadata import entry_points as installed_entry_points

    from embplex.config import ConfigError, compose_config, group_options

    monkeypatch.syspath_prepend(str(DOCS / "examples" / "embplex-example-plugin" / "src"))
    # the installed plugins (a composed config is checked against them) plus the example
    entry_points = [*installed_entry_points(group="embplex"), EntryPoint("pooling.example_first_token", "embplex_example_plugin", "embplex")]
    loaded = embplex.load_registry(entry_points=entry_points)
    assert "example_first_token" in group_options("pooling", loaded)
    assert compose_config(["pooling=example_first_token"], registry=loaded)["pooling"]["name"] == "example_first_token"

    monkeypatch.setenv("EMBPLEX_DISABLE_PLUGINS", "pooling.example_first_token")
    disabled = embplex.load_registry(entry_points=entry_points)
    assert disabled.config_paths == [] and "example_first_token" not in group_options("pooling", disabled)
    with pytest.raises(ConfigError, match="No pooling plugin named 'example_first_token'"):
        compose_config(["pooling=example_first_token"], registry=disabled)


def test_concepts_catalog_table_says_what_is_installed():
    text = (DOCS / "concepts.md").read_text()
    table = text.split("<!-- catalog:start -->")[1].split("<!-- catalog:end -->")[0]
    rows = {
        cells[0]: (re.findall(r"`(\w+)`", cells[1]), re.findall(r"`(\w+)`", cells[2]))
        for line in table.strip().splitlines()[2:]
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert list(rows) == list(KINDS)
    for kind, (installed, planned) in rows.items():
        builtin = sorted(name for k, name in BUILTINS if k == kind)
        assert installed == builtin, f"concepts.md: installed {kind} plugins are {builtin}"
        shipped = set(planned) & set(builtin)
        assert not shipped, f"concepts.md lists {sorted(shipped)} as planned but they are installed"
