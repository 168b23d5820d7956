"""Tests of rosa_peft.tasks.tokenize with a tiny word-level tokenizer built in the test."""
from __future__ import annotations

import pytest
import torch

from rosa_peft.tasks import Collator, Example, build_dataset, encode_example, get_task

PAD, BOS, EOS, UNK = 0, 1, 2, 3
WORDS = "a b c d e f g h i j k l".split()


def _tokenizer(with_pad: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": UNK}
    for word in WORDS:
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    extra = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", **extra)


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


def ids(words: str):
    return [WORDS.index(w) + 4 for w in words.split()]


def test_encode_masks_prompt_and_appends_eos(tok):
    out = encode_example(tok, Example("a b c", "d e", {}), max_seq_len=32)
    assert out["input_ids"] == [BOS] + ids("a b c") + ids("d e") + [EOS]  # BOS on the prompt only
    assert out["labels"] == [-100] * 4 + ids("d e") + [EOS]
    assert out["attention_mask"] == [1] * 7
    # a response already ending in EOS gets no second EOS; plain dicts work too
    again = encode_example(tok, {"prompt": "a", "response": "d </s>"}, max_seq_len=32)
    assert again["input_ids"] == [BOS] + ids("a d") + [EOS]


def test_encode_drops_long_prompts(tok):
    prompt = "a b c d e"  # 6 tokens with BOS
    assert encode_example(tok, Example(prompt, "f", {}), max_seq_len=6) is None
    kept = encode_example(tok, Example(prompt, "f g h", {}), max_seq_len=7)
    assert kept["input_ids"] == [BOS] + ids(prompt) + [EOS]  # only room for the final EOS
    assert kept["labels"] == [-100] * 6 + [EOS]


def test_encode_truncates_response_keeping_last_tokens(tok):
    out = encode_example(tok, Example("a b", "c d e f g h", {}), max_seq_len=7)
    # prompt = 3 tokens, room = 4; response + EOS = 7 tokens; keep the last 4 (f g h </s>)
    assert out["input_ids"] == [BOS] + ids("a b") + ids("f g h") + [EOS]
    assert len(out["input_ids"]) == 7 and out["labels"][-1] == EOS
    assert out["labels"] == [-100] * 3 + ids("f g h") + [EOS]


def test_encode_bad_arguments(tok):
    with pytest.raises(ValueError, match="max_seq_len"):
        encode_example(tok, Example("a", "b", {}), max_seq_len=0)
    with pytest.raises(ValueError, match="'response'"):
        encode_example(tok, {"prompt": "a"}, max_seq_len=8)


def test_build_dataset_counts_dropped_and_truncated(tok, caplog):
    examples = [Example("a", "b", {}), Example("a b c d e f g h", "i", {}), Example("a", "b c d e f g h i", {})]
    ds = build_dataset(examples, tok, max_seq_len=6)
    assert (len(ds), ds.n_total, ds.n_dropped, ds.n_truncated) == (2, 3, 1, 1)
    assert ds[0]["input_ids"] == [BOS] + ids("a b") + [EOS]
    assert "dropped 1 of 3" in caplog.text
    assert len(build_dataset(examples, tok, max_seq_len=6, limit=1)) == 1
    with pytest.raises(ValueError, match="all 1 examples were dropped"):
        build_dataset(examples[1:2], tok, max_seq_len=4)
    with pytest.raises(ValueError, match="split="):
        build_dataset(examples, tok, max_seq_len=6, split="test")


def test_build_dataset_from_task(tok):
    task = get_task("sql-synth", seed=3, n_train=20, n_test=5)
    ds = build_dataset(task, tok, max_seq_len=256, split="test")
    assert len(ds) == 5 and ds.n_dropped == 0
    assert [e.prompt for e in ds.examples] == [e.prompt for e in task.load("test")]
    assert all(f["input_ids"][-1] == EOS and f["labels"][0] == -100 for f in ds)


def test_collator_right_pads(tok):
    feats = [encode_example(tok, Example("a", "b", {}), 16), encode_example(tok, Example("a b c", "d e", {}), 16)]
    batch = Collator(tok)(feats)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (2, 7) for t in batch.values())
    assert batch["input_ids"][0].tolist() == [BOS] + ids("a b") + [EOS, PAD, PAD, PAD]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert batch["labels"][0].tolist() == [-100, -100] + ids("b") + [EOS, -100, -100, -100]
    assert batch["input_ids"][1].tolist() == feats[1]["input_ids"]
    assert Collator(tok, pad_to_multiple_of=8)(feats)["input_ids"].shape == (2, 8)


