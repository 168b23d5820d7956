"""Model cards, Hub resolve/push (with huggingface_hub monkeypatched: nothing downloads) and AutoRosaModel*."""
import json
import os
import shutil

import pytest
import torch
import yaml

from conftest import make_tiny_llama
from rosa_peft import hub
from rosa_peft.modelcard import MARKER, write_model_card

CFG = {"r": 4, "density": 0.02, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM",
       "rank_pattern": {}, "density_pattern": {}}


def front_matter(path):
    text = open(path, encoding="utf-8").read()
    assert text.startswith("---\n")
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head), body, text


# ---- model card ----------------------------------------------------------------------------------------
def test_model_card_front_matter_and_body(tmp_path):
    write_model_card(str(tmp_path), base_model="HuggingFaceTB/SmolLM2-135M", adapter_names=["default"],
                     configs={"default": CFG})
    meta, body, text = front_matter(tmp_path / "README.md")
    assert meta == {"library_name": "rosa-peft", "base_model": "HuggingFaceTB/SmolLM2-135M",
                    "tags": ["rosa", "lora", "sparse", "rosa-peft"], "pipeline_tag": "text-generation"}
    assert MARKER in text.split("\n---\n")[0]
    assert "RoSA" in body and "| `default` | `.` | 4 | 0.02 | 16 | `q_proj`, `v_proj` |" in body
    assert "rosa_peft.AutoRosaModelForCausalLM.from_pretrained(" in body
    assert "RosaModel.from_pretrained(base, " in body and "AutoTokenizer" in body
    assert not list(tmp_path.glob(".tmp-*"))  # written atomically, nothing left behind


def test_model_card_base_model_only_when_a_hub_id(tmp_path):
    local_base = tmp_path / "base"
    local_base.mkdir()
    for base in (None, str(local_base)):
        write_model_card(str(tmp_path), base_model=base, adapter_names=["default"],
                         configs={"default": dict(CFG, task_type=None)})
        meta, body, _ = front_matter(tmp_path / "README.md")
        assert "base_model" not in meta and "pipeline_tag" not in meta
        assert meta["library_name"] == "rosa-peft"
        if base:
            assert str(local_base) in body
    write_model_card(str(tmp_path), base_model="smollm2-135m", adapter_names=["default"], configs={"default": CFG})
    meta, body, _ = front_matter(tmp_path / "README.md")
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "load_model('smollm2-135m')" in body


def test_model_card_seq_cls_and_several_adapters(tmp_path):
    (tmp_path / "second").mkdir()
    (tmp_path / "second" / "adapter_config.json").write_text("{}")
    configs = {"default": dict(CFG, task_type="SEQ_CLS", density_pattern={"v_proj": 0.1}),
               "second": dict(CFG, r=2, task_type="SEQ_CLS", target_modules="all-linear")}
    write_model_card(str(tmp_path), base_model="org/base", adapter_names=["default", "second"], configs=configs)
    meta, body, _ = front_matter(tmp_path / "README.md")
    assert meta["pipeline_tag"] == "text-classification"
    assert "| `default` | `.` | 4 | 0.02 (`v_proj`: 0.1) |" in body
    assert "| `second` | `second` | 2 | 0.02 | 16 | `all-linear` |" in body
    assert "AutoRosaModelForSequenceClassification" in body and "AutoModelForSequenceClassification" in body
    assert "load_adapter" in body
    # Mixed task types: no pipeline tag.
    configs["second"]["task_type"] = "CAUSAL_LM"
    write_model_card(str(tmp_path), base_model="org/base", adapter_names=["default", "second"], configs=configs)
    assert "pipeline_tag" not in front_matter(tmp_path / "README.md")[0]


def test_model_card_we_wrote_is_rewritten(tmp_path):
    write_model_card(str(tmp_path), base_model="org/base", adapter_names=["default"], configs={"default": CFG})
    write_model_card(str(tmp_path), base_model="org/other", adapter_names=["default"],
                     configs={"default": dict(CFG, r=16)})
    meta, body, text = front_matter(tmp_path / "README.md")
    assert meta["base_model"] == "org/other"
    assert "| 16 |" in body and "| 4 |" not in body
    assert text.count("---\n") == 2


def test_model_card_merges_into_a_foreign_card_and_keeps_its_body(tmp_path):
    body = "# My model\n\nHand-written notes.\n\n---\n\nA rule above, not front matter.\n"
    (tmp_path / "README.md").write_text(
        "---\nlicense: mit\ntags:\n- custom\npipeline_tag: text-classification\nlibrary_name: peft\n---\n" + body)
    for _ in range(2):  # a second save must not duplicate tags nor touch the body
        write_model_card(str(tmp_path), base_model="org/base", adapter_names=["default"], configs={"default": CFG})
        text = (tmp_path / "README.md").read_text()
        assert text.endswith("\n" + body)
        assert MARKER not in text
        meta = yaml.safe_load(text.split("---\n")[1])
        assert meta == {"license": "mit", "tags": ["custom", "rosa", "lora", "sparse", "rosa-peft"],
                        "pipeline_tag": "text-classification", "library_name": "rosa-peft", "base_model": "org/base"}


