"""Tiny randomly initialised decoder LLMs of every supported family, for tests.

Each family gets a two-layer model with a byte-level BPE tokenizer whose special tokens
mimic the real family: Llama, Mistral and Gemma prepend BOS; GPT-2 and Qwen2 do not;
GPT-2 and Mistral ship no pad token (the backbone must fall back to EOS). Building one
takes well under a second, so tests build them into ``tmp_path`` freely.
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gpt2")

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
    raise ValueError(family)


def build_decoder(family: str, directory: Path, seed: int = 0) -> str:
    """Save a tiny random ``family`` model and its tokenizer in ``directory``."""
    import torch
    import transformers

    tokenizer, vocab = build_tokenizer(family)
    _, pad, eos = _SPECIALS[family]
    config = build_config(family, len(vocab), vocab["<s>"], vocab[eos], vocab[pad] if pad else None)
    torch.manual_seed(seed)
    model = transformers.AutoModel.from_config(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return str(directory)
