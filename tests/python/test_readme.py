"""The README's Python quick start runs as written."""

import re

from conftest import ROOT


def test_the_readme_quick_start_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text.split("## From Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(ROOT)
    out = tmp_path / "merged-tiny-llama-py"
    code = code.replace('"merged-tiny-llama-py"', repr(str(out)))
    exec(compile(code, "README.md", "exec"), {})
    assert (out / "config.json").is_file()
