"""The ``device`` setting: resolution, refusals before any work, the device a run records,
and what an accelerator running out of memory does. CI has no GPU, so CUDA's presence is
simulated where the behaviour depends on it, and out-of-memory errors are raised by a
forward pass made to fail above a batch size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

import embplex
import embplex.cli
from embplex import devices
from embplex.errors import DeviceError, OutOfMemoryError
from embplex.testing import make_training_batch


def run(capsys, *argv):
    code = embplex.cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(devices, "cuda_count", lambda: 0)
    monkeypatch.setattr(devices, "mps_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(devices, "cuda_count", lambda: 2)
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, no_accelerator):
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    assert devices.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(devices, "cuda_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert devices.resolve_device("auto") == torch.device("cuda", 0)


def test_cuda_means_the_local_rank_gpu_under_torchrun(monkeypatch, two_gpus):
    assert devices.resolve_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert devices.resolve_device("cuda") == torch.device("cuda", 1)
    assert devices.resolve_device("auto") == torch.device("cuda", 1)
    assert devices.resolve_device("cuda:0") == torch.device("cuda", 0), "an explicit index wins"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("cuda", r"device=cuda: this machine has no CUDA device.*Available: cpu"),
        ("cuda:0", r"device=cuda:0: this machine has no CUDA device"),
        ("mps", r"device=mps: this machine has no MPS .*Available: cpu"),
        ("gpu", r"device='gpu' is not a device: write auto, cpu, cuda, cuda:N or mps"),
    ],
)
def test_a_device_the_machine_lacks_is_refused_naming_what_it_has(no_accelerator, spec, message):
    with pytest.raises(DeviceError, match=message):
        devices.resolve_device(spec)


def test_a_gpu_index_past_the_last_is_refused(two_gpus):
    with pytest.raises(DeviceError, match=r"device=cuda:3: this machine has 2 CUDA device\(s\), so the highest is cuda:1"):
        devices.resolve_device("cuda:3")


def test_compose_refuses_a_missing_device_before_loading_anything(no_accelerator, monkeypatch):
    loaded = []
    monkeypatch.setattr(embplex.Registry, "get", lambda *a, **k: loaded.append(a))
    with pytest.raises(DeviceError, match="device=cuda"):
        embplex.compose({"name": "hf_encoder", "path": "/nowhere"}, device="cuda")
    assert loaded == [], "no plugin was looked up, no weights read"


def test_compose_and_load_place_the_model(tiny_bert_path, tmp_path):
    model = embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, device="cpu")
    assert model.device == torch.device("cpu")
    model.save(tmp_path / "model")
    assert embplex.load(tmp_path / "model", device="cpu").device == torch.device("cpu")


def test_the_cli_refuses_cuda_without_a_gpu_before_any_work(capsys, tmp_path, no_accelerator):
    code, out, err = run(capsys, "train", "device=cuda", f"output_dir={tmp_path / 'run'}")
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "embplex train: error: device=cuda: this machine has no CUDA device"
        + ("" if torch.version.cuda else " (this PyTorch build has no CUDA support)")
        + ". Available: cpu; device=auto picks the best of them."
    )
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "metrics.csv").exists()


def test_a_run_records_the_device_it_used(capsys, tmp_path, tiny_bert_path):
    sts = tmp_path / "sts.tsv"
    sts.write_text("sentence1\tsentence2\tscore\n" + "".join(f"sentence {i}\tanother {i % 3}\t{i / 2:.1f}\n" for i in range(6)))
    out_dir = tmp_path / "run"
    code, out, err = run(
        capsys, "eval", f"backbone.path={tiny_bert_path}", "data=stsb", f"data.eval.path={sts}",
        "eval.bootstrap=10", f"output_dir={out_dir}",
    )
    assert code == 0, err
    saved = yaml.safe_load((out_dir / ".hydra" / "config.yaml").read_text())
    assert saved["device"] == "cpu", "auto was resolved to the device the run used"
    assert yaml.safe_load((out_dir / ".hydra" / "overrides.yaml").read_text()) == [
        f"backbone.path={tiny_bert_path}", "data=stsb", f"data.eval.path={sts}", "eval.bootstrap=10",
        f"output_dir={out_dir}",
    ]
    assert json.loads((out_dir / "results.json").read_text())["results"]["model"]["device"] == "cpu"


def fail_above(model, rows: int, monkeypatch, error=torch.cuda.OutOfMemoryError):
    """Make the backbone's forward raise an out-of-memory error for batches over ``rows``."""
    forward = type(model.backbone).forward
    seen: list[int] = []

    def limited(self, features, *args, **kwargs):
        seen.append(features.input_ids.shape[0])
        if features.input_ids.shape[0] > rows:
            raise error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, features, *args, **kwargs)

    monkeypatch.setattr(type(model.backbone), "forward", limited)
    return seen


