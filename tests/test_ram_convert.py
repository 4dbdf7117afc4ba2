"""RAM + DAPE LoRA checkpoint conversion: exactly the released key sets
(tests/data/keys/ram_swin_large_14m.tsv, dape_lora.tsv), strictness, LoRA merge.

The fast tests use the released key names with every width shrunk consistently
(Swin widths /8, BERT 768/3072/512 -> 32/64/16); heads, window (12), depths
(2, 2, 18, 2), image size (384), class count and LoRA rank stay real. The slow test
converts random tensors at the real shapes.
"""

import math
import re

import numpy as np
import pytest
from flax import traverse_util

from jaxsr.convert.ram import load_ram
from jaxsr.convert.tree import ConversionError
from jaxsr.models.dape import DAPEConfig, count_params, param_shapes
from jaxsr.models.swin import swin_large_384
from tests.keylists import read_listing

RAM_LISTING = "ram_swin_large_14m.tsv"
LORA_LISTING = "dape_lora.tsv"
# What SeeSR never uses, written here independently of the loader's list.
UNUSED = re.compile(r"(tag_encoder|text_decoder)\..*|.*\.(relative_position_index|attn_mask)")
BERT_SHRINK = {768: 32, 3072: 64, 512: 16, 1536: 192}


def shrink(key, shape):
    if key.startswith("visual_encoder."):
        return tuple(d // 8 if d % 192 == 0 else d for d in shape)
    return tuple(BERT_SHRINK.get(d, d) for d in shape)


def random_state(listing, rng, shrink_fn=shrink):
    return {k: rng.standard_normal(shrink_fn(k, s)).astype(np.float32)
            for k, s in read_listing(listing).items()}


def used_param_count(state):
    return sum(math.prod(v.shape) for k, v in state.items() if not UNUSED.fullmatch(k))


@pytest.fixture(scope="module")
def shrunk():
    rng = np.random.default_rng(0)
    ram = random_state(RAM_LISTING, rng)
    for k in list(ram):   # the released file ties these: same tensor under both names
        if k.startswith("tagging_head."):
            ram[k.replace("tagging_head.", "tag_encoder.")] = ram[k]
    lora = random_state(LORA_LISTING, rng)
    return ram, lora, load_ram(ram, lora)


def _flat(params):
    return traverse_util.flatten_dict(params)


def test_listing_key_sets_are_the_released_ones():
    ram, lora = read_listing(RAM_LISTING), read_listing(LORA_LISTING)
    assert len(ram) == 1042 and len(lora) == 248
    assert sum(math.prod(s) for s in lora.values()) == 1_777_664


def test_shrunk_release_converts_and_merges(shrunk):
    ram, lora, (cfg, params) = shrunk
    real = swin_large_384()
    assert (cfg.swin.depths, cfg.swin.num_heads, cfg.swin.window_size, cfg.swin.img_size,
            cfg.swin.patch_size, cfg.swin.embed_dim) == (real.depths, real.num_heads, 12, 384,
                                                          4, 24)
    assert (cfg.num_classes, cfg.embed_width, cfg.head.hidden_size, cfg.head.num_hidden_layers,
            cfg.head.intermediate_size, cfg.lora_rank) == (4585, 16, 32, 2, 64, 0)
    assert count_params(params) == used_param_count(ram)
    flat = _flat(params)
    # Plain tensors: Linear transposed, conv to HWIO, norm weight -> scale, raw param kept.
    w = ram["visual_encoder.layers.2.blocks.17.mlp.fc2.weight"]
    np.testing.assert_array_equal(
        flat[("visual_encoder", "layers_2", "blocks_17", "mlp", "fc2", "kernel")], w.T)
    np.testing.assert_array_equal(
        flat[("visual_encoder", "patch_embed", "proj", "kernel")],
        ram["visual_encoder.patch_embed.proj.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        flat[("tagging_head", "encoder", "layer_1", "output", "LayerNorm", "scale")],
        ram["tagging_head.encoder.layer.1.output.LayerNorm.weight"])
    np.testing.assert_array_equal(flat[("label_embed",)], ram["label_embed"])
    # Swin qkv: q and v rows get B·A/8 of their halves, k rows are untouched.
    base = "visual_encoder.layers.1.blocks.1.attn.qkv"
    w, a, b = ram[f"{base}.weight"], lora[f"{base}.lora_A"], lora[f"{base}.lora_B"]
    d = w.shape[1]
    want = w.copy()
    want[:d] += b[:d] @ a[:8] / 8
    want[2 * d:] += b[d:] @ a[8:] / 8
    got = flat[("visual_encoder", "layers_1", "blocks_1", "attn", "qkv", "kernel")].T
    np.testing.assert_array_equal(got[d:2 * d], w[d:2 * d])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # Tied head query/key: both the tagging_head and the tag_encoder updates.
    for proj in ("query", "key", "value"):
        head = f"tagging_head.encoder.layer.0.crossattention.self.{proj}"
        twin = head.replace("tagging_head", "tag_encoder")
        want = ram[f"{head}.weight"].copy()
        if proj != "value":
            want += (lora[f"{head}.lora_B"] @ lora[f"{head}.lora_A"]
                     + lora[f"{twin}.lora_B"] @ lora[f"{twin}.lora_A"]) / 8
        got = flat[("tagging_head", "encoder", "layer_0", "crossattention", "self", proj,
                    "kernel")].T
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_vision_multi_names_and_model_wrapper(shrunk):
    ram, lora, (_, params) = shrunk
    renamed = {k.replace("tagging_head", "vision_multi"): v for k, v in ram.items()}
    _, again = load_ram({"model": renamed}, lora)
    fa, fb = _flat(params), _flat(again)
    assert fa.keys() == fb.keys()
    assert all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_unused_lora_is_optional(shrunk):
    ram, lora, (_, params) = shrunk
    used = {k: v for k, v in lora.items()
            if not k.startswith("text_decoder.")
            and not re.match(r"tag_encoder\.encoder\.layer\.([2-9]|1\d)\.|"
                             r"tag_encoder\.encoder\.layer\.\d+\.attention\.", k)}
    assert len(used) == 48 + 8 + 8
    _, again = load_ram(ram, used)
    fa, fb = _flat(params), _flat(again)
    assert all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_plain_ram_and_unmerged_trees(shrunk):
    ram, lora, _ = shrunk
    cfg, params = load_ram(ram, None)
    assert cfg.lora_rank == 0 and count_params(params) == used_param_count(ram)
    cfg_u, unmerged = load_ram(ram, lora, merge=False)
    lora_used = sum(v.size for k, v in lora.items()
                    if k.startswith(("visual_encoder.", "tagging_head.")))
    assert cfg_u.lora_rank == 8 and count_params(unmerged) == used_param_count(ram) + lora_used
    np.testing.assert_array_equal(
        _flat(unmerged)[("visual_encoder", "layers_3", "blocks_1", "attn", "qkv", "lora_B")],
        lora["visual_encoder.layers.3.blocks.1.attn.qkv.lora_B"])


def _expect_error(ram, lora, kind, key):
    with pytest.raises(ConversionError) as e:
        load_ram(ram, lora)
    found = getattr(e.value, kind)
    assert len(found) == 1 and found[0].split(":")[0] == key, str(e.value)
    assert key in str(e.value)


RAM_REMOVED = ["visual_encoder.layers.2.blocks.9.attn.proj.bias", "label_embed",
               "tagging_head.encoder.layer.1.crossattention.self.value.weight",
               "visual_encoder.layers.3.blocks.1.mlp.fc1.weight", "fc.bias"]
RAM_ADDED = ["visual_encoder.layers.1.blocks.0.attn.extra_scale",
             "tagging_head.encoder.layer.0.attention.self.query.weight",
             "tagging_head.embeddings.word_embeddings.weight", "head.weight"]
RAM_RESHAPED = ["tagging_head.encoder.layer.1.output.dense.weight",
                "visual_encoder.layers.3.blocks.1.attn.relative_position_bias_table",
                "visual_encoder.layers.0.downsample.reduction.weight", "image_proj.bias"]


@pytest.mark.parametrize("key", RAM_REMOVED)
def test_ram_missing_key_is_named(shrunk, key):
    ram, lora, _ = shrunk
    _expect_error({k: v for k, v in ram.items() if k != key}, lora, "missing", key)


@pytest.mark.parametrize("key", RAM_ADDED)
def test_ram_extra_key_is_named(shrunk, key):
    ram, lora, _ = shrunk
    _expect_error({**ram, key: np.zeros((4, 4), np.float32)}, lora, "unexpected", key)


@pytest.mark.parametrize("key", RAM_RESHAPED)
def test_ram_misshaped_key_is_named(shrunk, key):
    ram, lora, _ = shrunk
    bad = np.zeros(tuple(d + 1 for d in ram[key].shape), np.float32)
    _expect_error({**ram, key: bad}, lora, "mismatched", key)


LORA_REMOVED = ["visual_encoder.layers.2.blocks.11.attn.qkv.lora_B",
                "tagging_head.encoder.layer.1.crossattention.self.query.lora_A",
                "tag_encoder.encoder.layer.1.crossattention.self.key.lora_A"]
LORA_ADDED = ["visual_encoder.layers.0.blocks.0.attn.proj.lora_A",
              "tag_encoder.encoder.layer.3.intermediate.dense.lora_A",
              "visual_encoder.layers.0.blocks.2.attn.qkv.lora_A", "something.lora_B",
              "visual_encoder.layers.0.blocks.0.attn.qkv.lora_C"]
LORA_RESHAPED = ["tagging_head.encoder.layer.0.crossattention.self.key.lora_A",
                 "visual_encoder.layers.3.blocks.0.attn.qkv.lora_B",
                 "text_decoder.bert.encoder.layer.5.crossattention.self.key.lora_A"]


@pytest.mark.parametrize("key", LORA_REMOVED)
def test_lora_missing_key_is_named(shrunk, key):
    ram, lora, _ = shrunk
    _expect_error(ram, {k: v for k, v in lora.items() if k != key}, "missing", key)


@pytest.mark.parametrize("key", LORA_ADDED)
def test_lora_extra_key_is_named(shrunk, key):
    ram, lora, _ = shrunk
    _expect_error(ram, {**lora, key: np.zeros((8, 24), np.float32)}, "unexpected", key)


@pytest.mark.parametrize("key", LORA_RESHAPED)
def test_lora_misshaped_key_is_named(shrunk, key):
    ram, lora, _ = shrunk
    bad = np.zeros(tuple(d + 1 for d in lora[key].shape), np.float32)
    _expect_error(ram, {**lora, key: bad}, "mismatched", key)


@pytest.mark.slow
def test_full_size_release_converts():
    """Random tensors at the released shapes (the ~215M used ones allocated, the unused
    Tag2Text encoder/decoder as zero-stride views): config, tree and parameter count."""
    rng = np.random.default_rng(0)
    ram = {}
    for key, shape in read_listing(RAM_LISTING).items():
        if UNUSED.fullmatch(key):
            ram[key] = np.broadcast_to(np.float32(0.5), shape)
        else:
            ram[key] = rng.standard_normal(shape, dtype=np.float32)
    lora = {k: rng.standard_normal(s, dtype=np.float32) * 0.01
            for k, s in read_listing(LORA_LISTING).items()}
    cfg, params = load_ram(ram, lora)
    assert cfg.swin == swin_large_384() and cfg == DAPEConfig(swin=cfg.swin)
    assert count_params(params) == used_param_count(ram) == 212_117_045
    shapes = {k: v.shape for k, v in _flat(param_shapes(cfg)).items()}
    assert {k: v.shape for k, v in _flat(params).items()} == shapes
    assert _flat(params)[("visual_encoder", "layers_3", "blocks_1", "attn",
                          "relative_position_bias_table")].shape == (529, 48)
