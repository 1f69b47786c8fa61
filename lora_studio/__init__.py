"""LoRA Studio: train Stable Diffusion LoRA adapters locally, offline."""

import os

# Everything runs offline. Set before huggingface_hub is first imported, since it reads these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio (only in lora_studio.ui) loads

__version__ = "0.1.0"
