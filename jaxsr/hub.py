"""Weights by Hugging Face Hub id: `org/name[/path/in/repo]` where a local path is taken.

    resolve_weights("stabilityai/stable-diffusion-2-base", "diffusers")   # a local folder
    resolve_weights("org/seesr-release/preset/models/seesr", "seesr")
    resolve_weights("org/seesr-release/preset/models/DAPE.pth", "file")

A string that names an existing file or folder is always that path. Anything else
shaped like `org/name[/sub/path]` is fetched with `huggingface_hub.snapshot_download`,
limited (`allow_patterns`) to the files the converters read for that kind of source, so
e.g. a model repo's multi-GB single-file checkpoints and fp16 copies are never
downloaded beside its diffusers folders. The library's own settings apply unchanged:
the cache (`HF_HOME`, `HF_HUB_CACHE`), the token (`HF_TOKEN`, `hf auth login`) and
offline mode (`HF_HUB_OFFLINE=1`: only what the cache holds).

Kinds (what the converters read):
    diffusers   a diffusers pipeline folder: model_index.json, scheduler/, tokenizer/,
                {unet,vae}/ and text_encoder/ configs and weights
    seesr       SeeSR's folder: {unet,controlnet}/ configs and weights
    tokenizer   a CLIP tokenizer folder (json and txt files)
    file        one checkpoint file (and, with `siblings`, named files beside it)
    sd          `diffusers`, or `file` when the path ends in a checkpoint suffix
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path, PurePosixPath

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pth", ".pt")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*"
                      r"(/[A-Za-z0-9._+-]+)*$")

# Weight files per module folder: the full-precision safetensors first; the pickle,
# fp16 and sharded variants only when a repo has no such file (a second, narrower fetch).
_PREFERRED = {"diffusers": {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                            "text_encoder": "model"},
              "seesr": {"unet": "diffusion_pytorch_model",
                        "controlnet": "diffusion_pytorch_model"}}
_PICKLE_NAMES = {"diffusion_pytorch_model": "diffusion_pytorch_model.bin",
                 "model": "pytorch_model.bin"}


@dataclasses.dataclass(frozen=True)
class HubSource:
    """Where a hub id resolved to. commit: the snapshot's commit hash."""

    repo_id: str
    path_in_repo: str
    revision: str
    commit: str
    local_path: Path

    def record(self) -> dict:
        return {"repo_id": self.repo_id, "path_in_repo": self.path_in_repo,
                "revision": self.revision, "commit": self.commit}


def looks_like_repo_id(text: str) -> bool:
    """`org/name[/sub/path]`, not absolute, not relative (./, ../, ~), no backslashes."""
    return bool(_REPO_ID.match(text)) and ".." not in text.split("/")


def split_repo_id(text: str) -> tuple[str, str]:
    """'org/name/a/b' -> ('org/name', 'a/b')."""
    parts = text.split("/")
    return "/".join(parts[:2]), "/".join(parts[2:])


def _join(sub: str, name: str) -> str:
    return str(PurePosixPath(sub) / name) if sub else name


def _module_patterns(sub: str, modules: dict[str, str], fallback: bool) -> list[str]:
    out = []
    for folder, stem in modules.items():
        base = _join(sub, folder)
        out.append(f"{base}/config.json")
        if fallback:     # everything find_weights accepts after the preferred file
            out += [f"{base}/{_PICKLE_NAMES[stem]}", f"{base}/{stem}.fp16.safetensors",
                    f"{base}/{stem}.fp16.bin", f"{base}/{stem}*.index.json",
                    f"{base}/{stem}-*-of-*.safetensors", f"{base}/{stem}-*-of-*.bin"]
        else:
            out.append(f"{base}/{stem}.safetensors")
    return out


