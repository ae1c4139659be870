"""What every benchmark script shares: its output flags, the head of its BENCHMARKS.md section (the
command that made it and the machine it ran on), and the section writer.

A section is the block between `<!-- quality:NAME -->` and `<!-- /quality:NAME -->`; re-running a
script replaces its own block and leaves the rest of the file alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch


def add_output_args(p: argparse.ArgumentParser, section: str | None, json_out: str | None = None,
                    resume: str | None = None) -> None:
    """The common tail of every script's flags: --section, --md, and --json-out/--resume where used."""
    p.add_argument("--section", default=section, help="BENCHMARKS.md section to replace")
    p.add_argument("--md", default="BENCHMARKS.md", help="the Markdown file the section is written to")
    if json_out is not None:
        p.add_argument("--json-out", default=json_out, help="raw results (JSON)")
    if resume is not None:
        p.add_argument("--resume", action="store_true", help=resume)


def command() -> str:
    """The command line that is running, as it would be typed from the repository root."""
    return f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def machine() -> str:
    return (f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}")


def passkey_phrase(context: int, trials: int | None = None) -> str:
    """How a table's intro names its passkey protocol; 0 means the run skipped it."""
    if not context:
        return "passkey not run (--passkey 0)"
    return f"passkey at {context} tokens" + (f" ({trials} trials per depth)" if trials else "")


def section(name: str, title: str, intro: str, body: list[str]) -> str:
    """A whole section: markers, title, command, machine line + intro, then the body lines."""
    return "\n".join([f"<!-- quality:{name} -->", f"### {title}", "", f"Command: `{command()}`  ",
                      f"{machine()}. {intro}", "", *body, f"<!-- /quality:{name} -->"]) + "\n"


def write_section(path, name: str, body: str) -> None:
    """Replace the `<!-- quality:name -->` block of a Markdown file (or append it), atomically.
    `body` must carry its own start and end markers."""
    path = Path(path)
    old = path.read_text() if path.exists() else "# Benchmarks\n\nEvery table names the command that made it.\n"
    start, end = f"<!-- quality:{name} -->", f"<!-- /quality:{name} -->\n"
    if start in old and end in old:
        new = old[: old.index(start)] + body + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + body
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new)
    tmp.replace(path)


def ppl_row(model, tok, texts: dict, seq_len: int, windows: int | None) -> dict:
    """Perplexity on each loaded text {name: text} (first `windows` windows) and the cache bytes per token."""
    from latentkv.evaluation.perplexity import perplexity
    from latentkv.runtime.accounting import cache_report

    row = {t: perplexity(model, tok, text, seq_len=seq_len, max_windows=windows, progress=False).ppl
           for t, text in texts.items()}
    row["cache_bytes_per_token"] = cache_report(model)["model"]["bytes_per_token"]
    return row


def write_outputs(args, result, body: str) -> None:
    """The raw result to --json-out and the rendered section to --md (every script that has both)."""
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=2))
    write_section(Path(args.md), args.section, body)
