"""Parameter sharding rules shared by the configs (regex → rule, first match wins;
see jaxsr/parallel/sharding.py for the rule forms).

`tensor_parallel(rest)`: Megatron-style splits over a 'tensor' mesh axis, each also
FSDP-split over 'fsdp' where the mesh has it, then `rest` for everything else:
- attention: q/k/v kernels by output columns (heads), the output projection by
  input rows, its bias replicated (added after the partial sums are reduced);
- the GEGLU feed-forward: net_0's projection (kernel and bias) by hidden columns,
  net_2 by hidden rows;
- ResNet blocks: conv1 (kernel and bias) by output channels, conv2 by input channels.
On a mesh without a 'tensor' axis the rules reduce to plain FSDP.
"""


def tensor_parallel(rest, fsdp_min_size_mb: float = 0.5):
    t = f"fsdp=fsdp, min_size_mb={fsdp_min_size_mb}"
    return [
        (r".*/attn\d/to_(q|k|v)/kernel", f"tensor(dim=-1, {t})"),
        (r".*/attn\d/to_out_0/kernel", f"tensor(dim=0, {t})"),
        (r".*/ff/net_0/proj/(kernel|bias)", f"tensor(dim=-1, {t})"),
        (r".*/ff/net_2/kernel", f"tensor(dim=0, {t})"),
        (r".*/resnets_\d+/conv1/(kernel|bias)", f"tensor(dim=-1, {t})"),
        (r".*/resnets_\d+/conv2/kernel", f"tensor(dim=-2, {t})"),
        # The time embedding's per-channel shift joins conv1's output channels.
        (r".*/resnets_\d+/time_emb_proj/(kernel|bias)", f"tensor(dim=-1, {t})"),
        (r".*/resnets_\d+/conv_shortcut/kernel", f"tensor(dim=-2, {t})"),
        # Transformer in/out projections: column then row, like q/k/v and to_out.
        (r".*/proj_in/(kernel|bias)", f"tensor(dim=-1, {t})"),
        (r".*/proj_out/kernel", f"tensor(dim=0, {t})"),
        # Everything else that is large (down/up-sampler convs, the ControlNet's zero
        # convs, the time embedding): split by output channels.
        (r".*/kernel", f"tensor(dim=-1, {t})"),
    ] + list(rest)
