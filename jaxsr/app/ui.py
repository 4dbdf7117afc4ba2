"""The page: an upload, the controls of the weights folder's model, and the results.

Controls (defaults: the pipeline options' own, so the page and `jaxsr sr` agree):
    SeeSR  prompt, added (positive) prompt, negative prompt, guidance, steps, sampler,
           seed, samples, scale, colour fix, latent tile and overlap, process size,
           and a turbo switch when the weights were converted for sd-turbo
    CoSeR  prompt, negative prompt, guidance, reference guidance, steps, seed, samples,
           scale, colour fix, decoder, CFW weight, mode, latent tile and overlap
Outputs: a status line (errors land here, the app keeps serving), a slider of the
result against the bicubic input, all samples, CoSeR's generated reference, the
prompt used (SeeSR: DAPE's tags first), the time taken, and the PNG files to download.

Requests go through Gradio's queue one at a time (one pipeline on the devices); the
progress bar advances per denoising step of each batch (the pipelines' step reports,
jaxsr.inference.step_progress). The API endpoint is "/upscale", its inputs in the
order of `input_names(model)`.
"""

from __future__ import annotations

import dataclasses

from jaxsr.app.offline import keep_gradio_offline
from jaxsr.app.service import SRService
from jaxsr.app.uploads import UploadError

SCALES = (1, 2, 3, 4, 6, 8)
# Fonts the browser has: the default theme's web fonts would be fetched from the internet.
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
MONO_FONTS = ("ui-monospace", "monospace")


@dataclasses.dataclass(frozen=True)
class Control:
    name: str             # SeeSROptions / CoSeROptions field, or seed / samples / turbo
    label: str
    kind: str             # text | number | int | choice | check
    choices: tuple = ()


SEESR_CONTROLS = (
    Control("prompt", "User prompt (after DAPE's tags)", "text"),
    Control("added_prompt", "Positive prompt (appended)", "text"),
    Control("negative_prompt", "Negative prompt", "text"),
    Control("guidance_scale", "Guidance scale", "number"),
    Control("steps", "Denoising steps", "int"),
    Control("sampler", "Sampler", "choice", ("ddpm", "ddim", "dpmpp")),
    Control("seed", "Seed", "int"),
    Control("samples", "Samples", "int"),
    Control("upscale", "Scale", "choice", SCALES),
    Control("color_fix", "Colour fix", "choice", ("adain", "wavelet", "none")),
    Control("latent_tile", "Latent tile size", "int"),
    Control("latent_tile_overlap", "Latent tile overlap", "int"),
    Control("process_size", "Process size (smaller inputs are enlarged first)", "int"),
    Control("turbo", "sd-turbo (2 steps, no guidance)", "check"),
)
COSER_CONTROLS = (
    Control("prompt", "Prompt", "text"),
    Control("negative_prompt", "Negative prompt", "text"),
    Control("guidance_scale", "Guidance scale", "number"),
    Control("reference_guidance_scale", "Reference guidance scale", "number"),
    Control("steps", "Denoising steps", "int"),
    Control("seed", "Seed", "int"),
    Control("samples", "Samples", "int"),
    Control("upscale", "Scale", "choice", SCALES),
    Control("color_fix", "Colour fix", "choice", ("none", "adain", "wavelet")),
    Control("decoder", "Decoder", "choice", ("auto", "cfw", "vae")),
    Control("fusion_weight", "CFW weight", "number"),
    Control("mode", "Mode", "choice", ("auto", "reference", "tiled")),
    Control("latent_tile", "Latent tile size", "int"),
    Control("latent_tile_overlap", "Latent tile overlap", "int"),
)
NOT_OPTIONS = ("seed", "samples", "turbo")


def controls(model: str) -> tuple[Control, ...]:
    return COSER_CONTROLS if model == "coser" else SEESR_CONTROLS


def input_names(model: str) -> list[str]:
    """The API's inputs, in order: the image, then the controls."""
    return ["image"] + [c.name for c in controls(model)]


def defaults(model: str, overrides: dict | None = None) -> dict:
    """Each control's initial value: the options dataclass's default, the CLI's seed
    default, then `overrides` (e.g. `jaxsr app --steps 2`)."""
    from jaxsr.commands.sr import DEFAULT_SEED

    if model == "coser":
        from jaxsr.pipelines.coser import CoSeROptions as Options
    else:
        from jaxsr.pipelines.seesr import SeeSROptions as Options
    values = {f.name: f.default for f in dataclasses.fields(Options)}
    values.update(seed=DEFAULT_SEED[model], samples=1, turbo=False)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return {c.name: values[c.name] for c in controls(model)}


