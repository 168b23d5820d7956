"""TRL's ``SFTTrainer`` runs the whole RoSA schedule through ``rosa_trainer_class(SFTTrainer)``.

A tiny Llama with a character-level chat tokenizer trains on a ``datasets.Dataset`` of chat ``messages``
(TRL applies the chat template and tokenizes): warm-up (LoRA only) -> masks at the configured density ->
restart (the LoRA init of the warm-up's start, the sparse values trained from there) -> a saved adapter
that ``RosaModel.from_pretrained`` reloads with the same logits.
"""
import math
import string

import pytest
import torch

from conftest import make_tiny_llama

trl = pytest.importorskip("trl", reason="trl is not installed (pip install 'rosa-peft[trl]')")
datasets = pytest.importorskip("datasets", reason="datasets is not installed (pip install 'rosa-peft[trl]')")

DENSITY = 0.05
MAX_STEPS, WARMUP = 4, 2


def _char_tokenizer():
    """A chat tokenizer over single printable characters (104 ids: fits the tiny Llama's 128)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(string.printable)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'][0] }}:{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>a:{% endif %}")
    return tok


def _chats(n=16):
    return datasets.Dataset.from_list([
        {"messages": [{"role": "user", "content": f"add {i} and {i + 1}"},
                      {"role": "assistant", "content": str(2 * i + 1)}]} for i in range(n)])


def _sft_args(out, **kw):
    return trl.SFTConfig(output_dir=str(out), max_steps=MAX_STEPS, per_device_train_batch_size=2,
                         learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                         disable_tqdm=True, seed=3, data_seed=3, max_length=64,
                         **{"loss_type": "nll", "bf16": False, **kw})  # TRL defaults to bf16 autocast


def _adapter(model):
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    from transformers import TrainerCallback

    from rosa_peft import RosaConfig, get_rosa_model
    from rosa_peft.train import ScheduleConfig, rosa_trainer_class

    root = tmp_path_factory.mktemp("trl")
    tok = _char_tokenizer()
    model = get_rosa_model(make_tiny_llama(0), RosaConfig(r=2, density=DENSITY, lora_dropout=0.0))
    seen, records = {}, []  # phase -> the adapter weights as it starts; the logs of both train() calls

    def listen(phase, info):
        seen[phase] = _adapter(model)

    class Logs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            records.append(dict(logs or {}))

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        trainer = rosa_trainer_class(trl.SFTTrainer)(
            model=model, args=_sft_args(root / "out"), train_dataset=_chats(), processing_class=tok,
            schedule=ScheduleConfig(mode="rosa", warmup_steps=WARMUP, seed=7), phase_listener=listen,
            callbacks=[Logs()])
        result = trainer.train()
        trainer.save_model(str(root / "adapter"))
    return {"trainer": trainer, "model": model, "tok": tok, "seen": seen, "result": result, "root": root,
            "logs": records}


def test_trl_prepared_the_chat_dataset(run):
    tok, example = run["tok"], run["trainer"].train_dataset[0]
    text = tok.apply_chat_template(_chats()[0]["messages"], tokenize=False)
    assert text == "<s>u:add 0 and 1</s><s>a:1</s>"
    assert tok.decode(example["input_ids"]) == text


def test_sft_trainer_ran_the_rosa_schedule(run):
    trainer, result = run["trainer"], run["result"]
    assert type(trainer).__name__ == "RosaSFTTrainer" and isinstance(trainer, trl.SFTTrainer)
    assert list(run["seen"]) == ["warmup", "masks", "train"]
    assert result.global_step == MAX_STEPS  # the restarted run counts from step 0
    losses = [(r["phase"], r["loss"]) for r in run["logs"] if "loss" in r]
    assert [p for p, _ in losses] == ["warmup"] * WARMUP + ["train"] * MAX_STEPS
    assert all(math.isfinite(v) for _, v in losses)
    assert math.isfinite(result.training_loss)


def test_masks_have_the_configured_density(run):
    model = run["model"]
    masks = model.get_masks()
    layers = dict(model.rosa_layers())
    assert masks and set(masks) == set(layers)
    for name, mask in masks.items():
        assert int(mask.sum()) == int(DENSITY * mask.numel()), name


def test_restart_reinitialises_lora_and_trains_the_sparse_values(run):
    start, after_warmup, restart = (run["seen"][p] for p in ("warmup", "masks", "train"))
    final = _adapter(run["model"])
    lora_b = [k for k in start if k.endswith("lora_B.weight")]
    lora_a = [k for k in start if k.endswith("lora_A.weight")]
    assert lora_a and lora_b
    assert any(after_warmup[k].abs().sum() > 0 for k in lora_b)  # the warm-up trained LoRA ...
    for k in lora_a + lora_b:
        assert torch.equal(restart[k], start[k]), k  # ... and the restart threw it away: the same fresh init
    assert all(not k.endswith("rosa_spa.values") for k in start)  # no sparse values before the masks
    values = [k for k in restart if k.endswith("rosa_spa.values")]
    assert values and all(restart[k].abs().sum() == 0 for k in values)
    # the new optimizer covers the sparse values and LoRA: both moved after the restart
    assert all(final[k].abs().sum() > 0 for k in values)
    assert any(final[k].abs().sum() > 0 for k in lora_b)


def test_saved_adapter_reloads_with_the_same_logits(run):
    from rosa_peft import RosaModel
    from rosa_peft.masks import load_masks

    model, adapter = run["model"], run["root"] / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    saved_masks = load_masks(str(adapter / "masks.safetensors"))
    assert all(torch.equal(saved_masks[k], m) for k, m in model.get_masks().items())
    reloaded = RosaModel.from_pretrained(make_tiny_llama(0), str(adapter)).eval()
    ids = run["tok"]("<s>u:add 3 and 4</s><s>a:", return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_sft_loss_matches_a_float64_reference_on_the_rosa_model(run):
    """Whatever loss path this TRL version takes (newer ones patch a fused LM head onto the causal LM
    inside), it runs through the RoSA layers and equals the mean token NLL of the model's own logits."""
    trainer, model = run["trainer"], run["model"]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    model.train()  # lora_dropout is 0: train mode changes nothing numerically
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    want = torch.nn.functional.cross_entropy(logits[:, :-1][keep].double(), labels[keep])
    torch.testing.assert_close(loss.detach().double(), want, rtol=1e-5, atol=1e-6)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".rosa_spa." in n and n.endswith(".values")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_default_loss_type_trains_a_rosa_model(tmp_path, one_thread):
    """TRL's default ``loss_type`` (a fused or chunked LM head on recent versions) needs no extra option."""
    from rosa_peft import RosaConfig, get_rosa_model
    from rosa_peft.train import ScheduleConfig, rosa_trainer_class

    model = get_rosa_model(make_tiny_llama(0), RosaConfig(r=2, density=DENSITY, lora_dropout=0.0))
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=5e-3,
                         save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, bf16=False,
                         max_length=64)
    trainer = rosa_trainer_class(trl.SFTTrainer)(
        model=model, args=args, train_dataset=_chats(), processing_class=_char_tokenizer(),
        schedule=ScheduleConfig(mode="rosa", warmup_steps=1, seed=7))
    result = trainer.train()
    assert result.global_step == 3 and math.isfinite(result.training_loss)
    assert model.get_masks()


def test_an_adapted_lm_head_is_refused_when_the_loss_bypasses_it(tmp_path):
    from rosa_peft import RosaConfig, get_rosa_model
    from rosa_peft.train import rosa_trainer_class
    from rosa_peft.utils.checks import UserError

    model = get_rosa_model(make_tiny_llama(0), RosaConfig(r=2, density=DENSITY, target_modules=["q_proj", "lm_head"]))
    if not _patches_the_head():
        pytest.skip("this TRL version's default loss uses the model's own logits")
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, bf16=False)
    with pytest.raises(UserError, match="adapter on lm_head would never be trained"):
        rosa_trainer_class(trl.SFTTrainer)(model=model, args=args, train_dataset=_chats(),
                                           processing_class=_char_tokenizer())


def _patches_the_head() -> bool:
    """Whether this TRL's default SFT loss goes through a patched LM head (TRL >= 1.16) or the logits."""
    from packaging.version import Version

    return Version(trl.__version__) >= Version("1.16.0")


def test_is_peft_model_is_restored_after_construction(run):
    import accelerate.utils
    import trl.trainer.sft_trainer as sft

    assert sft.is_peft_model is accelerate.utils.is_peft_model
    assert not sft.is_peft_model(run["model"])
