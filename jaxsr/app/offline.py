"""Environment that keeps Gradio off the network: no analytics, no telemetry, no share
link, no Node server for rendering. Set before Gradio is imported (it reads them then);
values the user set already are kept."""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_SHARE": "False",
    # Server-side rendering would start a Node process; the plain page needs none.
    "GRADIO_SSR_MODE": "False",
    "GRADIO_MCP_SERVER": "False",
}


def keep_gradio_offline() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
