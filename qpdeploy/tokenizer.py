"""Word-level tokenizers for the small models that ship with and test qpdeploy.

Real Stable Diffusion models bring their own CLIP BPE tokenizer; the tiny and bundled
models use a closed word vocabulary instead (no vocabulary file to download). The result
is a ``transformers.PreTrainedTokenizerFast`` that diffusers pipelines call exactly like
CLIPTokenizer (``padding="max_length"``, ``truncation=True``, ``batch_decode``).
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def build_word_tokenizer(words: Iterable[str], max_length: int = 16):
    """Build a lower-casing, whitespace-splitting word tokenizer.

    Args:
        words: vocabulary words (duplicates and case are ignored; order is kept).
        max_length: ``model_max_length``: prompts are padded / truncated to it,
            ``<bos>`` and ``<eos>`` included.

    Returns:
        A ``PreTrainedTokenizerFast`` with ids 0..3 for ``<pad> <unk> <bos> <eos>``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    # Punctuation splits off so that "beach," and "beach" share one id.
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>",
        special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )
