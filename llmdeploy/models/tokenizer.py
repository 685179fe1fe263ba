"""A small byte-level tokenizer built locally, so that tests and tiny models need no download."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<|endoftext|>", "<pad>", "<unk>")


def byte_level_tokenizer(model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level tokenizer with 256 byte tokens plus 3 specials (259 in all).

    Every string round-trips exactly (bytes are the vocabulary), and it is built from code,
    deterministically, in milliseconds.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=model_max_length,
    )
    return tok
