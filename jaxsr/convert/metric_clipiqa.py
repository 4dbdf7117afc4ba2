"""OpenAI CLIP RN50 weights and CLIP's BPE vocabulary -> params of `jaxsr.metrics.clipiqa`.

Takes two files:
  - the CLIP checkpoint: OpenAI's `RN50.pt`, the file `clip.load("RN50")` (and so pyiqa)
    downloads, from
    https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt
    (a TorchScript archive, float16), or a plain state dict of the same model saved with
    `torch.save(model.state_dict())` (.pt/.pth/.bin) or as .safetensors;
  - the tokenizer's vocabulary: `bpe_simple_vocab_16e6.txt.gz` (in OpenAI's CLIP
    repository, github.com/openai/CLIP, folder clip/, and in the `open_clip_torch`
    wheel on PyPI), or the `vocab.json` and `merges.txt` pair of a transformers CLIP
    tokenizer folder (e.g. openai/clip-vit-base-patch32 on Hugging Face).

The prompts' text features are computed here, once, by `jaxsr.models.clip_text` on the
converted text weights (OpenAI's text tower is transformers' CLIPTextModel with
quick_gelu; its keys are renamed to transformers' names, the packed attention
`in_proj_weight` split into q/k/v), then pooled at the end-of-text token, projected by
`text_projection` and L2-normalised. The returned params hold the image tower
(`visual`, the checkpoint's names), those features (`text_features`) and `logit_scale`.

Strict: every tensor of the checkpoint is used and shape-checked against the model its
own shapes describe (like OpenAI's `build_model`: stage depths from the `visual.layerN.i`
indices, widths from conv and norm shapes). Only these are accepted and left unused:
the TorchScript archive's `input_resolution`, `context_length` and `vocab_size`
scalars (OpenAI's `build_model` deletes them too) and BatchNorm `num_batches_tracked`
counters. The attention pool's positional embedding is converted though CLIPIQA never
adds it (see `jaxsr.metrics.clip_resnet`).

TorchScript archives are opened with `torch.jit.load` and only their state dict is read
(torch serves as a reader; the model's forward is never called). Loading an archive
compiles the TorchScript code it carries, so convert only files you trust.
"""

from __future__ import annotations

import functools
import gzip
import json
import pathlib
import re
import tempfile
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxsr.convert.networks import load_clip_text
from jaxsr.convert.readers import read_state_dict
from jaxsr.convert.tree import ConversionError, torch_to_flax
from jaxsr.metrics import clip_resnet
from jaxsr.metrics.clipiqa import PROMPT_PAIRS
from jaxsr.models.clip_text import CLIPTextConfig, CLIPTextModel

UNUSED_KEYS = (r"input_resolution", r"context_length", r"vocab_size",
               r"visual\..*\.num_batches_tracked")
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# OpenAI's tokenizer uses the first 49152 - 256 - 2 merges of the BPE file.
_N_MERGES = 49152 - 256 - 2
_SOT, _EOT = "<|startoftext|>", "<|endoftext|>"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


# ---------------------------------------------------------------- reading

def read_clip_checkpoint(path) -> dict[str, np.ndarray]:
    """A CLIP checkpoint as {key: numpy array}: a TorchScript archive through
    `torch.jit.load(...).state_dict()`, anything else through `read_state_dict`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP checkpoint {path} does not exist")
    if not _is_torchscript(path):
        return dict(read_state_dict(path))
    import torch

    module = torch.jit.load(str(path), map_location="cpu")
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in module.state_dict().items()}


def _is_torchscript(path: pathlib.Path) -> bool:
    """TorchScript archives are zips with a `<root>/code/` folder; torch.save zips are not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.split("/")[1:2] == ["code"] for name in z.namelist())


