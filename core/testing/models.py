"""Tiny randomly initialised models of every supported family, for tests.

Each decoder family gets a two-layer model with a byte-level BPE tokenizer whose special tokens
mimic the real family: Llama, Mistral and Gemma prepend BOS; GPT-2 and Qwen2 do not;
GPT-2 and Mistral ship no pad token (the backbone must fall back to EOS). Building one
takes well under a second, so tests build them into ``tmp_path`` freely.
``build_encoder`` makes a BERT of the same size with a WordPiece tokenizer, for the
``hf_encoder`` backbone. Nothing is downloaded: the tokenizers are trained on ``WORDS``.
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gpt2")
"""The decoder families the ``hf_decoder`` backbone supports, one tiny model each."""

WORDS = (
    "the a an of to in and is was for on with as by at from it that this be are "
    "cat dog bird fish sat ran flew swam mat log tree pond quick brown fox jumps over "
    "lazy query passage document answer question what where when who why how red blue "
    "green small large old new river city country music book story paris france capital"
).split()

# (adds BOS in front, pad token or None, eos token)
_SPECIALS = {
    "llama": (True, None, "</s>"),
    "mistral": (True, None, "</s>"),
    "qwen2": (False, "<|endoftext|>", "<|im_end|>"),
    "gemma": (True, "<pad>", "<eos>"),
    "gpt2": (False, None, "<|endoftext|>"),
}


def build_tokenizer(family: str):
    """A byte-level BPE tokenizer trained on ``WORDS`` (the scheme of GPT-2, Llama 3 and
    Qwen2), with the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    adds_bos, pad, eos = _SPECIALS[family]
    specials = list(dict.fromkeys(["<unk>", "<s>", eos] + ([pad] if pad else [])))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sentences = [" ".join(WORDS[i:] + WORDS[:i]) + " . ? : ," for i in range(0, len(WORDS), 7)]
    tokenizer.train_from_iterator(sentences, trainer=trainer)
    if adds_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token=eos,
        unk_token="<unk>",
        pad_token=pad,
        model_max_length=128,
    )
    return fast, tokenizer.get_vocab()


def build_config(family: str, vocab_size: int, bos: int, eos: int, pad: int | None):
    import transformers

    common = dict(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
    sizes = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **common,
    )
    if family == "llama":
        return transformers.LlamaConfig(**sizes)
    if family == "mistral":
        return transformers.MistralConfig(sliding_window=None, **sizes)
    if family == "qwen2":
        return transformers.Qwen2Config(**sizes)
    if family == "gemma":
        return transformers.GemmaConfig(head_dim=8, **sizes)
    raise ValueError(f"no tiny decoder family {family!r}; families: {', '.join(FAMILIES)}")


def build_decoder(family: str, directory: Path, seed: int = 0) -> str:
    """Save a tiny random ``family`` model and its tokenizer in ``directory``."""
    import torch
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"no tiny decoder family {family!r}; families: {', '.join(FAMILIES)}")
    tokenizer, vocab = build_tokenizer(family)
    _, pad, eos = _SPECIALS[family]
    config = build_config(family, len(vocab), vocab["<s>"], vocab[eos], vocab[pad] if pad else None)
    torch.manual_seed(seed)
    model = transformers.AutoModel.from_config(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return str(directory)


def build_encoder(directory: Path, seed: int = 0, layers: int = 3) -> str:
    """Save a tiny random BERT (hidden size 32, ``layers`` blocks) with a WordPiece
    tokenizer trained on ``WORDS`` in ``directory``, for the ``hf_encoder`` backbone."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator([" ".join(WORDS) + " . ? : ,"], trainer=trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = transformers.BertTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    config = transformers.BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.token_to_id("[PAD]"),
    )
    torch.manual_seed(seed)
    model = transformers.BertModel(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    fast.save_pretrained(str(directory))
    return str(directory)
