"""The miniworld tokenizer: every caption round-trips, identifiers have their own ids."""

import numpy as np

from qpdeploy.miniworld import prompts as P
from qpdeploy.miniworld import subjects as S
from qpdeploy.miniworld import world as W


def _captions() -> list[str]:
    rng = np.random.default_rng(0)
    texts = [P.describe(W.random_scene(rng), rng).text for _ in range(200)]
    texts += [p.text for p in P.heldout_prompts(templates=(0, 1, 2, 3))]
    texts += [p.text for s in S.SUBJECTS.values() for split in S.SPLITS for p in s.prompts(split)]
    return texts


def test_world_captions_round_trip():
    tokenizer = P.build_tokenizer()
    texts = _captions()
    batch = tokenizer(texts, padding="max_length", max_length=P.MAX_LENGTH, truncation=True)
    ids = np.array(batch["input_ids"])
    assert ids.shape == (len(texts), P.MAX_LENGTH)
    assert not (ids == tokenizer.unk_token_id).any()
    assert (ids == tokenizer.eos_token_id).sum() == len(texts)  # no caption was truncated
    assert tokenizer.batch_decode(ids, skip_special_tokens=True) == texts


def test_vocabulary_and_identifiers():
    tokenizer = P.build_tokenizer()
    assert len(tokenizer) == 4 + len(P.vocabulary()) == 42  # 9 glue words, 8 colours, 5 shapes, 8 backgrounds, 8 identifiers
    for identifier in P.IDENTIFIERS:
        ids = tokenizer(f"a {identifier} circle")["input_ids"]
        assert ids[2] == tokenizer.convert_tokens_to_ids(identifier) != tokenizer.unk_token_id
    assert set(S.SUBJECTS) <= set(P.IDENTIFIERS)
    longest = P.Prompt("triangle", "orange", "ocean", identifier="sks", template=1).text
    assert len(tokenizer(longest)["input_ids"]) == 13 <= P.MAX_LENGTH
