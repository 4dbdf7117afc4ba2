"""`jaxsr eval` and `jaxsr convert --metric` through the real command-line entry point,
on real photos: pairing by stem, skipped files with reasons, exit codes, and report
values equal to the library functions (and to BasicSR's / LPIPS's references)."""

import csv
import json

import jax
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from jaxsr.cli import main
from jaxsr.commands.eval import EXIT_SKIPPED
from jaxsr.data.image_io import load_image, save_image
from jaxsr.metrics.psnr_ssim import psnr, ssim
from tests import basicsr_reference as B
from tests import metric_references as R

# Two sizes, so the command batches per size; each divisible by 4 for the x4 round trip.
PHOTOS = {"astronaut": (96, 128), "chelsea": (96, 128), "coffee": (80, 112)}


def _down_up(img):
    h, w = img.shape[:2]
    small = Image.fromarray(img).resize((w // 4, h // 4), Image.BICUBIC)
    return np.asarray(small.resize((w, h), Image.BICUBIC))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """sr/ and hr/ with three good pairs, an unpaired SR file, a corrupt SR file and a
    pair of different sizes; clean/ holds only the good SR images."""
    root = tmp_path_factory.mktemp("eval")
    sr, hr, clean = root / "sr", root / "hr", root / "clean"
    for d in (sr, hr, clean):
        d.mkdir()
    for name, (h, w) in PHOTOS.items():
        img = getattr(skimage.data, name)()[:h, :w, :3]
        save_image(hr / f"{name}.png", img)
        save_image(sr / f"{name}.png", _down_up(img))
        save_image(clean / f"{name}.png", _down_up(img))
    rocket = skimage.data.rocket()
    save_image(sr / "unpaired.png", rocket[:64, :64])
    (sr / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    save_image(hr / "broken.png", rocket[:64, :64])
    save_image(sr / "mismatch.png", rocket[:64, :64])
    save_image(hr / "mismatch.png", rocket[:48, :64])
    return root


def _eval(capsys, *argv):
    code = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {r.pop("image"): {k: float(v) for k, v in r.items()} for r in rows}


def _pair(root, stem):
    return load_image(root / "sr" / f"{stem}.png"), load_image(root / "hr" / f"{stem}.png")


def test_eval_psnr_ssim_reports_and_skips(folders, capsys, tmp_path):
    code, out, err = _eval(capsys, folders / "sr", "--reference", folders / "hr",
                           "--metrics", "ssim,psnr", "--crop-border", 4, "--y-channel",
                           "--batch-size", 2, "--output", tmp_path)
    assert code == EXIT_SKIPPED, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    reasons = {s["file"].rsplit("/", 1)[-1]: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {"unpaired.png", "broken.png", "mismatch.png"}
    assert "no reference image" in reasons["unpaired.png"]
    assert "corrupt" in reasons["broken.png"] or "not an image" in reasons["broken.png"]
    assert "64x64 differs from the reference's 64x48" in reasons["mismatch.png"]
    assert summary["counts"] == {"scored": 3, "skipped": 3}
    assert summary["options"]["crop_border"] == 4 and summary["options"]["y_channel"]
    for name in reasons:
        assert f"skipped {folders / 'sr' / name}" in err

    rows = _read_csv(tmp_path / "per_image.csv")
    assert set(rows) == set(PHOTOS)
    for stem in PHOTOS:
        sr, hr = _pair(folders, stem)
        for fn, ref in ((psnr, B.calculate_psnr), (ssim, B.calculate_ssim)):
            lib = float(fn(sr[None], hr[None], crop_border=4, y_channel=True)[0])
            # The CSV keeps the float32 score (9 digits); another batch size may round
            # the last bit differently.
            np.testing.assert_allclose(rows[stem][fn.__name__], lib, rtol=2.4e-7)
            want = ref(sr[..., ::-1], hr[..., ::-1], 4, test_y_channel=True)
            assert abs(lib - want) <= 2e-7 * abs(want), (stem, fn.__name__, lib, want)
    for name in ("psnr", "ssim"):
        mean = summary["metrics"][name]["mean"]
        assert mean == pytest.approx(np.mean([rows[s][name] for s in rows]), rel=1e-7)
    # The table: the papers' order (PSNR before SSIM whatever --metrics said).
    header, values = out.splitlines()[:2]
    assert header.split() == ["images", "PSNR↑", "SSIM↑"]
    assert values.split() == ["3", f"{summary['metrics']['psnr']['mean']:.4f}",
                              f"{summary['metrics']['ssim']['mean']:.4f}"]


def test_eval_clean_folder_exits_zero(folders, capsys, tmp_path):
    code, _, err = _eval(capsys, folders / "clean", "--reference", folders / "hr",
                         "--metrics", "psnr", "--output", tmp_path)
    # hr/ has reference files without an SR partner: listed, so not a clean run ...
    assert code == EXIT_SKIPPED and "no SR image with this stem" in err
    hr_only = tmp_path / "hr_good"
    hr_only.mkdir()
    for stem in PHOTOS:
        (hr_only / f"{stem}.png").write_bytes((folders / "hr" / f"{stem}.png").read_bytes())
    code, _, err = _eval(capsys, folders / "clean", "--reference", hr_only,
                         "--metrics", "psnr", "--output", tmp_path / "report")
    assert code == 0, err                            # ... and with it removed, exit 0
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["counts"] == {"scored": 3, "skipped": 0} and summary["skipped"] == []
    sr, hr = load_image(folders / "clean" / "coffee.png"), load_image(hr_only / "coffee.png")
    rows = _read_csv(tmp_path / "report" / "per_image.csv")
    np.testing.assert_allclose(rows["coffee"]["psnr"], float(psnr(
        sr[None], hr[None], crop_border=0, y_channel=False)[0]), rtol=2.4e-7)


@pytest.mark.parametrize("argv,message", [
    (["--metrics", "psnr,foo"], "unknown metric 'foo'; available: psnr, ssim"),
    (["--metrics", "ssim,fid,maniqa,niqe,musiq"], "pass --metric-weights DIR"),
    (["--metrics", "lpips", "--metric-weights", "{empty}"],
     "no converted weights for metric 'lpips'"),
    (["--metrics", "lpips"], "pass --metric-weights DIR"),
])
def test_usage_errors_exit_2(folders, capsys, tmp_path, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{empty}", str(tmp_path / "empty")) for a in argv]
    code, _, err = _eval(capsys, folders / "clean", "--reference", folders / "hr", *argv,
                         "--output", tmp_path / "report")
    assert code == 2 and message in err, err
    if "lpips" in argv:
        assert "jaxsr convert --metric lpips --from" in err
    assert not (tmp_path / "report").exists()


def test_full_reference_metric_needs_reference(folders, capsys, tmp_path):
    code, _, err = _eval(capsys, folders / "clean", "--metrics", "psnr",
                         "--output", tmp_path)
    assert code == 2 and "psnr compare with ground truth: pass --reference" in err


def test_no_images_is_a_usage_error(capsys, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    code, _, err = _eval(capsys, tmp_path / "a", "--reference", tmp_path / "b",
                         "--output", tmp_path / "r")
    assert code == 2 and "no images to score" in err


def test_convert_metric_then_eval_lpips(folders, capsys, tmp_path):
    torch.manual_seed(0)
    ref = R.LPIPSReference("alex")
    R.randomize_trunk(ref.features, 0)
    trunk = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save({k: v.contiguous() for k, v in R.torchvision_file_state(ref.features, 0).items()},
               trunk)
    head = R.lpips_head_file("alex")
    heads = torch.load(head, map_location="cpu", weights_only=True)
    ref.load_state_dict(heads, strict=False)
    weights = tmp_path / "metric_weights"
    assert main(["convert", "--metric", "lpips", "--from", str(trunk), str(head),
                 "--output", str(weights)]) == 0
    assert (weights / "lpips" / "manifest.json").is_file()
    # The VGG metric refuses AlexNet weights, before writing anything.
    assert main(["convert", "--metric", "lpips-vgg", "--from", str(trunk), str(head),
                 "--output", str(weights)]) == 2
    assert not (weights / "lpips-vgg").exists()
    capsys.readouterr()

    code, out, err = _eval(capsys, folders / "sr", "--reference", folders / "hr",
                           "--metrics", "lpips,psnr", "--metric-weights", weights,
                           "--output", tmp_path / "report")
    assert code == EXIT_SKIPPED, err
    assert out.splitlines()[0].split() == ["images", "PSNR↑", "LPIPS↓"]
    rows = _read_csv(tmp_path / "report" / "per_image.csv")
    assert set(rows) == set(PHOTOS)
    for stem in PHOTOS:
        sr, hr = _pair(folders, stem)
        with torch.no_grad():
            want = float(ref(torch.from_numpy(sr / 255.0).permute(2, 0, 1)[None].float(),
                             torch.from_numpy(hr / 255.0).permute(2, 0, 1)[None].float()))
        assert rows[stem]["lpips"] == pytest.approx(want, rel=1e-4), stem


def test_convert_and_eval_fid_against_a_folder_and_saved_statistics(folders, capsys,
                                                                     tmp_path):
    """`jaxsr convert --metric fid` on a pytorch-fid Inception file (random weights),
    then `jaxsr eval --metrics fid` of the SR folder against the HR folder and against
    the HR statistics saved as pytorch-fid's .npz: both equal the Frechet distance of
    the library's pool3 features of the scored pairs."""
    from jaxsr.metrics.fid import feature_statistics, frechet_distance, inception_features
    from jaxsr.metrics.registry import load_metric_weights
    from tests import fid_reference
    from tests.test_metric_fid import RELEASE_NAME

    torch.manual_seed(0)
    model = fid_reference.FIDInception().eval()
    fid_reference.randomize(model, seed=2)
    release = tmp_path / RELEASE_NAME
    torch.save(model.state_dict(), release)
    weights = tmp_path / "metric_weights"
    assert main(["convert", "--metric", "fid", "--from", str(release),
                 "--output", str(weights)]) == 0
    capsys.readouterr()

    code, out, err = _eval(capsys, folders / "sr", "--reference", folders / "hr",
                           "--metrics", "fid", "--metric-weights", weights,
                           "--output", tmp_path / "folder")
    assert code == EXIT_SKIPPED, err                 # the fixture's three bad files
    assert out.splitlines()[0].split() == ["images", "FID↓"]
    fid_folder = json.loads((tmp_path / "folder" / "summary.json").read_text())
    fid_folder = fid_folder["metrics"]["fid"]["mean"]

    _, params = load_metric_weights(weights, "fid")
    pairs = [_pair(folders, stem) for stem in sorted(PHOTOS)]
    feats = {side: np.concatenate([np.asarray(inception_features(
        params, img[None].astype(np.float32) / 255)) for img in imgs])
        for side, imgs in (("sr", [p[0] for p in pairs]), ("hr", [p[1] for p in pairs]))}
    mu, sigma = feature_statistics(feats["hr"])
    # pytorch-fid's formula on the library's features. Three images a side leave
    # both covariances of rank 2 in 2048 dimensions; the matrix square root of such a
    # product is only good to ~1e-4 relative (the span-exact value,
    # `subspace_statistics`, is 1.5e-4 away on both sides), so the two runs of the same
    # formula are compared, the features being equal to ~1e-7.
    want = float(fid_reference.frechet_distance(*feature_statistics(feats["sr"]), mu, sigma))
    exact = frechet_distance(*fid_reference.subspace_statistics(
        feats["sr"].astype(np.float64), feats["hr"].astype(np.float64)))
    print(f"fid: jaxsr eval {fid_folder:.6f}, pytorch-fid's formula {want:.6f}, "
          f"span-exact {exact:.6f}")
    assert want > 0 and abs(fid_folder - want) <= 1e-5 * want
    assert abs(fid_folder - exact) <= 1e-3 * exact

    np.savez(tmp_path / "hr_stats.npz", mu=mu, sigma=sigma)
    code, _, err = _eval(capsys, folders / "clean", "--metrics", "fid", "--fid-reference",
                         tmp_path / "hr_stats.npz", "--metric-weights", weights,
                         "--output", tmp_path / "stats")
    assert code == 0, err
    summary = json.loads((tmp_path / "stats" / "summary.json").read_text())
    assert summary["options"]["fid_reference"] == str(tmp_path / "hr_stats.npz")
    assert summary["metrics"]["fid"]["mean"] == pytest.approx(fid_folder, rel=1e-5)


@pytest.mark.parametrize("argv,message", [
    ([], "--sd is required (or --metric NAME --from FILE"),
    (["--metric", "lpips"], "--metric lpips needs --from FILE"),
    (["--metric", "psnr", "--from", "{file}"], "metric 'psnr' needs no weights"),
    (["--metric", "brisque", "--from", "{file}"], "unknown metric 'brisque'; available:"),
    (["--metric", "lpips", "--from", "{missing}"], "no such file"),
    (["--from", "{file}"], "--from goes with --metric NAME"),
])
def test_convert_metric_usage_errors(capsys, tmp_path, argv, message):
    (tmp_path / "f.pth").write_bytes(b"")
    argv = [a.replace("{file}", str(tmp_path / "f.pth"))
            .replace("{missing}", str(tmp_path / "missing.pth")) for a in argv]
    assert main(["convert", *argv, "--output", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_no_reference_metric_without_reference(capsys, tmp_path):
    """niqe scores SR images alone (no --reference). Its pristine model is a random
    Gaussian written straight into the weights folder (the eval command's side of the
    format; converting the released file is tests/test_metric_niqe.py's job)."""
    from jaxsr.convert.cache import load_converted, save_converted
    from jaxsr.metrics.niqe import niqe
    from jaxsr.parallel.mesh import batch_sharding, make_mesh

    sr = tmp_path / "sr"
    sr.mkdir()
    images = {"astronaut": skimage.data.astronaut()[:192, :192],
              "chelsea": skimage.data.chelsea()[:192, :192]}
    for stem, img in images.items():
        save_image(sr / f"{stem}.png", img)
    rng = np.random.default_rng(0)
    m = rng.standard_normal((36, 36))
    params = {"mu_pris_param": rng.standard_normal(36).astype(np.float32),
              "cov_pris_param": (m @ m.T / 36 + np.eye(36)).astype(np.float32)}
    save_converted(tmp_path / "w" / "niqe", {"niqe": ({"block_size": 96}, params)},
                   sources=[])
    code, out, err = _eval(capsys, sr, "--metrics", "niqe", "--metric-weights", tmp_path / "w",
                           "--output", tmp_path / "report")
    assert code == 0, err
    assert out.splitlines()[0].split() == ["images", "NIQE↓"]
    rows = _read_csv(tmp_path / "report" / "per_image.csv")
    _, stored = load_converted(tmp_path / "w" / "niqe")["niqe"]
    # The batch the command ran: the images, padded with copies of the first to a
    # multiple of the devices and split over them (so one compiled program serves both).
    padded = -(-len(images) // jax.local_device_count()) * jax.local_device_count()
    stems = sorted(images) + [sorted(images)[0]] * (padded - len(images))
    batch = np.stack([images[s] for s in stems]).astype(np.float32) / 255.0
    sharding = batch_sharding(make_mesh((("data", -1),), devices=jax.local_devices()))
    want = niqe(stored, jax.device_put(batch, sharding))[:len(images)]
    got = np.array([rows[s]["niqe"] for s in sorted(images)])
    assert np.all(np.isfinite(want)) and abs(want[0] - want[1]) > 1e-2
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_convert_and_eval_musiq_and_clipiqa(capsys, tmp_path):
    """The no-reference models through both commands: `jaxsr convert --metric` on
    checkpoints in the release layouts (narrow random networks: MUSIQ at pyiqa's
    release resize sides, a CLIP RN-style tower with OpenAI's BPE vocabulary), then
    `jaxsr eval --metrics musiq,clipiqa`, whose per-image scores equal the library
    functions on the same images."""
    from jaxsr.metrics.clipiqa import clipiqa
    from jaxsr.metrics.musiq import musiq
    from jaxsr.metrics.registry import load_metric_weights
    from tests import clipiqa_reference as C
    from tests.musiq_reference import MUSIQ as TorchMUSIQ

    torch.manual_seed(0)
    musiq_file = tmp_path / "musiq_koniq_ckpt-e95806b9.pth"
    torch.save(TorchMUSIQ(hidden_size=48, mlp_dim=96, num_heads=6, num_layers=2).state_dict(),
               musiq_file)
    clip_file = tmp_path / "RN50.pt"
    torch.save(C.released_state(C.build(C.CLIPSizes(
        embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=8,
        transformer_width=64, transformer_layers=1), 1)), clip_file)
    weights = tmp_path / "metric_weights"
    assert main(["convert", "--metric", "musiq", "--from", str(musiq_file),
                 "--output", str(weights)]) == 0
    assert main(["convert", "--metric", "clipiqa", "--from", str(clip_file),
                 str(C.bpe_file()), "--output", str(weights)]) == 0

    sr = tmp_path / "sr"
    sr.mkdir()
    images = {"astronaut": skimage.data.astronaut()[:72, 100:200],
              "coffee": skimage.data.coffee()[50:122, 150:250],
              "rocket": skimage.data.rocket()[:72, 200:300]}
    for stem, img in images.items():
        save_image(sr / f"{stem}.png", img)
    capsys.readouterr()
    code, out, err = _eval(capsys, sr, "--metrics", "clipiqa,musiq", "--metric-weights",
                           weights, "--output", tmp_path / "report")
    assert code == 0, err
    assert out.splitlines()[0].split() == ["images", "MUSIQ↑", "CLIPIQA↑"]
    rows = _read_csv(tmp_path / "report" / "per_image.csv")
    batch = np.stack([images[s] for s in sorted(images)]).astype(np.float32) / 255
    m_config, m_params = load_metric_weights(weights, "musiq")
    c_config, c_params = load_metric_weights(weights, "clipiqa")
    want_musiq = np.asarray(musiq(m_params, batch, config=m_config))
    want_clipiqa = np.asarray(clipiqa(c_params, batch))
    assert np.ptp(want_clipiqa) > 0 and np.ptp(want_musiq) > 0
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    for i, stem in enumerate(sorted(images)):
        assert rows[stem]["musiq"] == pytest.approx(want_musiq[i], rel=1e-5), stem
        assert rows[stem]["clipiqa"] == pytest.approx(want_clipiqa[i], rel=1e-5), stem
    assert summary["counts"] == {"scored": 3, "skipped": 0}
    assert summary["metrics"]["musiq"]["mean"] == pytest.approx(want_musiq.mean(), rel=1e-5)
    assert summary["metrics"]["clipiqa"]["mean"] == pytest.approx(want_clipiqa.mean(),
                                                                  rel=1e-5)
