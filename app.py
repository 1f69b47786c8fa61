"""`python app.py` opens LoRA Studio in the browser (same as `lora-studio`)."""

import sys

from lora_studio.cli import main

if __name__ == "__main__":
    sys.exit(main(["app", *sys.argv[1:]]))
