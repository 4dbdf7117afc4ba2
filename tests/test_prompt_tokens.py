"""On-device tag prompts equal the CLIP tokenizer's ids of the joined tag string."""

import json

import jax
import numpy as np
import pytest

from jaxsr.demo import write_tokenizer
from jaxsr.models.tags import SEPARATOR, load_tag_list
from jaxsr.models.tokenizer import load_tokenizer, tokenize
from jaxsr.train.prompt_tokens import TagTokenTable, prompt_ids


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The character-level vocabulary plus BPE merges that build some whole words, so
    tags become a mix of merged words and single characters, as with the real one."""
    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    write_tokenizer(folder)
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = []
    for word in ("dog", "cat", "man", "tree", "sky", "water", "red"):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:       # merge left to right: d o -> do, do g</w> -> dog</w>
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return load_tokenizer(folder)


def test_prompt_ids_equal_the_tokenizer(tokenizer):
    tags = load_tag_list()
    table = TagTokenTable.build(tokenizer, tags)
    assert table.lengths.max() > 1 and (table.ids >= 0).all()
    rng = np.random.default_rng(0)
    # From no tag to many: the long rows exercise truncation at 75 text tokens.
    rates = [0.0, 0.0005, 0.001, 0.002, 0.005, 0.05]
    fired = np.stack([rng.random(len(tags)) < r for r in rates])
    fired[1, tags.index("dog")] = True               # a merged word among the tags
    got = np.asarray(jax.jit(lambda f: prompt_ids(table, f))(fired))
    want = tokenize(tokenizer, [SEPARATOR.join(t for t, f in zip(tags, row) if f)
                                for row in fired])
    np.testing.assert_array_equal(got, want)
    assert (want[-1] != tokenizer.pad_token_id).all()   # the long row really is truncated
    assert (want[0, 2:] == tokenizer.pad_token_id).all()