def test_collator_falls_back_to_eos_and_checks_arguments():
    tok = _tokenizer(with_pad=False)
    assert tok.pad_token_id is None
    feats = [{"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [-100, 6]}, {"input_ids": [5]}]
    batch = Collator(tok)(feats)
    assert batch["input_ids"].tolist() == [[5, 6], [5, EOS]]
    assert "labels" not in batch  # only produced when every feature has labels
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        Collator(tok, pad_to_multiple_of=0)


def test_loss_runs_on_a_tiny_model(tok):
    """The collated batch feeds a causal LM directly (the HF Trainer path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS) + 4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    model = LlamaForCausalLM(config)
    ds = build_dataset([Example("a b", "c d", {}), Example("e", "f g h", {})], tok, max_seq_len=16)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=Collator(tok))
    out = model(**next(iter(loader)))
    assert torch.isfinite(out.loss) and out.loss.item() > 0


@pytest.mark.slow
def test_embedded_tokenizer_on_builtin_task():
    """With the embedded SmolLM2 tokenizer, sql-synth prompts are short and nothing is dropped."""
    from transformers import AutoTokenizer

    from rosa_peft.utils.model_loading import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()))
    ds = build_dataset(get_task("sql-synth", n_train=200, n_test=20), tokenizer, max_seq_len=128)
    assert (len(ds), ds.n_dropped, ds.n_truncated) == (200, 0, 0)
    for feature, example in zip(ds, ds.examples):
        n_prompt = feature["labels"].count(-100)
        assert n_prompt < 80
        assert feature["input_ids"][-1] == tokenizer.eos_token_id
        assert tokenizer.decode(feature["input_ids"][n_prompt:-1]) == example.response


# ---- tokenization cache and dynamic padding (issue #14) ---------------------------------------------
CACHE_EXAMPLES = [Example("a b c", "d e", {}), Example("a b c d e f", "g", {}), Example("b", "c d e f g h", {}),
                  {"prompt": "k", "response": "l a"}]


def _plain(ds):
    return ([dict(f) for f in ds.features], ds.n_total, ds.n_dropped, ds.n_truncated,
            [(e.prompt, e.response) for e in ds.examples])


def test_cached_tokenization_equals_fresh(tok, tmp_path, monkeypatch):
    from rosa_peft.tasks import tokenize as T

    monkeypatch.setattr(T, "_MEMORY_CACHE", {})
    fresh = build_dataset(CACHE_EXAMPLES, tok, max_seq_len=6)
    assert fresh.n_dropped == 1 and fresh.n_truncated == 2  # both paths are exercised
    first = build_dataset(CACHE_EXAMPLES, tok, max_seq_len=6, cache=tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    from_memory = build_dataset(CACHE_EXAMPLES, tok, max_seq_len=6, cache=tmp_path)
    T._MEMORY_CACHE.clear()
    from_disk = build_dataset(CACHE_EXAMPLES, tok, max_seq_len=6, cache=tmp_path)
    for ds in (first, from_memory, from_disk):
        assert _plain(ds) == _plain(fresh)
    from_memory.features[0]["input_ids"].append(99)  # a caller's edit does not leak into the cache
    assert _plain(build_dataset(CACHE_EXAMPLES, tok, max_seq_len=6, cache=tmp_path)) == _plain(fresh)


def test_cache_key_covers_texts_max_seq_len_and_tokenizer(tok, tmp_path, monkeypatch):
    from rosa_peft.tasks import tokenize as T

    monkeypatch.setattr(T, "_MEMORY_CACHE", {})
    build_dataset(CACHE_EXAMPLES, tok, max_seq_len=6, cache=tmp_path)
    changed = [Example("a b c", "d f", {})] + CACHE_EXAMPLES[1:]
    assert _plain(build_dataset(changed, tok, max_seq_len=6, cache=tmp_path)) == _plain(
        build_dataset(changed, tok, max_seq_len=6))
    assert _plain(build_dataset(CACHE_EXAMPLES, tok, max_seq_len=8, cache=tmp_path)) == _plain(
        build_dataset(CACHE_EXAMPLES, tok, max_seq_len=8))
    other = _tokenizer(with_pad=False)
    other.add_tokens(["zz"])  # a different definition of the tokenizer
    assert T._cache_key(other, CACHE_EXAMPLES, 6) != T._cache_key(tok, CACHE_EXAMPLES, 6)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_damaged_cache_file_is_ignored_and_rewritten(tok, tmp_path, monkeypatch):
    from rosa_peft.tasks import tokenize as T

    monkeypatch.setattr(T, "_MEMORY_CACHE", {})
    fresh = build_dataset(CACHE_EXAMPLES, tok, max_seq_len=6, cache=tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(b"not a safetensors file")
    T._MEMORY_CACHE.clear()
    assert _plain(build_dataset(CACHE_EXAMPLES, tok, max_seq_len=6, cache=tmp_path)) == _plain(fresh)
    T._MEMORY_CACHE.clear()
    assert _plain(build_dataset(CACHE_EXAMPLES, tok, max_seq_len=6, cache=tmp_path)) == _plain(fresh)


def test_dynamic_padding_gives_the_same_loss_as_full_padding(tok):
    from conftest import make_tiny_llama

    model = make_tiny_llama()
    ds = build_dataset(CACHE_EXAMPLES, tok, max_seq_len=16)
    feats = ds.features[:3]
    dynamic = Collator(tok)(feats)
    full = Collator(tok, pad_to_multiple_of=16)(feats)
    assert dynamic["input_ids"].shape[1] == max(len(f["input_ids"]) for f in feats) < full["input_ids"].shape[1] == 16
    with torch.no_grad():
        a, b = model(**dynamic).loss, model(**full).loss
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_length_grouped_sampling_only_with_several_examples_per_batch():
    from rosa_peft.train.run import _sampling_args

    assert _sampling_args(1) == {}
    args = _sampling_args(4)
    assert args in ({"train_sampling_strategy": "group_by_length"}, {"group_by_length": True})
