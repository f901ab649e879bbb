"""The command line: every command takes Hydra overrides; errors exit 2 with a message."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import embplex
from embplex.cli import main


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_plugins_lists_every_registered_component_with_its_origin(capsys, registry):
    code, out, _ = run(capsys, "plugins", "--json")
    assert code == 0
    listed = json.loads(out)["components"]
    assert {(c["kind"], c["name"]) for c in listed} == {(i.kind, i.name) for i in registry}
    mean = next(c for c in listed if c["name"] == "mean")
    assert mean["distribution"] == "embplex" and mean["version"] == embplex.__version__
    assert mean["plugin"] == "pooling.mean" and "arXiv" in mean["paper"]


def test_plugins_filters_by_kind_and_prints_requirements(capsys):
    code, out, _ = run(capsys, "plugins", "--kind", "pooling")
    assert code == 0
    rows = out.splitlines()[2:]
    assert rows and all(row.startswith("pooling") for row in rows)
    code, out, _ = run(capsys, "plugins", "--requirements")
    assert out.strip().splitlines() == [f"embplex=={embplex.__version__}"]


def test_config_applies_overrides(capsys):
    code, out, _ = run(capsys, "config", "pooling=cls", "train.lr=0.001")
    assert code == 0
    cfg = json.loads(out)
    assert cfg["pooling"]["name"] == "cls" and cfg["train"]["lr"] == 0.001


@pytest.mark.parametrize(
    "args, message",
    [
        (("eval", "pooling=meen"), "Available pooling options: .*mean"),
        (("eval", "train.lrr=1"), "Could not override 'train.lrr'"),
        (("eval", "+pooling._target_=os.system"), "never imports code named in a config"),
        (("eval", "pooling.exclude_instructon=false"), "exclude_instructon"),
    ],
)
def test_bad_overrides_exit_2_with_a_clear_message(capsys, args, message):
    code, out, err = run(capsys, *args)
    assert code == 2
    assert pytest.importorskip("re").search(message, err), err


def test_unknown_command_lists_the_commands(capsys):
    code, _, err = run(capsys, "serve")
    assert code == 2 and "train, eval, encode, index" in err


def test_encode_writes_one_row_per_input_line(capsys, tmp_path, tiny_bert_path):
    source = tmp_path / "texts.txt"
    source.write_text("first text\nsecond text\n\nthird\n")
    code, out, err = run(
        capsys, "encode", f"backbone.path={tiny_bert_path}", f"encode.input={source}", f"output_dir={tmp_path}"
    )
    assert code == 0, err
    vectors = np.load(tmp_path / "embeddings.npy")
    assert vectors.shape == (3, 32)
    model = embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, pooling="mean")
    np.testing.assert_allclose(vectors, model.encode(["first text", "second text", "third"]), atol=1e-5)


def test_encode_missing_input_file_is_a_clear_error(capsys, tmp_path, tiny_bert_path):
    code, _, err = run(capsys, "encode", f"backbone.path={tiny_bert_path}", f"encode.input={tmp_path / 'nope.txt'}")
    assert code == 2 and "does not exist" in err


def test_train_then_eval_a_tiny_model_end_to_end(capsys, tmp_path, tiny_bert_path, data_dir):
    common = [f"backbone.path={tiny_bert_path}", f"output_dir={tmp_path}", f"data.root={data_dir}"]
    code, out, err = run(
        capsys, "train", *common, "data=stsb", "data.train.limit=64", "train.batch_size=16", "train.max_steps=3"
    )
    assert code == 0, err
    assert (tmp_path / "model" / "embplex.json").exists()
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) >= 4  # header + 3 steps
    code, out, err = run(
        capsys, "eval", f"model.load={tmp_path / 'model'}", f"output_dir={tmp_path}",
        f"data.root={data_dir}", "data=stsb", "eval.bootstrap=50",
    )
    assert code == 0, err
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    low, high = results["spearman_ci"]
    assert low <= results["spearman"] <= high
    assert "spearman" in out


def test_console_script_is_installed():
    completed = subprocess.run(
        [sys.executable, "-m", "embplex.cli", "plugins", "--kind", "backbone"],
        capture_output=True, text=True, check=True,
    )
    assert "hf_encoder" in completed.stdout


def test_train_ctrl_c_then_resume_then_rerun_a_finished_run(capsys, tmp_path, tiny_bert_path, data_dir, monkeypatch):
    import embplex.training as training

    args = [
        "train", f"backbone.path={tiny_bert_path}", f"output_dir={tmp_path}", f"data.root={data_dir}", "data=stsb",
        "data.train.limit=12", "train.batch_size=4", "train.max_steps=3", "train.checkpoint_every=1",
    ]
    calls = []

    def interrupted_at_the_third_batch(backbone, examples):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return training.make_training_batch.__wrapped__(backbone, examples)

    interrupted_at_the_third_batch.__wrapped__ = training.make_training_batch
    monkeypatch.setattr(training, "make_training_batch", interrupted_at_the_third_batch)
    code, out, err = run(capsys, *args)
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (  # one line after the progress bars
        f"embplex train: training interrupted after step 2 of 3; the last checkpoint is "
        f"{tmp_path / 'checkpoints' / 'step-2'}; to resume, run: embplex {' '.join(args)}"
    )
    monkeypatch.undo()
    code, out, err = run(capsys, *args)
    assert code == 0 and out.startswith("trained 3 steps"), err
    code, out, err = run(capsys, *args)  # crashed with a TypeError on None.__format__
    assert code == 0, err
    assert f"the run in {tmp_path} is already complete (3 steps)" in out


def test_the_resume_command_switches_resuming_back_on():
    from embplex.cli import _resume_command

    assert _resume_command("train", ["train.resume=false", "data=stsb", "+note=a b"]) == (
        "embplex train data=stsb '+note=a b' train.resume=true"
    )
    assert _resume_command("train", ["data=stsb"]) == "embplex train data=stsb"
