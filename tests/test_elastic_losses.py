"""The elastic losses (cached_infonce, matryoshka, matryoshka_2d, starbucks,
projection_head): each against the definition that makes it what it is."""

from __future__ import annotations

import pytest
import torch

import embplex
from embplex.errors import OptionError, UnknownComponentError
from embplex.testing import LossContract, make_training_batch, tiny_examples

BATCH = 6


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    """A 3-layer random BERT (hidden 32) with dropout 0.1 everywhere."""
    from embplex.testing import build_encoder

    return build_encoder(tmp_path_factory.mktemp("elastic-encoder"), layers=3)


@pytest.fixture
def model(tiny_path):
    return embplex.compose({"name": "hf_encoder", "path": tiny_path}, pooling="mean")


@pytest.fixture
def batch(model):
    return make_training_batch(model.backbone, tiny_examples(BATCH, negatives=1))


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _run(loss, model, batch, seed: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and every parameter's gradient, from the same random state."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.enable_grad():
        value = loss(model, batch)
        value.backward()
    return float(value.detach()), _grads(model)


def _assert_same(left, right, atol: float = 1e-5) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = left, right
    assert loss_a == pytest.approx(loss_b, abs=atol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=0, msg=name)


# ---------------------------------------------------------------------------
# cached_infonce
# ---------------------------------------------------------------------------


def _has_dropout(model) -> bool:
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


@pytest.mark.parametrize("mini_batch_size", [1])
def test_cached_infonce_equals_infonce_without_dropout(registry, model, batch, mini_batch_size):
    model.eval()  # no dropout: the mini-batches' forward equals the whole batch's
    cached = registry.create("loss", "cached_infonce", mini_batch_size=mini_batch_size)
    _assert_same(_run(cached, model, batch), _run(registry.create("loss", "infonce"), model, batch))


def test_cached_infonce_equals_infonce_with_dropout_on(registry, model, batch):
    """Train mode, dropout on, one mini-batch per role: the cached pass and its replay
    draw the masks infonce's single pass draws."""
    model.train()
    assert _has_dropout(model)
    cached = registry.create("loss", "cached_infonce", mini_batch_size=BATCH)
    infonce = registry.create("loss", "infonce")
    _assert_same(_run(cached, model, batch), _run(infonce, model, batch))
    # dropout really is on: another random state gives another loss
    assert _run(infonce, model, batch, seed=1)[0] != pytest.approx(_run(infonce, model, batch)[0], abs=1e-6)


def test_cached_infonce_replays_each_mini_batch_with_its_dropout_masks(registry, model, batch):
    """Train mode, mini-batches of 2: the gradients are those of infonce on the same
    mini-batched forward pass with a graph (which only restoring each mini-batch's random
    state for the replay can give)."""
    model.train()
    cached = registry.create("loss", "cached_infonce", mini_batch_size=2)
    infonce = registry.create("loss", "infonce")

    class MiniBatched(torch.nn.Module):  # the uncached reference: same chunks, same order
        def forward(self, model, batch):
            from embplex.plugins.loss.cached_infonce import _rows

            embeddings = {}
            for role, features in batch.roles().items():
                count = features.input_ids.shape[0]
                parts = [model.embed(_rows(features, s, min(count, s + 2)))[None] for s in range(0, count, 2)]
                embeddings[role] = torch.cat(parts)
            return infonce.compute(embeddings, batch)

    _assert_same(_run(cached, model, batch), _run(MiniBatched(), model, batch))
    # and training continues on the random stream it would have without the replay
    torch.manual_seed(3)
    with torch.enable_grad():
        cached(model, batch).backward()
    after_cached = torch.rand(1)
    torch.manual_seed(3)
    with torch.no_grad():
        cached(model, batch)
    assert torch.equal(torch.rand(1), after_cached)


@pytest.mark.parametrize("size", [0, -3])
def test_cached_infonce_refuses_a_mini_batch_size_below_one(registry, size):
    with pytest.raises(OptionError, match="mini_batch_size"):
        registry.create("loss", "cached_infonce", mini_batch_size=size)


class TestCachedInfoNCEContract(LossContract):
    @pytest.fixture
    def loss(self):
        return embplex.load_registry().create("loss", "cached_infonce", mini_batch_size=3)


# ---------------------------------------------------------------------------
# matryoshka
# ---------------------------------------------------------------------------


def test_matryoshka_is_the_weighted_sum_of_the_inner_loss_over_normalised_prefixes(registry, model, batch):
    model.eval()
    loss = registry.create("loss", "matryoshka", dims=[8, 32, 16], weights=[0.5, 1.0, 2.0])
    assert loss.dims == [32, 16, 8] and loss.weights == [1.0, 2.0, 0.5]
    infonce = registry.create("loss", "infonce")
    with torch.no_grad():
        full = {role: e[None] for role, e in model.embed_roles(batch).items()}
        expected = sum(
            w * infonce.compute({r: torch.nn.functional.normalize(e[:, :d], dim=-1) for r, e in full.items()}, batch)
            for d, w in [(32, 1.0), (16, 2.0), (8, 0.5)]
        )
        assert float(loss(model, batch)) == pytest.approx(float(expected), abs=1e-5)
    assert loss.recommended_sizes(model) == [(3, 8), (3, 16), (3, 32)]


def test_matryoshka_refuses_a_prefix_wider_than_the_model_before_training(registry, model, tmp_path):
    from embplex.training import TrainSettings, train

    loss = registry.create("loss", "matryoshka", dims=[64, 16])
    with pytest.raises(OptionError, match=r"prefix of 64.*32 wide"):
        train(model, tiny_examples(4), loss, registry.create("sampler", "random"), TrainSettings(batch_size=2, max_steps=1, progress_bar=False, tensorboard=False), tmp_path)
    assert not (tmp_path / "metrics.csv").exists()


@pytest.mark.parametrize(
    "options, match",
    [
        ({"dims": []}, "dims must be"),
        ({"dims": [16, 0]}, "dims must be"),
        ({"dims": [16, 16]}, "dims must be"),
        ({"dims": [16, 8], "weights": [1.0]}, "weights must be 2"),
        ({"dims": [16], "weights": [float("nan")]}, "weights must be"),
    ],
)
def test_matryoshka_refuses_bad_dims_and_weights(registry, options, match):
    with pytest.raises(OptionError, match=match):
        registry.create("loss", "matryoshka", **options)


@pytest.mark.parametrize("name", ["matryoshka", "matryoshka_2d", "starbucks", "projection_head"])
def test_an_inner_loss_that_does_not_exist_is_refused(registry, name):
    with pytest.raises(UnknownComponentError, match="loss.inner: No loss plugin named 'infonse'"):
        registry.create("loss", name, inner="infonse")


class TestMatryoshkaContract(LossContract):
    @pytest.fixture
    def loss(self):
        return embplex.load_registry().create("loss", "matryoshka", dims=[8, 4, 2])


# ---------------------------------------------------------------------------
# matryoshka_2d
# ---------------------------------------------------------------------------


def test_matryoshka_2d_equals_sentence_transformers_on_the_same_layer(registry, model, batch, tiny_path, monkeypatch):
    """sentence-transformers' Matryoshka2dLoss with one dim (so it samples none), one
    earlier layer weighted 1/(1+k) and KL at 0.3, against ours with the same layer."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.sentence_transformer.losses import adaptive_layer

    layer = 2
    st = SentenceTransformer(modules=[Transformer(tiny_path), Pooling(32, "mean"), Normalize()], device="cpu")
    st.eval()
    model.eval()
    st_loss = losses.Matryoshka2dLoss(
        st, losses.MultipleNegativesRankingLoss(st, scale=20.0), [16], layer_weighting="linear"
    )
    monkeypatch.setattr(adaptive_layer.random, "sample", lambda population, k: [layer])
    roles = [[e.anchor for e in batch.examples], [e.positive for e in batch.examples], [e.negatives[0] for e in batch.examples]]
    with torch.enable_grad():
        theirs = st_loss([st.tokenize(texts) for texts in roles], torch.zeros(BATCH))
        theirs.backward()
    ours_loss = registry.create("loss", "matryoshka_2d", dims=[16])
    monkeypatch.setattr(ours_loss, "sample_layer", lambda depth: layer)
    value, grads = _run(ours_loss, model, batch)
    assert value == pytest.approx(float(theirs.detach()), abs=1e-5)
    their_grads = {name.split(".", 2)[2]: p.grad for name, p in st.named_parameters() if p.grad is not None}
    ours = {name.split(".", 2)[2]: g for name, g in grads.items()}
    assert their_grads.keys() == ours.keys()
    for name, grad in ours.items():
        # rtol as well: a gradient summed over every token (token_type_embeddings) carries the
        # float rounding of thousands of additions, whose order differs between the libraries
        torch.testing.assert_close(grad, their_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_matryoshka_2d_draws_an_earlier_layer_from_its_seed_and_counter(registry):
    loss = registry.create("loss", "matryoshka_2d", dims=[16], seed=3)
    drawn = [loss.sample_layer(6) for _ in range(40)]
    assert set(drawn) == {1, 2, 3, 4, 5} and int(loss.draws) == 40
    again = registry.create("loss", "matryoshka_2d", dims=[16], seed=3)
    again.load_state_dict({"draws": torch.tensor(20)} | {k: v for k, v in again.state_dict().items() if k != "draws"})
    assert [again.sample_layer(6) for _ in range(20)] == drawn[20:]


class Killed(Exception):
    pass


def _straight_and_resumed(registry, tiny_path, tmp_path, make_loss):
    """The same 4-step run uninterrupted, and killed after step 3 (checkpoint at 2) then
    resumed; ``make_loss`` builds a fresh loss per run. Returns both results and losses."""
    from embplex.training import TrainSettings, train

    def kill_at_3(info):
        if info.step == 3:
            raise Killed

    def run(output, callbacks=()):
        model = embplex.compose({"name": "hf_encoder", "path": tiny_path}, pooling="mean")
        loss = make_loss()
        settings = TrainSettings(batch_size=3, max_steps=4, checkpoint_every=2, lr=1e-3, progress_bar=False, tensorboard=False)
        sampler = registry.create("sampler", "random")
        return train(model, tiny_examples(12), loss, sampler, settings, output, registry=registry, callbacks=callbacks), loss

    straight = run(tmp_path / "straight")
    with pytest.raises(Killed):
        run(tmp_path / "resumed", [kill_at_3])
    resumed = run(tmp_path / "resumed")
    assert resumed[0].resumed_from is not None
    expected = embplex.load(straight[0].model_path).state_dict()
    for name, tensor in embplex.load(resumed[0].model_path).state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    return straight, resumed


def test_matryoshka_2d_resumes_exactly(registry, tiny_path, tmp_path):
    """Killed after step 3 and resumed from step 2: the same layers drawn, the same weights."""
    drawn: dict[int, list] = {}

    def make_loss():
        loss = registry.create("loss", "matryoshka_2d", dims=[32, 8])
        layers = drawn.setdefault(len(drawn), [])
        original = loss.sample_layer
        loss.sample_layer = lambda depth: layers.append(original(depth)) or layers[-1]
        return loss

    (straight, _), _ = _straight_and_resumed(registry, tiny_path, tmp_path, make_loss)
    assert drawn[2] == drawn[0][2:]  # the resumed run draws what the straight run drew
    # the saved model says which (layer, dim) pairs it was trained to serve
    assert embplex.load(straight.model_path).recommended_sizes == [(1, 8), (1, 32), (2, 8), (2, 32), (3, 8), (3, 32)]


def test_projection_head_resumes_exactly_with_its_head(registry, tiny_path, tmp_path):
    make = lambda: registry.create("loss", "projection_head", hidden_dim=24, output_dim=16)  # noqa: E731
    (_, straight_loss), (_, resumed_loss) = _straight_and_resumed(registry, tiny_path, tmp_path, make)
    for name, tensor in straight_loss.state_dict().items():
        assert torch.equal(resumed_loss.state_dict()[name], tensor), name


class TestMatryoshka2dContract(LossContract):
    @pytest.fixture
    def loss(self):
        return embplex.load_registry().create("loss", "matryoshka_2d", dims=[8, 4])


# ---------------------------------------------------------------------------
# starbucks
# ---------------------------------------------------------------------------


def test_starbucks_sums_every_pair_with_its_alignment_to_the_full_model(registry, model, batch):
    model.eval()
    pairs = [[1, 8], [2, 16], [3, 32]]
    loss = registry.create("loss", "starbucks", pairs=pairs)
    assert loss.recommended_sizes(model) == [(1, 8), (2, 16), (3, 32)]
    infonce = registry.create("loss", "infonce")
    norm = torch.nn.functional.normalize
    with torch.no_grad():
        by_layer = model.embed_roles(batch, layers=[1, 2, None])
        expected = 0.0
        for layer, dim in [(1, 8), (2, 16), (None, 32)]:
            pair = {r: norm(e[layer][:, :dim], dim=-1) for r, e in by_layer.items()}
            expected += float(infonce.compute(pair, batch))
            if layer is not None:  # KL(full ‖ pair) over the pair's coordinates, T = 0.3
                student = torch.cat(list(pair.values())) / 0.3
                teacher = torch.cat([norm(e[None][:, :dim], dim=-1) for e in by_layer.values()]) / 0.3
                p = teacher.softmax(-1)
                kl = (p * (p.log() - student.log_softmax(-1))).sum(-1).mean()
                expected += 0.3 * float(kl)
        assert float(loss(model, batch)) == pytest.approx(expected, abs=1e-5)


def test_starbucks_default_pairs_scale_the_reference_ladder_to_minilm(registry):
    loss = registry.create("loss", "starbucks")
    assert loss.pairs == [(1, 32), (2, 64), (3, 128), (4, 192), (5, 256), (6, 384)]


@pytest.mark.parametrize(
    "pairs, match",
    [([], "pairs is empty"), ([[1, 8, 2]], "not a .layer, dim. pair"), ([[0, 8]], "not a .layer, dim. pair"), ([[1, 8], [1, 8]], "twice")],
)
def test_starbucks_refuses_bad_pairs(registry, pairs, match):
    with pytest.raises(OptionError, match=match):
        registry.create("loss", "starbucks", pairs=pairs)


@pytest.mark.parametrize("pair, match", [([4, 8], "has 3 layers"), ([2, 64], "32-wide")])
def test_starbucks_refuses_a_pair_beyond_the_model_before_training(registry, model, pair, match):
    loss = registry.create("loss", "starbucks", pairs=[[1, 8], pair])
    with pytest.raises(OptionError, match=match):
        loss.bind(model)


class TestStarbucksContract(LossContract):
    @pytest.fixture
    def loss(self):
        return embplex.load_registry().create("loss", "starbucks", pairs=[[1, 4], [2, 8]])


# ---------------------------------------------------------------------------
# projection_head
# ---------------------------------------------------------------------------


def test_projection_head_trains_a_head_that_the_saved_model_never_contains(registry, tiny_path, tmp_path):
    from safetensors.torch import load_file

    from embplex.training import TrainSettings, train

    model = embplex.compose({"name": "hf_encoder", "path": tiny_path}, pooling="mean")
    loss = registry.create("loss", "projection_head", hidden_dim=24, output_dim=16)
    settings = TrainSettings(batch_size=3, max_steps=2, lr=1e-2, progress_bar=False, tensorboard=False)
    result = train(model, tiny_examples(6), loss, registry.create("sampler", "random"), settings, tmp_path, registry=registry)
    untrained = registry.create("loss", "projection_head", hidden_dim=24, output_dim=16)
    untrained.build(32)
    assert not torch.equal(loss.head[0].weight.cpu(), untrained.head[0].weight), "the head trained"
    saved = [load_file(str(f)) for f in result.model_path.rglob("*.safetensors")]
    shapes = {tuple(t.shape) for state in saved for t in state.values()}
    names = [name for state in saved for name in state]
    assert (24, 32) not in shapes and (16, 24) not in shapes and not any("head" in n for n in names)
    # the vectors served are the pre-head ones: the trained encoder's own embeddings
    texts = ["alpha beta", "gamma delta epsilon"]
    served = embplex.load(result.model_path).encode(texts, convert_to="torch")
    model.eval()
    with torch.no_grad():
        pre_head = model.embed(model.backbone.tokenize(texts))[None]
        assert served.shape == (2, 32)
        torch.testing.assert_close(served, pre_head, atol=1e-5, rtol=0)


def test_projection_head_refuses_a_bad_width(registry):
    with pytest.raises(OptionError, match="hidden_dim"):
        registry.create("loss", "projection_head", hidden_dim=0)


class TestProjectionHeadContract(LossContract):
    @pytest.fixture
    def loss(self):
        return embplex.load_registry().create("loss", "projection_head")


# ---------------------------------------------------------------------------
# wrapping losses around cached_infonce
# ---------------------------------------------------------------------------

WRAPPERS = [
    ("matryoshka", {"dims": [32, 8]}),
    ("matryoshka_2d", {"dims": [32, 8]}),
    ("starbucks", {"pairs": [[1, 8], [2, 16], [3, 32]]}),
    ("projection_head", {}),
]


@pytest.mark.parametrize("name, options", WRAPPERS, ids=[w[0] for w in WRAPPERS])
def test_wrapping_cached_infonce_gives_the_uncached_gradients(registry, model, batch, name, options):
    """Without dropout and mini-batches of 2, then in train mode with dropout on and one
    mini-batch per role: the cached composition's loss and gradients are the uncached one's."""
    for mode, size in [("eval", 2), ("train", BATCH)]:
        getattr(model, mode)()
        runs = []
        for inner in [{"name": "cached_infonce", "mini_batch_size": size}, "infonce"]:
            loss = registry.create("loss", name, inner=inner, **options)
            if name == "matryoshka_2d":
                loss.sample_layer = lambda depth: 2
            runs.append(_run(loss, model, batch))
        _assert_same(*runs)


# ---------------------------------------------------------------------------
# serving: embplex encode encode.layer=... encode.dim=...
# ---------------------------------------------------------------------------


def test_encode_serves_any_layer_and_prefix_of_a_saved_model(capsys, tmp_path, tiny_path):
    import numpy as np

    from embplex.cli import main

    model = embplex.compose({"name": "hf_encoder", "path": tiny_path}, pooling="mean")
    model.recommended_sizes = [(2, 16), (3, 32)]
    model.save(tmp_path / "model")
    assert embplex.load(tmp_path / "model").recommended_sizes == [(2, 16), (3, 32)]
    source = tmp_path / "texts.txt"
    source.write_text("alpha beta\ngamma delta epsilon\n")
    common = [f"model.load={tmp_path / 'model'}", f"encode.input={source}", f"output_dir={tmp_path}"]
    assert main(["encode", *common, "encode.layer=2", "encode.dim=16"]) == 0
    vectors = np.load(tmp_path / "embeddings.npy")
    expected = model.encode(["alpha beta", "gamma delta epsilon"], layer=2, dim=16)
    assert vectors.shape == (2, 16)
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    assert not np.allclose(vectors, model.encode(["alpha beta", "gamma delta epsilon"], dim=16), atol=1e-3)
    capsys.readouterr()
    for override, message in [("encode.layer=4", "layer=4 is not a layer"), ("encode.dim=64", "dim must be between 1 and")]:
        assert main(["encode", *common, override]) != 0
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("matryoshka_2d", {"dims": [64, 8]}, r"prefix of 64.*32 wide"),
        ("starbucks", {"pairs": [[1, 8], [5, 16]]}, "has 3 layers"),
        ("matryoshka", {"dims": [16], "inner": {"name": "matryoshka", "dims": [48]}}, r"prefix of 48"),
    ],
)
def test_elastic_losses_refuse_what_the_model_lacks_when_bound(registry, model, name, options, match):
    """The trainer binds the loss before any step (see the matryoshka training test);
    wrappers pass the check on to their inner loss."""
    with pytest.raises(OptionError, match=match):
        registry.create("loss", name, **options).bind(model)


def test_matryoshka_refuses_a_too_wide_prefix_even_outside_the_trainer(registry):
    embeddings = {"anchors": torch.randn(2, 8), "positives": torch.randn(2, 8)}
    with pytest.raises(OptionError, match="prefix of 16 of 8-wide"):
        registry.create("loss", "matryoshka", dims=[16, 4]).compute(embeddings, None)


def test_the_sentence_transformers_export_serves_the_full_model_and_its_prefixes(tmp_path, model):
    """The saved folder still loads in plain sentence-transformers; with truncate_dim it
    gives the last layer's prefixes (not renormalised: the same cosines as ours)."""
    from sentence_transformers import SentenceTransformer

    model.recommended_sizes = [(1, 16), (3, 32)]
    model.save(tmp_path / "model")
    texts = ["alpha beta", "gamma delta epsilon", "zeta"]
    full = SentenceTransformer(str(tmp_path / "model"), device="cpu").encode(texts)
    short = SentenceTransformer(str(tmp_path / "model"), device="cpu", truncate_dim=16).encode(texts)
    import numpy as np

    np.testing.assert_allclose(full, model.encode(texts), atol=1e-5)
    ours = model.encode(texts, dim=16)
    np.testing.assert_allclose(short / np.linalg.norm(short, axis=1, keepdims=True), ours, atol=1e-5)
