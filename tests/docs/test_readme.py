"""The README's Python quick start runs as written (on the embedded SmolLM2)."""
import re

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_readme_quick_start_runs(smollm2, tmp_path, monkeypatch, capsys):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python block"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102 - our own documentation
    assert "trainable params" in capsys.readouterr().out
    assert (tmp_path / "my-adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    merged = scope["merged"]
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n or "rosa" in n for n, _ in merged.named_parameters())
