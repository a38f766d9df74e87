def quiet_transformers() -> None:
    """transformers draws its own progress bars for every load and save; ours are the ones to read."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
