import warnings

import pytest

from qpdeploy.errors import QPDeployError
from qpdeploy.miniworld.prompts import build_tokenizer
from qpdeploy.prompts import check_prompt_tokens, check_text, unknown_words


def caught(prompt, tokenizer):
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        check_prompt_tokens(tokenizer, prompt)
    return [str(r.message) for r in records]


def test_words_a_word_level_vocabulary_does_not_know_are_named_once():
    tokenizer = build_tokenizer()
    assert unknown_words(tokenizer, "a sks circle on the beach at sunset") == ["the", "beach", "at", "sunset"]
    lines = caught("a sks circle on the beach at sunset", tokenizer)
    assert lines == ["prompt has words this model's tokenizer does not know (read as '<unk>'): the, beach, at, sunset"]
    assert caught("a sks circle on a sky background", tokenizer) == []


def test_truncation_is_one_short_line_whatever_the_prompt_length():
    tokenizer = build_tokenizer()
    prompt = " ".join(["a sks circle on a sky background"] * 500)
    lines = caught(prompt, tokenizer)
    assert len(lines) == 1 and len(lines[0]) < 200
    assert lines[0].startswith(f"prompt has {len(tokenizer(prompt)['input_ids'])} tokens but the text encoder takes "
                               f"{tokenizer.model_max_length}: truncated to '...")


def test_text_that_is_not_utf8_is_refused_in_one_line():
    with pytest.raises(QPDeployError, match="^--prompt is not valid UTF-8 text$"):
        check_text("a sks \udcff dog", "--prompt")
    check_text("ein Hund am Strand, été, 犬", "--prompt")
