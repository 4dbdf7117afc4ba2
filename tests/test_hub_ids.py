"""`jaxsr convert` by Hugging Face Hub id, offline: a Hugging Face cache folder built in
the layout huggingface_hub writes (blobs/, snapshots/<commit>/ links, refs/<revision>,
trees/<commit>.json) holds a tiny SD2 repo and a tiny SeeSR repo; with HF_HUB_OFFLINE=1
and HF_HOME pointing at it, repo ids convert to the same weights as the local folders.

Each repo's tree listing also names files the converter must not fetch (the
single-file checkpoint, fp16 and .bin copies) that the cache does not hold: the
library refuses a snapshot that lacks a file the allow_patterns ask for, so the
conversion succeeding shows the patterns leave them out."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from huggingface_hub import get_cached_repo_tree, scan_cache_dir, snapshot_download
from huggingface_hub.errors import IncompleteSnapshotError
from huggingface_hub.file_download import repo_folder_name

from jaxsr.convert.cache import load_converted, read_manifest
from jaxsr.hub import allow_patterns, looks_like_repo_id, split_repo_id
from tests.test_convert_seesr_cli import _convert, write_tiny_release

SD_REPO, SEESR_REPO = "tiny-org/sd2-base", "tiny-org/seesr-release"
SEESR_SUB = "preset/models"
# Files a real release has beside the ones the converter reads: listed, never cached.
DECOYS = {SD_REPO: ["v2-base-ema.ckpt", "unet/diffusion_pytorch_model.bin",
                    "unet/diffusion_pytorch_model.fp16.safetensors",
                    "vae/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin",
                    "README.md"],
          SEESR_REPO: ["README.md", "preset/test_datasets/lr.png",
                       f"{SEESR_SUB}/seesr/unet/diffusion_pytorch_model.bin"]}
LFS = (".safetensors", ".bin", ".pth", ".ckpt", ".png")


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_cached_repo(hf_home, repo_id, files: dict[str, bytes], revisions, listed_only=()):
    """One model repo in HF_HOME/hub as huggingface_hub lays it out: each file's bytes
    in blobs/<etag> (sha256 for LFS files, the git blob sha1 otherwise), relative
    links under snapshots/<commit>/, refs/<name> holding the commit, and the tree
    listing of the commit (including `listed_only` files that are not cached)."""
    storage = hf_home / "hub" / repo_folder_name(repo_id=repo_id, repo_type="model")
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    listing = {}
    for path, data in sorted(files.items()):
        sha1, sha256 = _git_blob_sha1(data), hashlib.sha256(data).hexdigest()
        lfs = path.endswith(LFS)
        blob = storage / "blobs" / (sha256 if lfs else sha1)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        listing[path] = {"size": len(data), "blob_id": sha1,
                         **({"lfs_sha256": sha256, "lfs_size": len(data)} if lfs else {})}
    for path in listed_only:
        listing[path] = {"size": 1, "blob_id": _git_blob_sha1(path.encode())}
    (storage / "trees").mkdir(parents=True)
    (storage / "trees" / f"{commit}.json").write_text(
        json.dumps({"format_version": 1, "files": listing}))
    (storage / "refs").mkdir()
    for name in revisions:
        (storage / "refs" / name).write_text(commit)
    return commit


def _files(folder, prefix=""):
    return {prefix + p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    release = write_tiny_release(tmp_path_factory.mktemp("release"))
    hf_home = tmp_path_factory.mktemp("hf_home")
    seesr_files = {**_files(release / "seesr", f"{SEESR_SUB}/seesr/"),
                   f"{SEESR_SUB}/ram_swin_large_14m.pth":
                       (release / "ram_swin_large_14m.pth").read_bytes(),
                   f"{SEESR_SUB}/DAPE.pth": (release / "DAPE.pth").read_bytes()}
    commits = {SD_REPO: write_cached_repo(hf_home, SD_REPO, _files(release / "sd2"),
                                          ("main", "v1"), DECOYS[SD_REPO]),
               SEESR_REPO: write_cached_repo(hf_home, SEESR_REPO, seesr_files, ("main", "v1"),
                                             DECOYS[SEESR_REPO])}
    return release, hf_home, commits


def _offline_convert(hf_home, *args):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "jaxsr.cli", "convert", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_repo_id_shapes():
    assert looks_like_repo_id("stabilityai/stable-diffusion-2-base")
    assert looks_like_repo_id("org/name/preset/models/DAPE.pth")
    for local in ("/abs/path", "./rel/path", "../up/x", "~/x", "single", "a/../b", "a\\b/c"):
        assert not looks_like_repo_id(local), local
    assert split_repo_id("org/name/a/b.pth") == ("org/name", "a/b.pth")


def test_the_cache_is_the_library_layout(hub):
    """huggingface_hub itself reads the folder: its cache scan, its tree listing, and
    snapshot_download without network, by branch and by tag."""
    _, hf_home, commits = hub
    cache = hf_home / "hub"
    info = scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    assert {r.repo_id for r in info.repos} == {SD_REPO, SEESR_REPO}
    patterns = {SD_REPO: allow_patterns("diffusers", ""),
                SEESR_REPO: allow_patterns("seesr", f"{SEESR_SUB}/seesr")
                + allow_patterns("file", f"{SEESR_SUB}/DAPE.pth")}
    for repo_id, commit in commits.items():
        for revision in ("main", "v1"):
            path = snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                     local_files_only=True, allow_patterns=patterns[repo_id])
            assert os.path.basename(path) == commit
        listed = {f.path for f in get_cached_repo_tree(repo_id, cache_dir=cache)}
        assert set(DECOYS[repo_id]) <= listed
        # Asking for everything fails: the decoys are listed but not cached.
        with pytest.raises(IncompleteSnapshotError):
            snapshot_download(repo_id, cache_dir=cache, local_files_only=True)


def test_convert_by_repo_id_offline_equals_local(hub, tmp_path):
    release, hf_home, commits = hub
    local = tmp_path / "local"
    assert _convert(release, local) == 0
    by_id = tmp_path / "by_id"
    done = _offline_convert(
        hf_home, "--sd", SD_REPO, "--seesr", f"{SEESR_REPO}/{SEESR_SUB}/seesr",
        "--ram", f"{SEESR_REPO}/{SEESR_SUB}/ram_swin_large_14m.pth",
        "--dape", f"{SEESR_REPO}/{SEESR_SUB}/DAPE.pth", "--revision", "v1", "--output", by_id)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_converted(local), load_converted(by_id)
    assert a.keys() == b.keys() == {"unet", "controlnet", "vae", "text_encoder", "dape"}
    for name in a:
        assert a[name][0] == b[name][0], name                     # configs
        fa, fb = _flat(a[name][1]), _flat(b[name][1])
        assert fa.keys() == fb.keys()
        for k in fa:
            np.testing.assert_array_equal(fa[k], fb[k], err_msg=f"{name} {k}")
    assert (by_id / "tokenizer").is_dir()
    hub_record = read_manifest(by_id)["hub"]
    assert hub_record["sd"] == {"repo_id": SD_REPO, "path_in_repo": "", "revision": "v1",
                                "commit": commits[SD_REPO]}
    assert hub_record["seesr"]["repo_id"] == SEESR_REPO
    assert hub_record["seesr"]["path_in_repo"] == f"{SEESR_SUB}/seesr"
    assert hub_record["dape"]["commit"] == commits[SEESR_REPO]
    assert set(hub_record) == {"sd", "seesr", "ram", "dape"}
    assert "hub" not in read_manifest(local)


def test_allow_patterns_leave_out_unread_files(hub):
    """The patterns select every cached file the converter reads and none of the decoys
    (checked with the library's own filter, as snapshot_download applies it)."""
    from huggingface_hub.utils import filter_repo_objects

    release, _, _ = hub
    listing = list(_files(release / "sd2")) + DECOYS[SD_REPO]
    chosen = set(filter_repo_objects(listing, allow_patterns=allow_patterns("diffusers", "")))
    assert chosen == set(_files(release / "sd2"))
    fallback = set(filter_repo_objects(listing, allow_patterns=allow_patterns(
        "diffusers", "", fallback=True)))
    assert "unet/diffusion_pytorch_model.bin" in fallback
    assert "v2-base-ema.ckpt" not in fallback


def test_unknown_repo_offline_names_it(hub, tmp_path):
    _, hf_home, _ = hub
    done = _offline_convert(hf_home, "--sd", "nobody-org/not-cached", "--output", tmp_path / "o")
    assert done.returncode == 2
    assert "nobody-org/not-cached" in done.stderr
    assert "offline mode is on" in done.stderr
    assert "Traceback" not in done.stderr


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = np.asarray(v)
    return out
