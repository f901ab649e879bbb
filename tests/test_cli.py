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
        (("eval", "+hydra.callbacks.x._target_=os.system"), "sets hydra.callbacks.x._target_: embplex never imports"),
        (("eval", "+hydra.callbacks.x={_target_:os.system}"), "sets hydra.callbacks.x .a value naming _target_"),
        (("eval", "pooling.exclude_instructon=false"), "exclude_instructon"),
        # Refused at composition, before a model is built or data is read.
        (("train", "data.root=/nowhere", "+encode.promt=query:"), r"Unknown key encode\.promt: .* Did you mean 'prompt'\?"),
        (("train", "data.root=/nowhere", "+foo=bar"), r"Unknown key foo"),
        (("train", "data.root=/nowhere", "model.normalize=no"), r"model\.normalize='no' is text, .* true or false"),
        (("train", "data.root=/nowhere", "pooling.exclude_instruction=maybe"), r"pooling\.exclude_instruction='maybe'"),
    ],
)
def test_bad_overrides_exit_2_with_a_clear_message(capsys, args, message):
    code, out, err = run(capsys, *args)
    assert code == 2
    assert pytest.importorskip("re").search(message, err), err


def test_unknown_command_lists_the_commands(capsys):
    code, _, err = run(capsys, "srve")
    assert code == 2 and "unknown command 'srve'" in err and "train, eval, encode, index" in err and "serve" in err


def test_encode_writes_one_row_per_input_line(capsys, tmp_path, tiny_bert_path):
    source = tmp_path / "texts.txt"
    source.write_text("first text\nsecond text\nthird\n")
    code, out, err = run(
        capsys, "encode", f"backbone.path={tiny_bert_path}", f"encode.input={source}", f"output_dir={tmp_path}"
    )
    assert code == 0, err
    vectors = np.load(tmp_path / "embeddings.npy")
    assert vectors.shape == (3, 32)
    assert (tmp_path / "embeddings.ids.txt").read_text().split() == ["1", "2", "3"]  # row i <- input line
    model = embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, pooling="mean")
    np.testing.assert_allclose(vectors, model.encode(["first text", "second text", "third"]), atol=1e-5)


def test_encode_missing_input_file_is_a_clear_error(capsys, tmp_path, tiny_bert_path):
    code, _, err = run(
        capsys, "encode", f"backbone.path={tiny_bert_path}", f"encode.input={tmp_path / 'nope.txt'}", f"output_dir={tmp_path}"
    )
    assert code == 2 and "does not exist" in err


