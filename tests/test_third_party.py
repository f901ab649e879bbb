"""A third-party plugin package, installed for real, is a first-class citizen.

``docs/examples/embplex-example-plugin`` is built and installed with pip into a temporary
folder (no network, no build isolation), then a fresh interpreter with that folder on
``PYTHONPATH`` must find it everywhere a built-in plugin is found: the registry (with its
distribution recorded), the Hydra config groups, a model on the real MiniLM, a saved
model's metadata and ``embplex plugins``. Nothing in embplex names the package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "embplex-example-plugin"
DISTRIBUTION = "embplex-example-plugin"
POOLING = "example_first_token"

# Runs in the fresh interpreter; prints one JSON object on its last line.
PROBE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    import embplex
    from embplex.config import compose_config, group_options

    minilm, scratch = sys.argv[1], sys.argv[2]
    registry = embplex.load_registry()
    info = registry.get("pooling", "example_first_token")
    report = {
        "plugin": info.plugin,
        "distribution": [info.distribution.name, info.distribution.version],
        "options": info.option_names(),
        "config_paths": registry.config_paths,
        "failed": [f.name for f in registry.failed],
        "pooling_options": group_options("pooling"),
        "composed": compose_config(["pooling=example_first_token"])["pooling"],
        "composed_override": compose_config(
            ["pooling=example_first_token", "pooling.exclude_instruction=false"]
        )["pooling"],
    }

    texts = ["A man is playing a guitar.", "Embeddings map text to vectors of numbers."]
    model = embplex.compose(
        {"name": "hf_encoder", "path": minilm}, pooling="example_first_token", normalize=False
    )
    ours = model.encode(texts, convert_to="torch")
    from transformers import AutoModel, AutoTokenizer
    tokenizer, network = AutoTokenizer.from_pretrained(minilm), AutoModel.from_pretrained(minilm).eval()
    with torch.inference_mode():
        reference = network(**tokenizer(texts, padding=True, return_tensors="pt")).last_hidden_state[:, 0]
    report["max_abs_diff_to_first_token"] = float((ours - reference).abs().max())
    report["width"] = list(ours.shape)

    model.save(scratch)
    saved = json.load(open(f"{scratch}/embplex.json"))["components"]["pooling"]
    report["saved_spec"] = {k: saved.get(k) for k in ("name", "distribution", "version")}
    reloaded = embplex.load(scratch).encode(texts, normalize=False, convert_to="torch")
    report["reload_max_abs_diff"] = float((reloaded - ours).abs().max())
    print(json.dumps(report))
    """
)


def _environment(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EMBPLEX_PLUGINS", "EMBPLEX_DISABLE_PLUGINS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_VERBOSITY"] = "error"
    return env


def _run(command: list[str], env: dict[str, str], cwd: Path, timeout: int = 300) -> str:
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory) -> dict[str, Path]:
    """The example package built from a copy of its source (so the build leaves nothing in
    the repository) and installed into its own folder."""
    root = tmp_path_factory.mktemp("third_party")
    source, site = root / "source", root / "site"
    shutil.copytree(
        EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache")
    )
    _run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(site), str(source)],
        env=_environment(site), cwd=root,
    )
    return {"root": root, "source": source, "site": site}


@pytest.fixture(scope="module")
def probe(installed_example, minilm_path) -> dict:
    root, site = installed_example["root"], installed_example["site"]
    script = root / "probe.py"
    script.write_text(PROBE)
    stdout = _run([sys.executable, str(script), minilm_path, str(root / "saved")], _environment(site), cwd=root)
    return json.loads(stdout.strip().splitlines()[-1])


def test_install_ships_module_entry_point_and_config(installed_example):
    site = installed_example["site"]
    dist_info = next(site.glob("embplex_example_plugin-*.dist-info"))
    assert (site / "embplex_example_plugin" / "conf" / "pooling" / f"{POOLING}.yaml").is_file()
    entry_points = (dist_info / "entry_points.txt").read_text()
    assert "[embplex]" in entry_points
    assert f"pooling.{POOLING} = embplex_example_plugin" in entry_points


def test_registry_attributes_the_pooling_to_the_example_distribution(probe):
    assert probe["failed"] == []
    assert probe["plugin"] == f"pooling.{POOLING}"
    assert probe["distribution"] == [DISTRIBUTION, "0.1.0"]
    assert probe["options"] == ["exclude_instruction"]
    assert probe["config_paths"] == ["pkg://embplex_example_plugin.conf"]


def test_config_folder_becomes_a_pooling_option(probe):
    assert POOLING in probe["pooling_options"]
    assert "mean" in probe["pooling_options"], "a plugin's folder must add to embplex.conf, not replace it"
    assert probe["composed"] == {"name": POOLING, "exclude_instruction": True}
    assert probe["composed_override"] == {"name": POOLING, "exclude_instruction": False}


def test_model_on_minilm_pools_the_first_token(probe):
    # MiniLM's first token is [CLS]: the example must return exactly its final state.
    assert probe["width"] == [2, 384]
    assert probe["max_abs_diff_to_first_token"] < 1e-5


def test_saved_model_names_the_distribution_to_install_and_reloads(probe):
    assert probe["saved_spec"] == {"name": POOLING, "distribution": DISTRIBUTION, "version": "0.1.0"}
    assert probe["reload_max_abs_diff"] < 1e-6


def test_cli_lists_the_plugin(installed_example):
    site = installed_example["site"]
    script = Path(sys.executable).with_name("embplex")  # the console script pip installed
    assert script.is_file(), f"no embplex command next to {sys.executable}; run pip install -e ."
    listing = json.loads(_run([str(script), "plugins", "--json"], _environment(site), cwd=installed_example["root"]))
    rows = {(row["kind"], row["name"]): row for row in listing["components"]}
    assert rows[("pooling", POOLING)]["distribution"] == DISTRIBUTION
    assert rows[("pooling", POOLING)]["version"] == "0.1.0"
    assert rows[("pooling", POOLING)]["plugin"] == f"pooling.{POOLING}"
    assert ("pooling", "mean") in rows
    assert listing["failed"] == []


def test_example_package_own_tests_pass(installed_example):
    """The tests that docs/writing-plugins.md tells plugin authors to write."""
    output = _run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        _environment(installed_example["site"]),
        cwd=installed_example["source"],
    )
    assert " passed" in output and "failed" not in output
