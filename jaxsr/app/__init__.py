"""`jaxsr app`: a Gradio web app over the Python API (SeeSR or CoSeR, per the weights).

    service.py   the model behind the page: one pipeline, warm across requests
    uploads.py   checks an uploaded file before any work (not an image, too small, too large)
    ui.py        the page: controls for the weights folder's model, outputs, queue
    offline.py   settings that keep Gradio from reaching the internet

Gradio is imported only by ui.py (the `app` extra: `pip install jaxsr[app]`).
"""
