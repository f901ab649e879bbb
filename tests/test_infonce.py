"""The infonce loss against a hand-written reference, and the cross-process gather."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.multiprocessing as mp

from embplex.components import Features, TrainingBatch
from embplex.distributed import gather_with_grad, gather_with_offset, rank, world_size
from embplex.errors import OptionError

BATCH, NEGATIVES, DIM = 5, 2, 8


def _batch(negatives_per_anchor: int) -> TrainingBatch:
    dummy = Features(input_ids=torch.zeros(1, 1, dtype=torch.long), attention_mask=torch.ones(1, 1))
    return TrainingBatch(
        examples=[],
        anchors=dummy,
        positives=dummy,
        negatives=dummy if negatives_per_anchor else None,
        negatives_per_anchor=negatives_per_anchor,
    )


def _embeddings(negatives_per_anchor: int, seed: int = 0, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embeddings = {
        "anchors": torch.randn(BATCH, DIM, generator=generator),
        "positives": torch.randn(BATCH, DIM, generator=generator),
    }
    if negatives_per_anchor:
        embeddings["negatives"] = torch.randn(BATCH * negatives_per_anchor, DIM, generator=generator)
    return {role: t.requires_grad_(requires_grad) for role, t in embeddings.items()}


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _reference(embeddings: dict[str, torch.Tensor], temperature: float, symmetric: bool) -> float:
    """InfoNCE with explicit loops: -log softmax of the true pair among all candidates."""
    anchors = embeddings["anchors"].tolist()
    positives = embeddings["positives"].tolist()
    negatives = embeddings["negatives"].tolist() if "negatives" in embeddings else []
    candidates = positives + negatives  # every positive and every hard negative of the batch
    forward = 0.0
    for i, anchor in enumerate(anchors):
        logits = [_cosine(anchor, c) / temperature for c in candidates]
        forward -= logits[i] - math.log(sum(math.exp(z) for z in logits))
    forward /= len(anchors)
    if not symmetric:
        return forward
    backward = 0.0
    for i, positive in enumerate(positives):
        logits = [_cosine(positive, a) / temperature for a in anchors]
        backward -= logits[i] - math.log(sum(math.exp(z) for z in logits))
    backward /= len(positives)
    return (forward + backward) / 2


@pytest.fixture
def infonce(registry):
    return lambda **options: registry.create("loss", "infonce", **options)


@pytest.mark.parametrize("negatives_per_anchor", [0, NEGATIVES])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_equals_hand_written_reference(infonce, negatives_per_anchor, symmetric, temperature):
    embeddings = _embeddings(negatives_per_anchor, seed=negatives_per_anchor + 10 * symmetric)
    loss = infonce(temperature=temperature, symmetric=symmetric)
    value = loss.compute(embeddings, _batch(negatives_per_anchor))
    assert value.dim() == 0
    assert value.item() == pytest.approx(_reference(embeddings, temperature, symmetric), rel=1e-5, abs=1e-6)


def test_hard_negatives_make_the_task_harder(infonce):
    embeddings = _embeddings(NEGATIVES)
    without = {k: v for k, v in embeddings.items() if k != "negatives"}
    loss = infonce()
    assert loss.compute(embeddings, _batch(NEGATIVES)) > loss.compute(without, _batch(0))


def test_scale_invariant_because_it_uses_cosine(infonce):
    embeddings = _embeddings(NEGATIVES)
    scaled = {role: t * 7.5 for role, t in embeddings.items()}
    loss = infonce()
    torch.testing.assert_close(loss.compute(scaled, _batch(NEGATIVES)), loss.compute(embeddings, _batch(NEGATIVES)))


def test_gradient_reaches_every_role(infonce):
    embeddings = _embeddings(NEGATIVES, requires_grad=True)
    infonce(symmetric=True).compute(embeddings, _batch(NEGATIVES)).backward()
    for role, tensor in embeddings.items():
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, role


def test_matching_pairs_give_low_loss(infonce):
    anchors = torch.eye(BATCH, DIM)
    embeddings = {"anchors": anchors, "positives": anchors.clone()}
    assert infonce(temperature=0.05).compute(embeddings, _batch(0)).item() < 1e-6


def test_temperature_must_be_positive(infonce):
    with pytest.raises(OptionError, match="temperature"):
        infonce(temperature=0)


def test_model_forward_path(infonce, minilm):
    from embplex.components import Example
    from embplex.training import make_training_batch

    examples = [
        Example("a cat sits on the mat", "a kitten on a rug", ["stock markets fell"]),
        Example("how tall is everest", "mount everest is 8849 m high", ["paris is in france"]),
    ]
    batch = make_training_batch(minilm.backbone, examples)
    # temperature 1 keeps the loss of order 1, where float32 agrees to rel 1e-5
    loss = infonce(symmetric=True, temperature=1.0)
    with torch.no_grad():
        value = loss(minilm, batch)
        roles = {role: emb[None] for role, emb in minilm.embed_roles(batch).items()}
    assert value.item() == pytest.approx(_reference(roles, 1.0, True), rel=1e-5)


# -- across processes ----------------------------------------------------------------


def test_single_process_gather_is_the_identity():
    tensor = torch.randn(3, 4, requires_grad=True)
    assert rank() == 0 and world_size() == 1
    gathered, offset = gather_with_offset(tensor)
    assert gathered is tensor and offset == 0
    assert gather_with_grad(tensor) is tensor


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(process: int, port: int, results: dict) -> None:
    import torch.distributed as dist

    from embplex.plugins.loss.infonce import InfoNCE

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=process, world_size=2)
    try:
        # gather: rank order, uneven row counts; every process's gradient for a row goes
        # back to the process that owns it
        local = torch.full((process + 1, 2), float(process + 1), requires_grad=True)
        gathered, offset = gather_with_offset(local)
        weights = torch.arange(gathered.numel(), dtype=torch.float32).reshape(gathered.shape)
        (gathered * weights).sum().backward()
        results[f"gather{process}"] = (gathered.detach().clone(), offset, local.grad.clone())

        # infonce: each process holds half of one batch
        full = _embeddings(NEGATIVES, seed=3)
        half = BATCH // 2 + (1 if process == 0 else 0)
        start = 0 if process == 0 else BATCH - half
        shard = {
            "anchors": full["anchors"][start : start + half],
            "positives": full["positives"][start : start + half],
            "negatives": full["negatives"][start * NEGATIVES : (start + half) * NEGATIVES],
        }
        for symmetric in (False, True):
            value = InfoNCE(symmetric=symmetric).compute(shard, _batch(NEGATIVES))
            results[f"loss{process}-{symmetric}"] = (value.item(), half)
        # progressive normalises its weights over the global batch, not the local slice
        from embplex.plugins.loss.progressive import Progressive

        results[f"progressive{process}"] = (Progressive(steps=10).eval().compute(shard, _batch(NEGATIVES)).item(), half)
    finally:
        dist.destroy_process_group()


def test_two_processes_gather_and_share_negatives():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)

    for process in (0, 1):
        gathered, offset, grad = results[f"gather{process}"]
        # rank 0 holds one row of 1s, rank 1 two rows of 2s
        torch.testing.assert_close(gathered, torch.tensor([[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]))
        assert offset == (0 if process == 0 else 1)
        weights = torch.arange(6, dtype=torch.float32).reshape(3, 2)
        # both processes' sums use every row: each row's gradient is the sum of the two
        torch.testing.assert_close(grad, 2 * weights[offset : offset + process + 1])

    full = _embeddings(NEGATIVES, seed=3)
    for symmetric in (False, True):
        # the mean over the batch's anchors equals the one-process loss on the whole batch
        parts = [results[f"loss{process}-{symmetric}"] for process in (0, 1)]
        combined = sum(value * count for value, count in parts) / BATCH
        assert combined == pytest.approx(_reference(full, 0.05, symmetric), rel=1e-5)
    from embplex.plugins.loss.progressive import Progressive

    parts = [results[f"progressive{process}"] for process in (0, 1)]
    combined = sum(value * count for value, count in parts) / BATCH
    assert combined == pytest.approx(Progressive(steps=10).eval().compute(full, _batch(NEGATIVES)).item(), rel=1e-5)