def byte_symbols() -> list[str]:
    """GPT-2/CLIP's 256 byte symbols in OpenAI's vocabulary order: the printable Latin-1
    bytes as themselves, then the other 68 bytes, in byte order, as chr(256), chr(257)..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def vocab_from_bpe(bpe_file) -> tuple[dict[str, int], list[str]]:
    """OpenAI's `bpe_simple_vocab_16e6.txt.gz` -> (vocab.json dict, merge lines), laid
    out as OpenAI's SimpleTokenizer builds them: the 256 byte symbols, the same with
    "</w>", one token per merge, then the two special tokens (49408 in all)."""
    with gzip.open(bpe_file, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1:_N_MERGES + 1]
    if len(merges) != _N_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"{bpe_file}: not CLIP's BPE file (expected {_N_MERGES} merge "
                         "lines of two symbols after the header)")
    chars = byte_symbols()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += [_SOT, _EOT]
    return {t: i for i, t in enumerate(tokens)}, merges


def load_clip_tokenizer(files: list[pathlib.Path]):
    """transformers' CLIPTokenizer from CLIP's BPE file or a vocab.json + merges.txt pair."""
    from transformers import CLIPTokenizer

    by_name = {f.name: f for f in files}
    if "vocab.json" in by_name and "merges.txt" in by_name:
        return CLIPTokenizer(str(by_name["vocab.json"]), str(by_name["merges.txt"]))
    bpe = [f for f in files if f.name.endswith(".txt.gz")]
    if len(bpe) != 1:
        raise FileNotFoundError("CLIPIQA conversion needs CLIP's tokenizer vocabulary: "
                                f"{BPE_FILE} (or vocab.json and merges.txt)")
    vocab, merges = vocab_from_bpe(bpe[0])
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                           encoding="utf-8")
        return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def prompt_ids(tokenizer, prompts, context_length: int = 77) -> np.ndarray:
    """clip.tokenize's ids: [SOT, tokens, EOT] then zeros to `context_length` (not
    truncated: a longer prompt is an error, as clip.tokenize's default). [P, L] int32."""
    out = np.zeros((len(prompts), context_length), np.int32)
    for row, prompt in zip(out, prompts):
        ids = tokenizer(prompt)["input_ids"]
        if len(ids) > context_length:
            raise ValueError(f"prompt {prompt!r} is longer than {context_length} tokens")
        row[:len(ids)] = ids
    return out


# ---------------------------------------------------------------- the checkpoint

def _count(state, pattern: str) -> int:
    r = re.compile(pattern)
    return len({m.group(1) for k in state if (m := r.match(k))})


def infer_configs(state, what: str) -> tuple[clip_resnet.ModifiedResNetConfig,
                                             CLIPTextConfig]:
    """(image tower config, text tower config) from the checkpoint's shapes."""
    needed = ("visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding",
              "visual.attnpool.c_proj.weight", "token_embedding.weight", "ln_final.weight",
              "positional_embedding", "text_projection")
    missing = [k for k in needed if k not in state]
    if missing:
        raise ConversionError(f"{what} (these keys give the model's sizes)", missing=missing)
    pos = state["visual.attnpool.positional_embedding"].shape[0]
    visual = clip_resnet.ModifiedResNetConfig(
        layers=tuple(_count(state, rf"visual\.layer{b}\.(\d+)\.") for b in range(1, 5)),
        width=state["visual.layer1.0.conv1.weight"].shape[0],
        output_dim=state["visual.attnpool.c_proj.weight"].shape[0],
        input_resolution=round((pos - 1) ** 0.5) * 32)
    width = state["ln_final.weight"].shape[0]
    text = CLIPTextConfig(
        vocab_size=state["token_embedding.weight"].shape[0], hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=_count(state, r"transformer\.resblocks\.(\d+)\."),
        num_attention_heads=width // 64,   # OpenAI's build_model
        max_position_embeddings=state["positional_embedding"].shape[0],
        hidden_act="quick_gelu", layer_norm_eps=1e-5,
        projection_dim=state["text_projection"].shape[1], bos_token_id=49406,
        eos_token_id=49407, pad_token_id=0)
    return visual, text


