"""The quiet console in-process: only what is meant for the terminal reaches it; the rest is in the log."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from tqdm import tqdm

from lightreasoner_ray.ui.console import echo, progress_stream, quiet_console


def test_library_output_goes_to_the_log_and_results_to_the_terminal(tmp_path, capfd):
    chatty = logging.getLogger("some_library")
    chatty.addHandler(logging.StreamHandler(sys.stderr))  # as libraries set up their loggers at import
    chatty.addHandler(logging.lastResort)  # a handler whose stream is a read-only property
    chatty.setLevel(logging.INFO)
    try:
        with quiet_console(str(tmp_path), "sample") as console:
            chatty.info("library chatter")
            warnings.warn("a FutureWarning from a library", FutureWarning)
            print("a stray print")
            os.write(2, b"C-level output\n")
            for _ in tqdm(range(3), desc="a library's own bar"):
                pass
            logging.getLogger("lightreasoner_ray.stages.sampling.stage").info("12 problems to go")
            for _ in tqdm(range(3), desc="sampling problems", file=progress_stream()):
                pass
            echo("samples: 12 problems")
    finally:
        chatty.handlers.clear()
    terminal = capfd.readouterr()
    shown = terminal.out + terminal.err
    assert "samples: 12 problems" in terminal.out and "12 problems to go" in terminal.err
    assert "sampling problems" in terminal.err and f"logs in {console.log_path}" in terminal.err
    for hidden in ("library chatter", "FutureWarning", "a stray print", "C-level output", "a library's own bar"):
        assert hidden not in shown
        assert hidden in console.log_path.read_text()
    # Everything is back as it was.
    print("after")
    assert "after" in capfd.readouterr().out