def test_train_then_eval_a_tiny_model_end_to_end(capsys, tmp_path, tiny_bert_path, data_dir):
    common = [f"backbone.path={tiny_bert_path}", f"output_dir={tmp_path}", f"data.root={data_dir}"]
    code, out, err = run(
        capsys, "train", *common, "data=stsb", "data.train.limit=64", "train.batch_size=16", "train.max_steps=3"
    )
    assert code == 0, err
    assert (tmp_path / "model" / "embplex.json").exists()
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) >= 4  # header + 3 steps
    # Hydra's record of the run sits beside embplex's results
    assert read_yaml(tmp_path / ".hydra" / "config.yaml")["train"]["max_steps"] == 3
    assert "train.max_steps=3" in read_yaml(tmp_path / ".hydra" / "overrides.yaml")
    assert read_yaml(tmp_path / ".hydra" / "hydra.yaml")["hydra"]["job"]["name"] == "train"
    # the run folder itself is a valid model.load: its saved model is found inside
    code, out, err = run(
        capsys, "eval", f"model.load={tmp_path}", f"output_dir={tmp_path}",
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


# ---------------------------------------------------------------------------
# A Hydra application: sweeps, run folders, --cfg / --info / --help, completion
# ---------------------------------------------------------------------------


class ConfigFolder:
    """An in-process plugin that registers a folder of config files, as a package would."""

    def __init__(self, folder):
        self.folder = folder

    @embplex.hookimpl
    def register_config_paths(self, register):
        register(f"file://{self.folder}")


@pytest.fixture
def third_party_probe(tmp_path, monkeypatch):
    """Every registry the CLI loads has a third-party config folder with pooling/probe.yaml."""
    import embplex.registry

    folder = tmp_path / "third-party-conf"
    (folder / "pooling").mkdir(parents=True)
    (folder / "pooling" / "probe.yaml").write_text("name: mean\nexclude_instruction: false\n")
    load = embplex.registry.load_registry
    monkeypatch.setattr(
        embplex.registry, "load_registry", lambda: load(extra_plugins=[("probe-configs", ConfigFolder(folder))])
    )
    return folder


@pytest.fixture
def texts(tmp_path):
    source = tmp_path / "texts.txt"
    source.write_text("first text\nsecond text\n")
    return source


def tiny_training(tiny_bert_path, data_dir, output_dir):
    """One optimizer step of 4 STS-B pairs: what a sweep test needs to run each job."""
    return [
        f"backbone.path={tiny_bert_path}", f"data.root={data_dir}", "data=stsb", "data.train.limit=8",
        "train.batch_size=4", "train.max_steps=1", "train.log_every=1", f"output_dir={output_dir}",
    ]


def read_yaml(path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_train_sweep_gives_each_job_a_run_folder_and_ends_with_a_summary(capsys, tmp_path, tiny_bert_path, data_dir):
    code, out, err = run(capsys, "train", "-m", "pooling=mean,cls", *tiny_training(tiny_bert_path, data_dir, tmp_path))

    assert code == 0, err
    for num, pooling in enumerate(["mean", "cls"]):
        job = tmp_path / str(num)
        assert f"-> {job}" in out, "every job says where it went"
        assert {p.name for p in (job / ".hydra").iterdir()} >= {"config.yaml", "overrides.yaml", "hydra.yaml"}
        assert read_yaml(job / ".hydra" / "config.yaml")["pooling"]["name"] == pooling
        assert f"pooling={pooling}" in read_yaml(job / ".hydra" / "overrides.yaml")
        saved = json.loads((job / "model" / "embplex.json").read_text())
        assert saved["components"]["pooling"]["name"] == pooling, "the job trained with its own config"
        assert (job / "metrics.csv").exists()
    summary = json.loads((tmp_path / "multirun_summary.json").read_text())
    assert [job["num"] for job in summary["jobs"]] == [0, 1] and summary["failed"] == []
    for job, pooling in zip(summary["jobs"], ["mean", "cls"]):
        assert job["status"] == "completed" and f"pooling={pooling}" in job["overrides"]
        assert job["metrics"]["steps"] == 1 and np.isfinite(job["metrics"]["loss"])
    table = out[out.index("job  status"):]
    assert "loss" in table.splitlines()[0]
    assert any(line.startswith("1 ") and "pooling=cls" in line for line in table.splitlines())


def test_a_failed_job_is_recorded_and_the_sweep_goes_on(capsys, tmp_path, tiny_bert_path, texts, third_party_probe):
    sweep = tmp_path / "sweep"
    common = [f"backbone.path={tiny_bert_path}", f"output_dir={sweep}"]
    # pooling=probe exists only in the third-party config folder: the search path holds in a sweep
    code, out, err = run(capsys, "encode", "-m", "pooling=probe", f"encode.input={texts},{tmp_path / 'missing.txt'}", *common)

    assert code == 1, "a sweep with a failed job exits 1"
    summary = json.loads((sweep / "multirun_summary.json").read_text())
    ok, failed = summary["jobs"]
    assert ok["status"] == "completed" and (sweep / "0" / "embeddings.npy").exists()
    assert failed["status"] == "failed" and "missing.txt does not exist" in failed["error"]
    assert summary["failed"] == [1]
    assert "job 1 failed" in err and "job 1 failed: InputError" in out
    assert read_yaml(sweep / "0" / ".hydra" / "config.yaml")["pooling"] == {"name": "mean", "exclude_instruction": False}

    # a second, smaller sweep into the same folder: the summary counts only its own jobs
    code, out, err = run(capsys, "encode", "-m", "pooling=mean", f"encode.input={texts}", *common)
    assert code == 0, err
    summary = json.loads((sweep / "multirun_summary.json").read_text())
    assert [(job["num"], job["status"]) for job in summary["jobs"]] == [(0, "completed")]


def test_sweep_over_an_option_that_does_not_exist_lists_the_options(capsys, tmp_path):
    code, _, err = run(capsys, "train", "-m", "pooling=meen,cls", f"output_dir={tmp_path}")
    assert code == 2
    poolings = ", ".join(embplex.load_registry().names("pooling"))
    assert f"No pooling plugin named 'meen'. Available pooling options: {poolings}." in err
    assert not (tmp_path / "0").exists(), "nothing ran"


def test_eval_and_encode_say_when_a_run_folder_holds_no_model(capsys, tmp_path, data_dir, texts):
    run_folder = tmp_path / "run"
    (run_folder / ".hydra").mkdir(parents=True)
    code, _, err = run(capsys, "eval", f"model.load={run_folder}", f"output_dir={tmp_path}", f"data.root={data_dir}", "data=stsb")
    assert code == 2
    assert f"model.load={run_folder} holds no saved model" in err

    # an unfinished run with a checkpoint: the message names the checkpoint's model
    checkpoint_model = run_folder / "checkpoints" / "step-2" / "model"
    checkpoint_model.mkdir(parents=True)
    (checkpoint_model / "embplex.json").write_text("{}")
    code, _, err = run(capsys, "encode", f"model.load={run_folder}", f"encode.input={texts}", f"output_dir={tmp_path}")
    assert code == 2
    assert "holds no saved model" in err and f"model.load={checkpoint_model}" in err


def test_cfg_info_and_help_work_as_in_any_hydra_app(capsys, tmp_path, third_party_probe):
    code, out, err = run(capsys, "config", "--cfg", "job", "pooling=cls")
    assert code == 0, err
    assert read_yaml_text(out)["pooling"]["name"] == "cls"

    code, out, err = run(capsys, "train", "--cfg", "hydra")
    assert code == 0, err
    assert read_yaml_text(out)["hydra"]["run"]["dir"] == "${output_dir}"
    code, out, err = run(capsys, "train", "--cfg", "all", "--resolve", f"output_dir={tmp_path}")
    assert code == 0, err
    resolved = read_yaml_text(out)
    assert resolved["output_dir"] == resolved["hydra"]["run"]["dir"] == resolved["hydra"]["sweep"]["dir"] == str(tmp_path)

    code, out, err = run(capsys, "train", "--info", "searchpath")
    assert code == 0, err
    assert "pkg://embplex.conf" in out and f"file://{third_party_probe}" in out

    code, out, err = run(capsys, "eval", "--help")
    assert code == 0, err
    assert "embplex eval [overrides...]" in out and "== Config ==" in out
    poolings = ", ".join(sorted([*embplex.load_registry().names("pooling"), "probe"]))
    assert f"pooling: {poolings}" in out, "third-party options are listed"
    assert "data: flagembedding, limit, needle, passkey, scifact, snli, stsb" in out


def read_yaml_text(text):
    import yaml

    return yaml.safe_load(text)


def test_shell_completion(capsys, monkeypatch):
    code, out, err = run(capsys, "train", "--shell-completion", "install=bash")
    assert code == 0, err
    assert "complete -o nospace -o default -F hydra_bash_completion embplex" in out

    monkeypatch.setenv("COMP_LINE", "embplex tr")
    code, out, _ = run(capsys, "-sc", "query=bash")
    assert code == 0 and out.split() == ["train"]

    monkeypatch.setenv("COMP_LINE", "embplex train pooling=")
    code, out, err = run(capsys, "-sc", "query=bash")
    assert code == 0, err
    assert {"pooling=cls", "pooling=mean"} <= set(out.split())


def test_optuna_search_with_two_trials_in_parallel_processes(capsys, tmp_path, tiny_bert_path, data_dir):
    """hydra/sweeper=optuna asks for 2 trials at once, hydra/launcher=joblib runs them in
    2 processes; each trial returns its final loss to the study (one test: each process
    start costs seconds)."""
    code, out, err = run(
        capsys, "train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "loss.temperature=interval(0.01,0.1)",
        *tiny_training(tiny_bert_path, data_dir, tmp_path),
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "multirun_summary.json").read_text())
    assert [(job["num"], job["status"]) for job in summary["jobs"]] == [(0, "completed"), (1, "completed")]
    losses = [job["metrics"]["loss"] for job in summary["jobs"]]
    assert all(np.isfinite(losses))
    assert read_yaml(tmp_path / "optimization_results.yaml")["best_value"] == pytest.approx(min(losses))
    for num in (0, 1):
        assert (tmp_path / str(num) / "model" / "embplex.json").exists()
        launcher = read_yaml(tmp_path / str(num) / ".hydra" / "hydra.yaml")["hydra"]["launcher"]
        assert launcher["_target_"].endswith("JoblibLauncher")


def test_quickstart_table_prints_the_paired_interval_of_the_change(capsys, tmp_path, tiny_bert_path):
    """The whole quickstart on a 6-document BEIR set: the before/after table says whether
    the change is larger than the noise (its paired bootstrap interval)."""
    beir = tmp_path / "data" / "retrieval" / "scifact"
    (beir / "qrels").mkdir(parents=True)
    topics = ["vitamin d and infection", "guitar lessons", "solar panels", "coffee and sleep", "river floods", "chess openings"]
    (beir / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "title": "", "text": f"a document about {t}"}) + "\n" for i, t in enumerate(topics))
    )
    (beir / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": f"what about {t}?"}) + "\n" for i, t in enumerate(topics))
    )
    header = "query-id\tcorpus-id\tscore\n"
    (beir / "qrels" / "train.tsv").write_text(header + "".join(f"q{i}\td{i}\t1\n" for i in range(4)))
    (beir / "qrels" / "test.tsv").write_text(header + "".join(f"q{i}\td{i}\t1\n" for i in range(4, 6)))

    code, out, err = run(
        capsys, "quickstart", f"backbone.path={tiny_bert_path}", f"data.root={tmp_path / 'data'}",
        "train.max_steps=1", "train.batch_size=2", "eval.bootstrap=20", f"output_dir={tmp_path / 'run'}",
    )

    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "quickstart.json").read_text())["results"]
    table = out.splitlines()
    assert "change 95% CI (paired)" in next(line for line in table if line.startswith("metric"))
    low, high = saved["change"]["ndcg@10"]["change_ci"]
    row = next(line for line in table if line.startswith("ndcg@10"))
    assert row.endswith(f"[{low:+.2f}, {high:+.2f}]")
    assert low <= saved["change"]["ndcg@10"]["change"] <= high
    assert (tmp_path / "run" / ".hydra" / "config.yaml").exists()

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
