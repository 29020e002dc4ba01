"""The README's commands work with the tools that are installed today."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _hf_lines() -> list[str]:
    """Every `hf ...` command line of the README's code blocks."""
    lines, in_code = [], False
    for line in README.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif in_code and re.match(r"\s*hf\s", line):
            lines.append(line.strip())
    return lines


def test_the_readme_downloads_with_hf_not_the_removed_huggingface_cli():
    text = README.read_text()
    assert "huggingface-cli download" not in text
    assert len(_hf_lines()) == 4  # the three repositories + wav2vec2's safetensors revision


def test_every_hf_line_of_the_readme_fits_hf_download_help():
    if shutil.which("hf") is None:
        pytest.skip("the hf command (huggingface_hub) is not installed")
    result = subprocess.run(["hf", "download", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)  # colour codes
    assert "REPO_ID" in text and "[FILENAMES]" in text  # hf download REPO_ID [FILENAMES]... [OPTIONS]
    known = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    takes_value = {f for f in known if re.search(rf"{re.escape(f)}\s+(TEXT|INTEGER|PATH|\[)", text)}
    lines = _hf_lines()
    assert lines, "the README has no `hf download` line"
    for line in lines:
        words = line.split()
        assert words[:2] == ["hf", "download"], line
        positional, i = [], 2
        while i < len(words):
            word = words[i]
            if word.startswith("--"):
                assert word in known, f"{word} is not an option of `hf download`: {line}"
                if word in takes_value:
                    assert i + 1 < len(words) and not words[i + 1].startswith("--"), f"{word} needs a value"
                    i += 1
            else:
                positional.append(word)
            i += 1
        assert positional and re.fullmatch(r"[\w.-]+/[\w.-]+", positional[0]), f"no REPO_ID: {line}"
        assert "--local-dir" in words, f"the README's layout needs --local-dir: {line}"
