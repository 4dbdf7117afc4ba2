"""Image-quality metrics in JAX: one module per metric (psnr_ssim, lpips, dists, fid,
niqe, ...), each with pure, jittable scoring functions of float32 [0, 1] NHWC batches
that return per-image (B,) scores. `jaxsr.metrics.registry` lists them for `jaxsr eval`
(names, papers' column order, weights, converters). Nothing is imported here, so using
one metric does not load the others' networks."""