def test_model_card_adds_front_matter_to_a_card_without_one(tmp_path):
    (tmp_path / "README.md").write_text("Just text.\n")
    write_model_card(str(tmp_path), base_model=None, adapter_names=["default"], configs={"default": CFG})
    meta, body, _ = front_matter(tmp_path / "README.md")
    assert meta["library_name"] == "rosa-peft" and meta["tags"] == ["rosa", "lora", "sparse", "rosa-peft"]
    assert body == "\nJust text.\n"


def test_model_card_with_invalid_front_matter_is_left_alone(tmp_path, caplog):
    original = "---\nkey: [unclosed\n---\nbody\n"
    (tmp_path / "README.md").write_text(original)
    write_model_card(str(tmp_path), base_model="org/base", adapter_names=["default"], configs={"default": CFG})
    assert (tmp_path / "README.md").read_text() == original
    assert "left" in caplog.text or "untouched" in caplog.text


# ---- resolve_adapter_dir -------------------------------------------------------------------------------
def fake_adapter(directory, base=None):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "adapter_config.json"), "w") as fh:
        json.dump(dict(CFG, base_model_name_or_path=base), fh)
    with open(os.path.join(directory, "adapter_model.safetensors"), "wb") as fh:
        fh.write(b"weights")


def test_resolve_local_directory_as_is(tmp_path):
    fake_adapter(tmp_path / "ad")
    fake_adapter(tmp_path / "ad" / "second")
    assert hub.resolve_adapter_dir(str(tmp_path / "ad")) == str(tmp_path / "ad")
    assert hub.resolve_adapter_dir(tmp_path / "ad", subfolder="second") == os.path.join(tmp_path / "ad", "second")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        hub.resolve_adapter_dir(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="nope"):
        hub.resolve_adapter_dir(str(tmp_path / "ad"), subfolder="nope")
    with pytest.raises(ValueError, match="subfolder"):
        hub.resolve_adapter_dir(str(tmp_path / "ad"), subfolder="../ad")


def test_resolve_neither_directory_nor_repo_id(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("no download"))
    for bad in (str(tmp_path / "missing" / "dir"), "a/b/c", "bad name!"):
        with pytest.raises(ValueError, match="neither a local adapter directory") as info:
            hub.resolve_adapter_dir(bad)
        assert bad in str(info.value)


