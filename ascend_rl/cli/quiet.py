def quiet_transformers() -> None:
    """transformers draws its own progress bars for every load and save; ours are the ones to read. The
    environment variables carry the same to worker processes started from here."""
    import os

    from transformers.utils import logging

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.disable_progress_bar()
    logging.set_verbosity_error()