def _text_shapes(cfg: CLIPTextConfig) -> dict[str, tuple[int, ...]]:
    """Every text-side key of an OpenAI CLIP checkpoint with its torch shape."""
    w = cfg.hidden_size
    shapes = {"token_embedding.weight": (cfg.vocab_size, w),
              "positional_embedding": (cfg.max_position_embeddings, w),
              "ln_final.weight": (w,), "ln_final.bias": (w,),
              "text_projection": (w, cfg.projection_dim), "logit_scale": ()}
    for i in range(cfg.num_hidden_layers):
        p = f"transformer.resblocks.{i}."
        shapes.update({p + "attn.in_proj_weight": (3 * w, w), p + "attn.in_proj_bias": (3 * w,),
                       p + "attn.out_proj.weight": (w, w), p + "attn.out_proj.bias": (w,),
                       p + "ln_1.weight": (w,), p + "ln_1.bias": (w,),
                       p + "ln_2.weight": (w,), p + "ln_2.bias": (w,),
                       p + "mlp.c_fc.weight": (4 * w, w), p + "mlp.c_fc.bias": (4 * w,),
                       p + "mlp.c_proj.weight": (w, 4 * w), p + "mlp.c_proj.bias": (w,)})
    return shapes


_TEXT_RENAMES = (
    (r"token_embedding\.weight", "embeddings.token_embedding.weight"),
    (r"positional_embedding", "embeddings.position_embedding.weight"),
    (r"ln_final\.(weight|bias)", r"final_layer_norm.\1"),
    (r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)",
     r"encoder.layers.\1.self_attn.out_proj.\2"),
    (r"transformer\.resblocks\.(\d+)\.ln_(\d)\.(weight|bias)",
     r"encoder.layers.\1.layer_norm\2.\3"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"encoder.layers.\1.mlp.fc1.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"encoder.layers.\1.mlp.fc2.\2"),
)


def _to_transformers(text: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """OpenAI text-tower keys -> transformers CLIPTextModel keys (torch layout); the packed
    in_proj rows are [q; k; v]. Shapes were checked before."""
    out = {}
    for key, value in text.items():
        if m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
                out[f"encoder.layers.{m[1]}.self_attn.{name}.{m[2]}"] = part
            continue
        for pattern, repl in _TEXT_RENAMES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
    return out


@functools.cache
def _text_encoder(cfg: CLIPTextConfig):
    """One compiled text tower per config: a conversion of the same model twice (e.g.
    RN50.pt and its state-dict copy) compiles once."""
    return jax.jit(CLIPTextModel(cfg).apply)


def text_features(text_params, projection, cfg: CLIPTextConfig, ids) -> np.ndarray:
    """Unit text features [P, D]: the EOT token (the largest id of each row, as CLIP picks
    it) after ln_final, times `projection` [W, D]."""
    eot = np.argmax(ids, axis=-1)
    # Attention is causal, so the EOT token's state does not depend on the padding
    # after it: the tower runs on the columns up to the last EOT only.
    ids = np.asarray(ids[:, :eot.max() + 1], np.int32)
    with jax.default_matmul_precision("highest"):
        hidden = _text_encoder(cfg)({"params": text_params}, ids)
        feats = hidden[jnp.arange(ids.shape[0]), eot] @ jnp.asarray(projection)
        feats = feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)
    return np.asarray(feats, np.float32)


def convert(files: list[pathlib.Path]) -> tuple[dict, dict]:
    """RN50.pt (or its state dict) and the BPE vocabulary -> (config, params).

    config: {"backbone": "RN50" or "custom", "visual": the image tower's sizes,
    "prompts": the prompt pairs}; params: {"visual", "text_features", "logit_scale"}.
    Raises:
      ConversionError listing every missing, unexpected and misshaped key;
      FileNotFoundError when a file is missing or no checkpoint / vocabulary is given.
    """
    files = [pathlib.Path(f) for f in files]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} does not exist")
    checkpoints = [f for f in files if f.suffix in _CHECKPOINT_SUFFIXES]
    if len(checkpoints) != 1:
        raise FileNotFoundError("CLIPIQA conversion needs exactly one CLIP checkpoint "
                                f"(RN50.pt), got {[f.name for f in checkpoints]}")
    vocabulary = [f for f in files if f not in checkpoints]
    names = {f.name for f in vocabulary}
    if not ({"vocab.json", "merges.txt"} <= names or any(n.endswith(".txt.gz") for n in names)):
        raise FileNotFoundError("CLIPIQA conversion needs CLIP's tokenizer vocabulary: "
                                f"{BPE_FILE} (or vocab.json and merges.txt)")
    what = f"CLIP checkpoint {checkpoints[0].name}"
    towers = convert_towers(read_clip_checkpoint(checkpoints[0]), what)
    return with_text_features(towers, load_clip_tokenizer(vocabulary))