def test_resolve_downloads_only_adapter_files(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        snap = tmp_path / "cache" / "snap"
        fake_adapter(snap)
        fake_adapter(snap / "sub")
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    path = hub.resolve_adapter_dir("user/adapter", revision="v1", token="tok", cache_dir=str(tmp_path / "cache"),
                                   local_files_only=True)
    assert path == str(tmp_path / "cache" / "snap")
    repo, kw = calls[-1]
    assert repo == "user/adapter"
    assert kw["allow_patterns"] == ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    assert (kw["revision"], kw["token"], kw["cache_dir"], kw["local_files_only"], kw["force_download"]) == \
        ("v1", "tok", str(tmp_path / "cache"), True, False)
    path = hub.resolve_adapter_dir("user/adapter", subfolder="sub/", force_download=True)
    assert path == os.path.join(tmp_path / "cache" / "snap", "sub")
    assert calls[-1][1]["allow_patterns"] == ["sub/adapter_config.json", "sub/adapter_model.safetensors",
                                              "sub/README.md", "README.md"]
    assert calls[-1][1]["force_download"] is True
    with pytest.raises(OSError, match="'user/adapter'.*subfolder 'other'.*no adapter_config.json"):
        hub.resolve_adapter_dir("user/adapter", subfolder="other")


def test_resolve_download_failure_names_the_id(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("offline and not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="'user/adapter'.*offline and not cached"):
        hub.resolve_adapter_dir("user/adapter", local_files_only=True)


# ---- push_adapter_to_hub -------------------------------------------------------------------------------
class FakeHfApi:
    instances = []

    def __init__(self, token=None):
        self.token, self.calls, self.uploaded, self.card = token, [], None, None
        FakeHfApi.instances.append(self)

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return type("RepoUrl", (), {"repo_id": repo_id if "/" in repo_id else "me/" + repo_id})()

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id, kwargs))
        self.uploaded = sorted(os.path.relpath(os.path.join(d, f), folder_path)
                               for d, _, files in os.walk(folder_path) for f in files)
        self.card = open(os.path.join(folder_path, "README.md"), encoding="utf-8").read()
        return "commit-info"


@pytest.fixture
def fake_api(monkeypatch):
    import huggingface_hub

    FakeHfApi.instances = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


def test_push_uploads_only_the_adapter_folder(fake_api, tmp_path):
    saved = []

    def save_fn(folder):
        saved.append(folder)
        fake_adapter(folder, base="org/base")

    out = hub.push_adapter_to_hub(save_fn, "adapter", private=True, token="tok", revision="dev",
                                  commit_message="msg")
    assert out == "commit-info" and len(saved) == 1 and not os.path.exists(saved[0])  # temp folder cleaned up
    api = fake_api.instances[-1]
    assert api.token == "tok"
    assert api.uploaded == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    (name0, repo0, kw0), (name1, repo1, kw1), (name2, repo2, kw2) = api.calls
    assert (name0, repo0, kw0["exist_ok"], kw0["private"]) == ("create_repo", "adapter", True, True)
    assert (name1, repo1, kw1["branch"]) == ("create_branch", "me/adapter", "dev")
    assert (name2, repo2, kw2["revision"], kw2["commit_message"], kw2["create_pr"]) == \
        ("upload_folder", "me/adapter", "dev", "msg", False)
    assert "from_pretrained('adapter')" in api.card and "base_model: org/base" in api.card


def test_push_keeps_a_foreign_card_and_create_pr(fake_api):
    def save_fn(folder):
        fake_adapter(folder)
        with open(os.path.join(folder, "README.md"), "w") as fh:
            fh.write("---\nlicense: mit\n---\nmine\n")

    hub.push_adapter_to_hub(save_fn, "org/adapter", create_pr=True, revision="main")
    api = fake_api.instances[-1]
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[-1][2]["create_pr"] is True
    meta = yaml.safe_load(api.card.split("---\n")[1])
    assert meta["license"] == "mit" and meta["library_name"] == "rosa-peft" and "rosa" in meta["tags"]
    assert api.card.endswith("---\n\nmine\n") and MARKER not in api.card


def test_push_rejects_unknown_kwargs_before_doing_anything(fake_api):
    def save_fn(folder):
        pytest.fail("must not save")

    with pytest.raises(TypeError, match="safe_serialization.*use_temp_dir|use_temp_dir"):
        hub.push_adapter_to_hub(save_fn, "org/adapter", safe_serialization=True, use_temp_dir=True)
    assert fake_api.instances == []


def test_push_refuses_a_folder_without_adapter(fake_api):
    with pytest.raises(ValueError, match="adapter_config.json"):
        hub.push_adapter_to_hub(lambda folder: None, "org/adapter")


# ---- AutoRosaModel* ------------------------------------------------------------------------------------
def random_rosa(base, seed=0, **cfg):
    from rosa_peft import RosaConfig, get_rosa_model

    torch.manual_seed(seed)
    model = get_rosa_model(base, RosaConfig(r=2, density=0.05, init_lora_weights=False, **cfg))
    g = torch.Generator().manual_seed(seed + 1)
    model.set_masks({n: torch.rand(l.out_features, l.in_features, generator=g) < 0.05 for n, l in model.rosa_layers()})
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(base dir, adapter dir, the RosaModel's logits on IDS) for a tiny Llama with a random adapter."""
    root = tmp_path_factory.mktemp("auto")
    base = make_tiny_llama()
    base.save_pretrained(root / "base")
    rosa = random_rosa(base)
    rosa.peft_config["default"].base_model_name_or_path = str(root / "base")
    rosa.save_pretrained(str(root / "adapter"))
    with torch.no_grad():
        logits = rosa(input_ids=IDS).logits
    return root / "base", root / "adapter", logits


IDS = torch.tensor([[1, 5, 9, 77, 3, 120, 64]])


def test_auto_causal_lm_from_local_folders_matches_the_saved_model(saved):
    from rosa_peft import RosaModel
    from rosa_peft.auto import AutoRosaModelForCausalLM

    _, adapter_dir, expected = saved
    model = AutoRosaModelForCausalLM.from_pretrained(str(adapter_dir))
    assert isinstance(model, RosaModel) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, expected)
    trainable = AutoRosaModelForCausalLM.from_pretrained(str(adapter_dir), adapter_name="mine", is_trainable=True)
    assert "mine" in trainable.peft_config
    assert any(p.requires_grad for p in trainable.parameters())


def test_auto_splits_hub_and_model_kwargs(saved, tmp_path, monkeypatch):
    import huggingface_hub
    import transformers

    from rosa_peft.auto import AutoRosaModelForCausalLM

    base_dir, adapter_dir, expected = saved
    snaps, loads = [], []

    def fake_snapshot(repo_id, **kwargs):
        snaps.append((repo_id, kwargs))
        shutil.copytree(adapter_dir, tmp_path / "snap" / "sub", dirs_exist_ok=True)
        return str(tmp_path / "snap")

    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def recording(klass, name, **kwargs):
        loads.append((name, dict(kwargs)))
        kwargs.pop("token"), kwargs.pop("cache_dir")
        return original(klass, name, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(recording))
    model = AutoRosaModelForCausalLM.from_pretrained(
        "user/adapter", revision="v2", subfolder="sub", token="tok", cache_dir=str(tmp_path / "c"),
        dtype=torch.float32, low_cpu_mem_usage=True)
    (repo, skw), = snaps
    assert repo == "user/adapter" and skw["revision"] == "v2" and skw["token"] == "tok"
    assert skw["allow_patterns"][0] == "sub/adapter_config.json"
    (name, lkw), = loads
    assert name == str(base_dir)
    assert lkw == {"token": "tok", "cache_dir": str(tmp_path / "c"), "dtype": torch.float32, "low_cpu_mem_usage": True}
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, expected)