def handle(service: SRService, model: str, values: tuple, progress=None, on_step=None):
    """One request: (status, slider pair, gallery, reference, prompt, time, files).
    A bad upload or bad settings give an error status and empty outputs. progress,
    on_step: `SRService.run`'s per-batch and per-step reports."""
    number = service.next_request()
    given = dict(zip(input_names(model), values))
    try:
        empty = [n for n, v in given.items() if v is None and n != "image"]
        if empty:
            raise ValueError(f"fill in {', '.join(empty)}")
        path = given.pop("image")
        seed, samples = int(given.pop("seed")), int(given.pop("samples"))
        turbo = bool(given.pop("turbo", False))
        settings = {k: (int(v) if k in _INTS else v) for k, v in given.items()}
        result = service.run(path, settings, seed=seed, samples=samples, turbo=turbo,
                             progress=progress, on_step=on_step)
    except (UploadError, ValueError) as e:
        return (f"request {number}: **error:** {e}", None, None, None, "", "", None)
    h, w = result.images[0].shape[:2]
    status = (f"request {number}: done, {len(result.images)} image(s) of {w}x{h} px"
              + (f", {result.compile_seconds:.1f} s of it compiling (first request of this "
                 "size and settings)" if result.compile_seconds > 0.5 else ", warm program"))
    reference = next((r for r in result.references if r is not None), None)
    prompt = "\n".join(result.prompts) if result.prompts else ""
    return (status, (result.bicubic, result.images[0]), list(result.images), reference,
            prompt, f"{result.seconds:.2f} s", [str(f) for f in result.files])


_INTS = {c.name for c in SEESR_CONTROLS + COSER_CONTROLS if c.kind == "int"} | {"upscale"}


def build(service: SRService, overrides: dict | None = None, examples=()):
    """The gr.Blocks of the page (not launched); `examples`: image files offered for
    upload with one click."""
    keep_gradio_offline()
    import gradio as gr

    model = service.model
    initial = defaults(model, overrides)
    title = "SeeSR" if model == "seesr" else "CoSeR"
    with gr.Blocks(title=f"jaxsr {title}", analytics_enabled=False) as page:
        gr.Markdown(f"# jaxsr · {title} super-resolution")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Low-resolution image", file_types=["image"],
                                 type="filepath", elem_id="upload")
                widgets = [upload]
                with gr.Accordion("Settings", open=True):
                    for c in controls(model):
                        widgets.append(_widget(gr, c, initial[c.name], service))
                run = gr.Button("Super-resolve", variant="primary", elem_id="run")
                if examples:
                    gr.Examples([[str(e)] for e in examples], inputs=[upload],
                                label="Sample pictures")
            with gr.Column(scale=2):
                status = gr.Markdown("upload an image and press Super-resolve",
                                     elem_id="status")
                compare = gr.ImageSlider(label="bicubic | super-resolved", format="png",
                                         type="numpy", elem_id="compare", max_height=420)
                gallery = gr.Gallery(label="Results", format="png", elem_id="results",
                                     columns=2, height=360, object_fit="contain")
                reference = gr.Image(label="Generated reference", format="png",
                                     visible=model == "coser", elem_id="reference")
                prompt = gr.Textbox(label="Prompt used (DAPE tags first)" if model == "seesr"
                                    else "Prompt used", elem_id="prompt-used", interactive=False,
                                    max_lines=4)
                seconds = gr.Textbox(label="Time taken", elem_id="time-taken", interactive=False)
                files = gr.File(label="Download", file_count="multiple", elem_id="download")

        # Gradio gives a request its progress bar through this default value.
        def on_run(*values, progress=gr.Progress()):  # noqa: B008
            return handle(service, model, values,
                          progress=lambda fraction, text: progress(fraction, desc=text),
                          on_step=lambda done, total, label: progress(
                              (done, total), desc=label, unit="steps"))

        run.click(on_run, inputs=widgets,
                  outputs=[status, compare, gallery, reference, prompt, seconds, files],
                  api_name="upscale", concurrency_limit=1)
    return page


def _widget(gr, c: Control, value, service: SRService):
    if c.kind == "text":
        return gr.Textbox(label=c.label, value=value, elem_id=c.name)
    if c.kind == "number":
        return gr.Number(label=c.label, value=value, elem_id=c.name)
    if c.kind == "int":
        return gr.Number(label=c.label, value=value, precision=0, elem_id=c.name)
    if c.kind == "choice":
        return gr.Radio(label=c.label, choices=list(c.choices), value=value, elem_id=c.name)
    visible = c.name != "turbo" or service.turbo_available
    return gr.Checkbox(label=c.label, value=bool(value), visible=visible, elem_id=c.name)


def launch(page, *, host: str, port: int, allowed_paths=(), block: bool = True):
    """Serve the page on host:port through the queue; never a public share link."""
    import gradio as gr

    theme = gr.themes.Default(font=list(SYSTEM_FONTS), font_mono=list(MONO_FONTS))
    page.queue(default_concurrency_limit=1)
    return page.launch(server_name=host, server_port=port, share=False, ssr_mode=False,
                       prevent_thread_lock=not block, allowed_paths=list(allowed_paths),
                       theme=theme, footer_links=["api"], quiet=True, mcp_server=False)