def convert_state(state: dict, tokenizer, *, what: str = "CLIP checkpoint") -> tuple[dict, dict]:
    """`convert` on a checkpoint already read ({key: numpy array}) and a CLIP tokenizer
    (`load_clip_tokenizer`)."""
    return with_text_features(convert_towers(state, what), tokenizer)


def convert_towers(state: dict, what: str) -> dict:
    """The strict part: {"visual": (config, Flax params), "text": (config, Flax params),
    "text_projection", "logit_scale"} from an OpenAI CLIP state dict.
    Raises ConversionError listing every missing, unexpected and misshaped key."""
    visual_cfg, text_cfg = infer_configs(state, what)

    # The image tower: the generic rule, errors naming the file's keys.
    visual_state = {k: v for k, v in state.items() if k.startswith("visual.")}
    missing, unexpected, mismatched, visual = [], [], [], None
    try:
        visual = torch_to_flax(visual_state, {"visual": clip_resnet.param_shapes(visual_cfg)},
                               what=what, ignore=UNUSED_KEYS, dtype=np.float32)["visual"]
    except ConversionError as e:
        # A misshaped tensor is reported once, as misshaped (the rule also calls it missing).
        misshaped = {m.split(":")[0] for m in e.mismatched}
        missing = [k for k in e.missing if k not in misshaped]
        unexpected, mismatched = e.unexpected, e.mismatched

    # The text tower: checked at the checkpoint's names, then renamed.
    want = _text_shapes(text_cfg)
    rest = {k: v for k, v in state.items() if not k.startswith("visual.")
            and not any(re.fullmatch(p, k) for p in UNUSED_KEYS)}
    missing += [k for k in want if k not in rest]
    unexpected += [k for k in rest if k not in want]
    mismatched += [f"{k}: {list(np.shape(v))} vs {list(want[k])}" for k, v in rest.items()
                   if k in want and tuple(np.shape(v)) != want[k]]
    if missing or unexpected or mismatched:
        raise ConversionError(what, missing, unexpected, mismatched)

    text = {k: np.asarray(v, np.float32) for k, v in rest.items()}
    return {"visual": (visual_cfg, visual),
            "text": (text_cfg, load_clip_text(_to_transformers(text), text_cfg, what=what)),
            "text_projection": text["text_projection"], "logit_scale": text["logit_scale"]}


def with_text_features(towers: dict, tokenizer) -> tuple[dict, dict]:
    """`convert_towers`' output -> the metric's (config, params): the prompts' features."""
    visual_cfg, visual = towers["visual"]
    text_cfg, text_params = towers["text"]
    prompts = [p for pair in PROMPT_PAIRS for p in pair]
    ids = prompt_ids(tokenizer, prompts, text_cfg.max_position_embeddings)
    if ids.max() >= text_cfg.vocab_size:
        raise ValueError(f"the vocabulary's ids reach {ids.max()}, the checkpoint's "
                         f"token_embedding has {text_cfg.vocab_size} rows")
    params = {"visual": visual,
              "text_features": text_features(text_params, towers["text_projection"],
                                             text_cfg, ids),
              "logit_scale": np.asarray(towers["logit_scale"], np.float32)}
    backbone = "RN50" if visual_cfg == clip_resnet.RN50 else "custom"
    config = {"backbone": backbone, "visual": visual_cfg.to_dict(),
              "prompts": [list(p) for p in PROMPT_PAIRS]}
    return config, params
