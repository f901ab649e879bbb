"""Write the table of configuration keys in docs/getting-started.md from the config itself.

    python docs/config_table.py           # rewrite the table between the markers
    python docs/config_table.py --check   # exit 1, saying so, when the page is out of date

Rows come from the composed default configuration (no overrides): one row per config
group of the defaults list (``pooling``, ``data``, ...) and one per leaf key of every
other section. The default is the composed value. The meaning is the key's comment in
``conf/embplex.yaml`` (at the end of its line, or on the lines just above it); a
``train.*`` key without one takes its ``TrainSettings`` docstring. A key with neither is
an error, so a new key cannot reach the docs undocumented. ``tests/test_docs.py`` checks
that the page is up to date.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
PAGE = DOCS / "getting-started.md"
START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"

# What each config group chooses; the choices themselves are the installed config files.
GROUPS = {
    "backbone": "the model that turns tokens into hidden states; its options follow as `backbone.<option>=...`",
    "attention": "an attention policy applied inside every layer, or a list applied in order (`attention=[lambda_mask,temp_scale]`, options `attention.<name>.<option>`); `null` keeps the backbone's own attention",
    "pooling": "hidden states to one vector per text; `pooling.<option>=...`",
    "loss": "what training optimises; `loss.<option>=...`",
    "sampler": "which examples share a batch; `sampler.<option>=...`",
    "index": "the index `eval` (retrieval), `embplex index` and mining samplers build; `index.<option>=...`",
    "data": "what `train` trains on (`data.train`) and `eval` evaluates on (`data.eval`); `data.train.limit=N` keeps N examples",
    "experiment": "a recipe from `conf/experiment/` holding only its changes from the defaults (e.g. `quickstart`)",
}


def _yaml_comments(text: str) -> dict[str, str]:
    """Dotted key -> its comment, from a YAML file of nested mappings."""
    comments: dict[str, str] = {}
    path: list[tuple[int, str]] = []
    above: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            above = []
            continue
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"^(\s*)([A-Za-z_][\w-]*)\s*:(.*)$", line)
        if not match:
            above = []
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3)
        while path and path[-1][0] >= indent:
            path.pop()
        path.append((indent, key))
        inline = rest.split(" #", 1)[1].strip() if " #" in rest else ""
        comment = inline or " ".join(above)
        if comment:
            comments[".".join(k for _, k in path)] = comment
        above = []
    return comments


def _train_settings_docs() -> dict[str, str]:
    from embplex.training import TrainSettings

    docs = inspect.getdoc(TrainSettings) or ""
    found = re.findall(r":param (\w+):(.*?)(?=\n:param |\Z)", docs, flags=re.DOTALL)
    # reST ``literals`` become Markdown `code`
    return {f"train.{name}": " ".join(text.split()).replace("``", "`") for name, text in found}


def _leaves(node: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(node, dict) and node:
        return [leaf for key, value in node.items() for leaf in _leaves(value, f"{prefix}.{key}" if prefix else key)]
    return [(prefix, node)]


def _shown(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def primary_config() -> Path:
    """The primary config file, ``embplex.yaml`` in the installed ``embplex.conf``."""
    import importlib

    from embplex.config import CONFIG_MODULE, PRIMARY_CONFIG

    return Path(importlib.import_module(CONFIG_MODULE).__file__).parent / f"{PRIMARY_CONFIG}.yaml"


def default_groups() -> list[tuple[str, str | None]]:
    """``(group, default choice)`` for each config group in the primary config's defaults list."""
    from omegaconf import OmegaConf

    defaults = OmegaConf.to_container(OmegaConf.load(primary_config())).get("defaults", [])
    groups = []
    for entry in defaults:
        if isinstance(entry, dict):
            ((group, choice),) = entry.items()
            if not group.startswith(("override ", "hydra")) and "/" not in group:
                groups.append((group.removeprefix("optional "), choice))
    return groups


def rows() -> list[tuple[str, str, str]]:
    """``(key, default, meaning)`` for every row of the table, in the config's order."""
    from embplex.config import compose_config

    primary = primary_config()
    comments = {**_train_settings_docs(), **_yaml_comments(primary.read_text())}
    groups = default_groups()
    table = []
    for group, choice in groups:
        if group not in GROUPS:
            raise SystemExit(f"config group '{group}' has no description: add it to GROUPS in {Path(__file__).name}")
        table.append((group, _shown(choice) if choice is not None else "none", GROUPS[group]))
    config = compose_config([])
    grouped = {group for group, _ in groups}
    undocumented = []
    for key, value in _leaves({k: v for k, v in config.items() if k not in grouped}, ""):
        if key not in comments:
            undocumented.append(key)
        table.append((key, _shown(value), comments.get(key, "")))
    if undocumented:
        raise SystemExit(
            f"configuration keys without a comment in {primary.name}: {', '.join(undocumented)}; "
            "write what each one does at the end of its line."
        )
    return table


def render() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, meaning in rows():
        lines.append(f"| `{key}` | {default} | {meaning.replace('|', '&#124;')} |")
    return "\n".join(lines)


def updated(page: str, table: str) -> str:
    """``page`` with the text between the markers replaced by ``table``."""
    if page.count(START) != 1 or page.count(END) != 1:
        raise SystemExit(f"{PAGE.name} must contain {START} and {END} once each")
    head, rest = page.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the page is up to date")
    args = parser.parse_args(argv)
    page = PAGE.read_text(encoding="utf-8")
    new = updated(page, render())
    if args.check:
        if new != page:
            print(f"{PAGE} is out of date: run `python docs/config_table.py`", file=sys.stderr)
            return 1
        return 0
    if new != page:
        PAGE.write_text(new, encoding="utf-8")
        print(f"updated the configuration table in {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