def allow_patterns(kind: str, sub: str, *, fallback: bool = False,
                   siblings: tuple[str, ...] = ()) -> list[str]:
    """The files a converter reads from a `kind` source at `sub` in the repo."""
    if kind == "diffusers":
        patterns = [_join(sub, "model_index.json"), _join(sub, "scheduler/*.json"),
                    _join(sub, "tokenizer/*.json"), _join(sub, "tokenizer/*.txt")]
        return patterns + _module_patterns(sub, _PREFERRED["diffusers"], fallback)
    if kind == "seesr":
        return _module_patterns(sub, _PREFERRED["seesr"], fallback)
    if kind == "tokenizer":
        return [_join(sub, "*.json"), _join(sub, "*.txt")]
    if kind == "file":
        if not sub:
            raise ValueError("name the file inside the repo: org/name/path/to/file")
        parent = str(PurePosixPath(sub).parent)
        return [sub] + [_join("" if parent == "." else parent, s) for s in siblings]
    raise ValueError(f"unknown hub source kind {kind!r}")


def _missing_weights(root: Path, kind: str) -> bool:
    """Whether a module folder lacks its preferred weights file after the first fetch."""
    return any(not (root / folder / f"{stem}.safetensors").is_file()
               for folder, stem in _PREFERRED.get(kind, {}).items())


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _download(repo_id: str, revision: str | None, patterns: list[str], spec: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, EntryNotFoundError) as e:
        where = (" and offline mode is on (HF_HUB_OFFLINE=1), so only the local Hugging Face "
                 "cache was searched" if _offline() else "")
        raise FileNotFoundError(
            f"{spec}: not a local path, and the Hugging Face repo {repo_id!r}"
            f"{'' if revision is None else f' at revision {revision!r}'} is not available"
            f"{where} ({type(e).__name__})") from None
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise FileNotFoundError(f"{spec}: not a local path, and the Hugging Face Hub has no "
                                f"accessible repo {repo_id!r}"
                                f"{'' if revision is None else f' at revision {revision!r}'} "
                                f"(check the id, the revision and your token: "
                                f"{type(e).__name__})") from None
    except IncompleteSnapshotError as e:
        raise FileNotFoundError(f"{spec}: the cached snapshot of {repo_id!r} lacks files the "
                                f"converter reads ({e})") from None
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"{spec}: downloading {repo_id!r} failed: {e}") from None


def resolve_weights(spec, kind: str, *, revision: str | None = None,
                    siblings: tuple[str, ...] = ()) -> tuple[Path, HubSource | None]:
    """A local path for `spec` (returned as is when it exists or is not hub-shaped),
    and where it came from when it was a hub id (else None)."""
    text = str(spec)
    if spec is None or os.path.exists(text) or not looks_like_repo_id(text):
        return (None if spec is None else Path(spec)), None
    repo_id, sub = split_repo_id(text)
    if kind == "sd":
        kind = "file" if sub.endswith(CHECKPOINT_SUFFIXES) else "diffusers"
    root = _download(repo_id, revision, allow_patterns(kind, sub, siblings=siblings), text)
    local = root / sub if sub else root
    if kind == "file" and not local.is_file():
        raise FileNotFoundError(f"{text}: the Hugging Face repo {repo_id!r} has no file {sub!r}")
    if kind != "file" and not local.is_dir():
        raise FileNotFoundError(f"{text}: the Hugging Face repo {repo_id!r} has no folder "
                                f"{sub or '/'!r} with the files a {kind} source needs")
    if _missing_weights(local, kind):
        root = _download(repo_id, revision, allow_patterns(kind, sub, fallback=True), text)
    return local, HubSource(repo_id=repo_id, path_in_repo=sub, revision=revision or "main",
                            commit=root.name, local_path=local)


def record_in_manifest(folder, sources: dict[str, HubSource]) -> None:
    """Add {"hub": {option: {repo_id, path_in_repo, revision, commit}}} to a converted
    folder's manifest (rewritten atomically, as `save_converted` writes it)."""
    if not sources:
        return
    path = Path(folder) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["hub"] = {option: src.record() for option, src in sources.items()}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)
