"""MkDocs hooks for the embplex site (named in mkdocs.yml).

* The API reference is read from the source by griffe, which finds a package by its
  folder name; embplex's package folder is ``core/``. ``build/api-source/embplex`` is made
  a link to it before anything else runs.
* Every page under ``docs/plugins/<kind>/`` joins the navigation under "Plugins", kind by
  kind, so a new plugin page needs no edit here (and strict mode still flags any other
  page left out of the navigation).
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("backbone", "attention", "pooling", "loss", "sampler", "index")


def on_startup(command, dirty):  # noqa: ARG001 - the signature mkdocs calls
    link = ROOT / "build" / "api-source" / "embplex"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        if link.exists():
            raise SystemExit(f"{link} exists and is not a link to core/; remove it")
        os.symlink(ROOT / "core", link, target_is_directory=True)


def on_config(config):
    docs = Path(config["docs_dir"])
    sections = []
    for kind in KINDS:
        pages = sorted((docs / "plugins" / kind).glob("*.md"))
        if pages:
            sections.append({kind: [{page.stem: page.relative_to(docs).as_posix()} for page in pages]})
    names = [next(iter(entry)) for entry in config["nav"]]
    config["nav"].insert(names.index("API reference"), {"Plugins": sections})
    return config
