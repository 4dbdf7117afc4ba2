"""A numpy port of BasicSR's `calculate_psnr` / `calculate_ssim` (basicsr/metrics/
psnr_ssim.py, metric_util.to_y_channel, utils/color_util.bgr2ycbcr), for parity tests.

BasicSR needs OpenCV, which the test environment does not install; the only OpenCV
calls are `cv2.getGaussianKernel(11, 1.5)` and `cv2.filter2D(img, -1, window)` followed
by a 5-pixel crop, i.e. the window correlated over the valid region, written here with
numpy sliding windows in float64. Images are HWC uint8 in BGR order, as cv2.imread
returns them.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def bgr2ycbcr_y(img_float01: np.ndarray) -> np.ndarray:
    """bgr2ycbcr(img, y_only=True) for a float32 [0, 1] image: float32 [0, 1] luma."""
    x = img_float01.astype(np.float32)
    y = np.dot(x, [24.966, 128.553, 65.481]) + 16.0     # float64, as numpy promotes
    return (y / 255.0).astype(np.float32)


def to_y_channel(img: np.ndarray) -> np.ndarray:
    x = img.astype(np.float32) / 255.0
    return bgr2ycbcr_y(x)[..., None] * 255.0


def _crop(img, crop_border):
    return img[crop_border:-crop_border, crop_border:-crop_border] if crop_border else img


def calculate_psnr(img, img2, crop_border, test_y_channel=False):
    assert img.shape == img2.shape
    img, img2 = _crop(img, crop_border), _crop(img2, crop_border)
    if test_y_channel:
        img, img2 = to_y_channel(img), to_y_channel(img2)
    img, img2 = img.astype(np.float64), img2.astype(np.float64)
    mse = np.mean((img - img2) ** 2)
    if mse == 0:
        return float("inf")
    return 10.0 * np.log10(255.0 * 255.0 / mse)


def _gaussian_kernel(size=11, sigma=1.5):
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-x * x / (2 * sigma * sigma))
    return (g / g.sum())[:, None]


def _filter_valid(img, window):
    patches = sliding_window_view(img, window.shape)
    return np.einsum("ijkl,kl->ij", patches, window)


def _ssim(img, img2):
    c1 = (0.01 * 255) ** 2
    c2 = (0.03 * 255) ** 2
    kernel = _gaussian_kernel()
    window = np.outer(kernel, kernel.transpose())
    mu1 = _filter_valid(img, window)
    mu2 = _filter_valid(img2, window)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 ** 2, mu2 ** 2, mu1 * mu2
    sigma1_sq = _filter_valid(img ** 2, window) - mu1_sq
    sigma2_sq = _filter_valid(img2 ** 2, window) - mu2_sq
    sigma12 = _filter_valid(img * img2, window) - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / (
        (mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    return ssim_map.mean()


def calculate_ssim(img, img2, crop_border, test_y_channel=False):
    assert img.shape == img2.shape
    img, img2 = _crop(img, crop_border), _crop(img2, crop_border)
    if test_y_channel:
        img, img2 = to_y_channel(img), to_y_channel(img2)
    img, img2 = img.astype(np.float64), img2.astype(np.float64)
    return np.array([_ssim(img[..., i], img2[..., i]) for i in range(img.shape[2])]).mean()