def test_encode_halves_the_batch_after_out_of_memory_and_keeps_input_order(tiny_bert_path, monkeypatch):
    model = embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, device="cpu")
    texts = [f"text number {i} " + "word " * (i % 7) for i in range(23)]
    expected = model.encode(texts, batch_size=16)
    seen = fail_above(model, 5, monkeypatch)
    with pytest.warns(UserWarning, match="out of cpu memory encoding 16 texts in one pass; continuing with at most 8"):
        vectors = model.encode(texts, batch_size=16)
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    assert max(size for size in seen if size <= 5) == 4, "16 -> 8 -> 4 texts per pass"
    assert seen.count(16) == 1, "once a size failed, later batches are split up front"


def test_encode_treats_the_runtime_error_of_other_backends_as_out_of_memory(tiny_bert_path, monkeypatch):
    model = embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, device="cpu")
    texts = [f"text {i}" for i in range(6)]
    expected = model.encode(texts)
    fail_above(model, 2, monkeypatch, error=lambda message: RuntimeError("MPS backend out of memory"))
    with pytest.warns(UserWarning):
        np.testing.assert_allclose(model.encode(texts, batch_size=8), expected, atol=1e-6)


def test_encode_gives_up_clearly_when_one_text_does_not_fit(tiny_bert_path, monkeypatch):
    model = embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, device="cpu")
    fail_above(model, 0, monkeypatch)
    with pytest.warns(UserWarning), pytest.raises(OutOfMemoryError, match="on a single text .*Lower backbone.max_length"):
        model.encode(["one", "two"], batch_size=2)


def test_other_errors_of_a_forward_are_not_taken_for_out_of_memory(tiny_bert_path, monkeypatch):
    model = embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, device="cpu")
    fail_above(model, 0, monkeypatch, error=lambda message: RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        model.encode(["one", "two"])


def test_training_out_of_memory_names_the_batch_size_and_gradient_caching(tiny_bert_path, tmp_path, monkeypatch):
    from embplex.training import TrainSettings, train

    model = embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, device="cpu")
    examples = [embplex.Example(f"query {i}", f"answer {i}") for i in range(8)]
    registry = embplex.load_registry()
    fail_above(model, 2, monkeypatch)
    with pytest.raises(OutOfMemoryError) as caught:
        train(
            model, examples, registry.create("loss", "infonce"), registry.create("sampler", "random"),
            TrainSettings(batch_size=4, max_steps=2, progress_bar=False, tensorboard=False),
            output_dir=tmp_path / "run",
        )
    message = str(caught.value)
    assert "out of cpu memory at step 1 with train.batch_size=4" in message
    assert "train.grad_accumulation" in message and "loss=cached_infonce" in message
    assert isinstance(caught.value.__cause__, torch.cuda.OutOfMemoryError)


def test_features_move_with_non_blocking_copies(tiny_bert_path):
    model = embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, device="cpu")
    batch = make_training_batch(model.backbone, [embplex.Example("a", "b")])
    moved = batch.anchors.to("cpu", non_blocking=True)
    assert torch.equal(moved.input_ids, batch.anchors.input_ids)


def test_the_exact_index_follows_the_run_device(registry, no_accelerator):
    from embplex.config import compose_config
    from embplex.plugins.index.exact import ExactIndex

    assert compose_config(["device=cpu"], registry=registry)["index"]["device"] == "cpu"
    index = ExactIndex(dim=4, device="auto")
    assert index.device == torch.device("cpu")
    index.add(["a", "b"], np.eye(4, dtype=np.float32)[:2])
    assert index.search(np.eye(4, dtype=np.float32)[:1], 1).ids == [["a"]]
    with pytest.raises(DeviceError, match="device=cuda: this machine has no CUDA device"):
        ExactIndex(dim=4, device="cuda")
