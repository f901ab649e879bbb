"""A LIMIT-style retrieval task, generated deterministically (``data=limit``).

From "On the Theoretical Limitations of Embedding-Based Retrieval" (Weller et al., 2025,
arXiv:2508.21038): how many top-k combinations of documents a d-dimensional embedding can
return is bounded by d, so a task whose queries ask for many different pairs of the same
few documents is hard for small vectors however simple its language. Documents read
"{Name} likes {item}, {item}, ..."; each query "Who likes {item}?" has exactly ``k``
relevant documents (those that like the item), and the queries cover distinct ``k``-sets
of the first ``documents`` documents (every pair when there are enough queries). Each
document lists the same number of items: its queried ones, then items no query asks about.
The large variant adds ``distractors`` documents that like only unqueried items (spare
items are shared between documents; queried ones never are beyond their ``k``).

Our generator is our own (names and items from small word lists, one seeded NumPy
generator), not the paper's data files: the structure is the paper's (46 documents,
1000 queries, k = 2 for its small variant), the words differ.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from .errors import OptionError

FIRST = (
    "Ada Ben Cara Dev Eli Fay Gus Hana Ivo Jade Kai Lena Milo Nia Omar Pia Quin Rosa Sami Tara "
    "Uma Vik Wren Xia Yael Zane Abel Bea Cole Dora Emil Fern Gil Hugo Iris Jon Kira Lars Maya Nils"
).split()
LAST = (
    "Abbott Baker Chen Diaz Evans Fischer Garcia Hale Ito Jensen Khan Lopez Moreau Novak Okafor "
    "Park Quist Rossi Singh Tanaka Ueda Varga Weber Xu Young Zhou Adler Brandt Costa Dahl"
).split()
SIZES = "tiny small big huge old new".split()
COLOURS = "red blue green yellow purple orange black white silver golden pink brown grey violet teal amber".split()
THINGS = (
    "apples bicycles candles dragons engines ferns guitars hats igloos jackets kites lamps maps "
    "novels owls pianos quilts robots sandals tulips umbrellas violins wagons yachts zebras "
    "balloons cactuses dolphins feathers gloves hammocks lanterns marbles notebooks pebbles "
    "rockets scarves teapots vases whistles"
).split()


def _words(count: int, rng: np.random.Generator, pools: tuple[tuple[str, ...], ...], what: str) -> list[str]:
    """``count`` distinct phrases, one word from each pool, in a seeded order."""
    combos = list(itertools.product(*pools))
    if count > len(combos):
        raise OptionError(f"the LIMIT generator has only {len(combos)} distinct {what}; ask for at most that many.")
    return [" ".join(combos[i]) for i in rng.permutation(len(combos))[:count]]


def generate(
    documents: int = 46,
    queries: int = 1000,
    relevant: int = 2,
    distractors: int = 0,
    items_per_document: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, float]]]:
    """``(corpus, queries, qrels)`` as :func:`embplex.data.load_beir` returns them.

    :param documents: the documents the queries ask about (46 in the paper's small variant).
    :param queries: how many distinct ``relevant``-sets of them are asked for (at most
        C(documents, relevant)); chosen at random when fewer than all.
    :param relevant: documents relevant to each query (k = 2 in the paper).
    :param distractors: more documents, which like only items no query asks about.
    :param items_per_document: items each document lists (its queried items first, then
        unqueried ones); ``None``: the most any document needs.
    """
    for name, value, least in [("documents", documents, 1), ("queries", queries, 1), ("relevant", relevant, 1), ("distractors", distractors, 0)]:
        if value < least:
            raise OptionError(f"data.eval.{name} must be at least {least}, not {value}.")
    if relevant > documents:
        raise OptionError(f"data.eval.relevant={relevant} exceeds data.eval.documents={documents}.")
    possible = math.comb(documents, relevant)
    if queries > possible:
        raise OptionError(
            f"data.eval.queries={queries} asks for more than the {possible} distinct sets of {relevant} "
            f"among {documents} documents; ask for fewer queries or more documents."
        )
    rng = np.random.default_rng(seed)
    combos = list(itertools.combinations(range(documents), relevant))
    chosen = [combos[i] for i in sorted(rng.choice(len(combos), queries, replace=False))]
    liked: list[list[int]] = [[] for _ in range(documents)]  # queried items per document
    for item, combo in enumerate(chosen):
        for doc in combo:
            liked[doc].append(item)
    need = max(len(items) for items in liked)
    per_doc = need if items_per_document is None else items_per_document
    if per_doc < need:
        raise OptionError(
            f"data.eval.items_per_document={per_doc} is fewer than the {need} queried items a document "
            "must list; raise it or set it to null."
        )
    pool = _words(len(SIZES) * len(COLOURS) * len(THINGS), rng, (tuple(SIZES), tuple(COLOURS), tuple(THINGS)), "items")
    items, unqueried = pool[:queries], pool[queries:]  # no query asks about an unqueried item
    if per_doc > len(unqueried):
        raise OptionError(f"data.eval.items_per_document={per_doc} is more than the generator's {len(unqueried)} spare items.")
    names = _words(documents + distractors, rng, (tuple(FIRST), tuple(LAST)), "names")
    corpus: dict[str, str] = {}
    for doc in range(documents + distractors):
        mine = [items[i] for i in liked[doc]] if doc < documents else []
        spare = rng.choice(len(unqueried), per_doc - len(mine), replace=False)
        listed = mine + [unqueried[i] for i in spare]
        order = rng.permutation(len(listed))  # queried items are not always first
        corpus[f"d{doc}"] = f"{names[doc]} likes " + ", ".join(listed[i] for i in order) + "."
    query_text = {f"q{i}": f"Who likes {items[i]}?" for i in range(queries)}
    qrels = {f"q{i}": {f"d{doc}": 1.0 for doc in combo} for i, combo in enumerate(chosen)}
    return corpus, query_text, qrels
