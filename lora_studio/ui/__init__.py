"""The Gradio front end. Only this subpackage imports gradio; the core never does."""