def test_auto_needs_base_model_name_or_a_config_naming_it(saved, tmp_path):
    from rosa_peft import RosaConfig
    from rosa_peft.auto import AutoRosaModelForCausalLM

    rosa = random_rosa(make_tiny_llama())
    rosa.peft_config["default"].base_model_name_or_path = None
    rosa.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"adapter_config\.json.*'base_model_name_or_path' is missing or null"):
        AutoRosaModelForCausalLM.from_pretrained(str(tmp_path))
    config = RosaConfig.from_pretrained(str(tmp_path))
    config.base_model_name_or_path = str(saved[0])  # the same tiny Llama, saved by transformers
    model = AutoRosaModelForCausalLM.from_pretrained(str(tmp_path), config=config)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, rosa(input_ids=IDS).logits)


def test_auto_loads_the_embedded_default_with_load_model(tmp_path, monkeypatch):
    import transformers

    from rosa_peft.utils import model_loading as models
    from rosa_peft.auto import AutoRosaModelForCausalLM

    rosa = random_rosa(make_tiny_llama())
    rosa.peft_config["default"].base_model_name_or_path = "smollm2-135m"
    rosa.save_pretrained(str(tmp_path))
    with torch.no_grad():
        expected = rosa(input_ids=IDS).logits
    calls = []

    def fake_load_model(name=None, dtype="float32", device=None, **kwargs):
        calls.append((name, dtype, kwargs))
        return make_tiny_llama(), None

    monkeypatch.setattr(models, "load_model", fake_load_model)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("the embedded model goes through load_model")))
    model = AutoRosaModelForCausalLM.from_pretrained(str(tmp_path), token="tok", torch_dtype="float32",
                                                     device_map=None)
    assert calls == [("smollm2-135m", "float32", {"device_map": None})]
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, expected)


def test_auto_sequence_classification(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rosa_peft.auto import AutoRosaModelForSequenceClassification

    torch.manual_seed(0)
    base = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=3, pad_token_id=0)).eval()
    base.save_pretrained(tmp_path / "base")
    rosa = random_rosa(base, task_type="SEQ_CLS")
    assert "score" not in dict(rosa.rosa_layers())
    rosa.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    rosa.save_pretrained(str(tmp_path / "adapter"))
    model = AutoRosaModelForSequenceClassification.from_pretrained(str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, rosa(input_ids=IDS).logits)


def test_auto_task_type_mismatch_and_no_instances(saved):
    import transformers

    from rosa_peft.auto import AutoRosaModel, AutoRosaModelForCausalLM, AutoRosaModelForSequenceClassification

    _, adapter_dir, _ = saved
    with pytest.raises(ValueError, match="'CAUSAL_LM'.*AutoRosaModelForCausalLM"):
        AutoRosaModelForSequenceClassification.from_pretrained(str(adapter_dir))
    with pytest.raises(ValueError, match="AutoRosaModelForCausalLM, not AutoRosaModel"):
        AutoRosaModel.from_pretrained(str(adapter_dir))
    with pytest.raises(OSError, match="from_pretrained"):
        AutoRosaModelForCausalLM()
    assert AutoRosaModel._target_class is transformers.AutoModel
    assert AutoRosaModelForCausalLM._target_class is transformers.AutoModelForCausalLM
    assert AutoRosaModelForSequenceClassification._target_class is transformers.AutoModelForSequenceClassification


def test_push_a_real_rosa_model_uploads_no_base_weights(fake_api, saved):
    from rosa_peft import RosaModel

    base_dir, adapter_dir, _ = saved
    from transformers import AutoModelForCausalLM

    rosa = RosaModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir))
    hub.push_adapter_to_hub(rosa.save_pretrained, "org/adapter")
    assert fake_api.instances[-1].uploaded == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
