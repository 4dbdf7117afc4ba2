"""Image-quality metrics (PSNR, SSIM, LPIPS, DISTS, FID, NIQE) in JAX."""
