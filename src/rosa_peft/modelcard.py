"""Write (or merge into) the ``README.md`` model card saved beside a RoSA adapter."""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Optional

from .utils.io import atomic_write_text, read_json_object
from .utils.model_loading import is_default_model

log = logging.getLogger("rosa_peft.modelcard")

CARD_NAME = "README.md"
LIBRARY_NAME = "rosa-peft"
TAGS = ["rosa", "lora", "sparse", "rosa-peft"]
# A YAML comment in the front matter: invisible to YAML parsers, present only in cards we generated.
MARKER = "# generated-by: rosa-peft"
# PEFT task types -> Hub pipeline tags.
PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_CLS": "text-classification",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
# Task types -> the rosa_peft.auto class that loads them.
AUTO_CLASSES = {"CAUSAL_LM": "AutoRosaModelForCausalLM", "SEQ_CLS": "AutoRosaModelForSequenceClassification"}
# Task types -> the transformers Auto class of the base model.
BASE_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification"}
# The Hub id of the embedded default model (rosa_peft.utils.model_loading loads a de-quantised GGUF copy of it).
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

_FRONT_MATTER = re.compile(r"\A\ufeff?---[ \t]*\r?\n(.*?)^---[ \t]*(?:\r?\n|\Z)", re.DOTALL | re.MULTILINE)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def write_model_card(
    directory: str,
    *,
    base_model: Optional[str],
    adapter_names: list[str],
    configs: dict[str, dict],
    repo_id: Optional[str] = None,
    subfolders: Optional[dict[str, str]] = None,
) -> None:
    """Write ``directory/README.md`` describing the adapters ``adapter_names`` (their ``configs`` as dicts).

    Call it after the adapter files are saved. A card that rosa-peft wrote before is rewritten; any
    other existing card keeps its body and only gets our front-matter keys merged in (``library_name``,
    ``base_model``, the tags, and ``pipeline_tag`` unless it has one). A card whose front matter is not
    valid YAML is left untouched (with a warning).

    ``repo_id`` (optional) is used in the loading snippets instead of a placeholder. ``subfolders``
    maps an adapter name to its folder relative to ``directory`` (``""`` = the directory itself); by
    default ``"default"`` lives in the directory itself and any other adapter in ``<name>/`` when that
    folder holds an ``adapter_config.json``, else in the directory itself.
    """
    import yaml

    names = list(adapter_names)
    if not names:
        raise ValueError("write_model_card needs at least one adapter name")
    missing = [n for n in names if n not in configs]
    if missing:
        raise ValueError(f"no config given for adapter(s) {', '.join(map(repr, missing))}")
    folders = {n: _folder_of(directory, n, subfolders) for n in names}
    ours = _front_matter_keys(base_model, [configs[n] for n in names])
    path = os.path.join(directory, CARD_NAME)

    existing = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            existing = fh.read()
    if existing is not None and not _written_by_us(existing):
        match = _FRONT_MATTER.match(existing)
        body = existing[match.end():] if match else existing
        meta: Any = {}
        if match:
            try:
                meta = yaml.safe_load(match.group(1)) or {}
            except yaml.YAMLError as exc:
                meta = exc
            if not isinstance(meta, dict):
                log.warning("%s: front matter is not a YAML mapping (%s); leaving the model card untouched",
                            path, meta if isinstance(meta, Exception) else type(meta).__name__)
                return
        merged = _merge(meta, ours)
        text = "---\n" + yaml.safe_dump(merged, sort_keys=False, allow_unicode=True) + "---\n"
        if body and not body.startswith("\n"):
            text += "\n"
        atomic_write_text(path, text + body)
        return

    front = yaml.safe_dump(ours, sort_keys=False, allow_unicode=True)
    body = _body(base_model, names, configs, folders, repo_id)
    atomic_write_text(path, f"---\n{MARKER}\n{front}---\n\n{body}")


def write_model_card_from_dir(directory: str, *, repo_id: Optional[str] = None) -> None:
    """(Re)write the card of a saved adapter directory from its ``adapter_config.json`` file(s).

    The adapter in the directory itself is called ``"default"``; every sub-folder holding an
    ``adapter_config.json`` is an adapter of that name. ``base_model`` comes from the first config
    that names one (else the existing card's ``base_model``). Used by :func:`rosa_peft.hub.push_adapter_to_hub`.
    """

    configs, folders = {}, {}
    if os.path.isfile(os.path.join(directory, "adapter_config.json")):
        configs["default"] = read_json_object(os.path.join(directory, "adapter_config.json"))
        folders["default"] = ""
    for entry in sorted(os.listdir(directory)):
        cfg = os.path.join(directory, entry, "adapter_config.json")
        if entry not in configs and os.path.isfile(cfg):
            configs[entry] = read_json_object(cfg)
            folders[entry] = entry
    if not configs:
        raise FileNotFoundError(f"{directory!r} holds no adapter_config.json (nor does any sub-folder)")
    base = next((c.get("base_model_name_or_path") for c in configs.values() if c.get("base_model_name_or_path")), None)
    if base is None:  # fall back on the base model an existing card names
        base = _existing_front_matter(os.path.join(directory, CARD_NAME)).get("base_model")
        base = base if isinstance(base, str) else None
    write_model_card(directory, base_model=base, adapter_names=list(configs), configs=configs,
                     repo_id=repo_id, subfolders=folders)


def card_written_by_rosa(path: str) -> bool:
    """Whether the model card at ``path`` was generated by rosa-peft (its front matter has our marker)."""
    with open(path, encoding="utf-8") as fh:
        return _written_by_us(fh.read())


# ---- helpers -------------------------------------------------------------------------------------------
def _existing_front_matter(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        match = _FRONT_MATTER.match(fh.read())
    try:
        meta = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _written_by_us(text: str) -> bool:
    match = _FRONT_MATTER.match(text)
    return bool(match) and any(line.strip() == MARKER for line in match.group(1).splitlines())


def _is_default_model(name: Optional[str]) -> bool:

    return bool(name) and is_default_model(name)


def _hub_base_model(base_model: Optional[str]) -> Optional[str]:
    """The ``base_model`` front-matter value: a Hub id, or None (unknown, or a local path the Hub rejects)."""
    if not base_model:
        return None
    if _is_default_model(base_model):
        return DEFAULT_MODEL_HUB_ID
    if os.path.exists(base_model) or not _REPO_ID.match(base_model) or ".." in base_model:
        return None
    return base_model


def _pipeline_tag(configs: list[dict]) -> Optional[str]:
    tags = {PIPELINE_TAGS.get(str(c.get("task_type"))) for c in configs}
    return tags.pop() if len(tags) == 1 else None


def _front_matter_keys(base_model: Optional[str], configs: list[dict]) -> dict:
    keys: dict[str, Any] = {"library_name": LIBRARY_NAME}
    hub_base = _hub_base_model(base_model)
    if hub_base:
        keys["base_model"] = hub_base
    keys["tags"] = list(TAGS)
    pipeline = _pipeline_tag(configs)
    if pipeline:
        keys["pipeline_tag"] = pipeline
    return keys


def _merge(meta: dict, ours: dict) -> dict:
    merged = dict(meta)
    merged["library_name"] = ours["library_name"]
    if "base_model" in ours:
        merged["base_model"] = ours["base_model"]
    tags = merged.get("tags") or []
    tags = [tags] if isinstance(tags, str) else list(tags)
    merged["tags"] = tags + [t for t in ours["tags"] if t not in tags]
    if "pipeline_tag" in ours and not merged.get("pipeline_tag"):
        merged["pipeline_tag"] = ours["pipeline_tag"]
    return merged


def _folder_of(directory: str, name: str, subfolders: Optional[dict[str, str]]) -> str:
    if subfolders is not None and name in subfolders:
        return subfolders[name].strip("/")
    if name == "default":
        return ""
    return name if os.path.isfile(os.path.join(directory, name, "adapter_config.json")) else ""


def _fmt_targets(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value) or "—"
    return f"`{value}`" if value else "—"


def _fmt_pattern(value: Any, pattern: Any) -> str:
    text = f"{value}"
    if isinstance(pattern, dict) and pattern:
        text += " (" + ", ".join(f"`{k}`: {v}" for k, v in pattern.items()) + ")"
    return text


def _body(base_model: Optional[str], names: list[str], configs: dict[str, dict], folders: dict[str, str],
          repo_id: Optional[str]) -> str:
    default_base = _is_default_model(base_model)
    if default_base:
        base_text = f"the embedded default model of rosa-peft ({DEFAULT_MODEL_HUB_ID}, `{base_model}`)"
    elif base_model:
        base_text = f"`{base_model}`"
    else:
        base_text = "an unrecorded base model"
    lines = [
        f"# RoSA adapter{'s' if len(names) > 1 else ''} for {base_model or 'a base model'}",
        "",
        f"[RoSA](https://arxiv.org/abs/2401.04679) (Robust Adaptation) adapter{'s' if len(names) > 1 else ''} "
        f"for {base_text}, saved by [rosa-peft](https://pypi.org/project/rosa-peft/). Each adapted linear "
        "layer keeps its frozen weight `W` and learns a low-rank update `B·A` (rank `r`, as in LoRA) plus a "
        "sparse update `S` whose share of `W`'s entries is the density. Only the adapter is stored here, "
        "never the base model.",
        "",
        "| adapter | folder | r | density | lora_alpha | target modules |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        c = configs[name]
        lines.append(
            f"| `{name}` | `{folders[name] or '.'}` | {_fmt_pattern(c.get('r'), c.get('rank_pattern'))} "
            f"| {_fmt_pattern(c.get('density'), c.get('density_pattern'))} | {c.get('lora_alpha')} "
            f"| {_fmt_targets(c.get('target_modules'))} |"
        )
    first = names[0]
    task = configs[first].get("task_type")
    auto_cls = AUTO_CLASSES.get(str(task), "AutoRosaModel")
    base_cls = BASE_CLASSES.get(str(task), "AutoModel")
    where = repo_id or "path/to/this/adapter"
    sub = folders[first]
    extra = (f', subfolder="{sub}"' if sub else "") + (f', adapter_name="{first}"' if first != "default" else "")
    local = repr(where) if not sub else f"os.path.join({where!r}, {sub!r})"
    lines += [
        "",
        "## How to load",
        "",
        "The base model named in `adapter_config.json` is loaded for you:",
        "",
        "```python",
        "import rosa_peft",
        "",
        f"model = rosa_peft.{auto_cls}.from_pretrained({where!r}{extra})",
        "```",
        "",
        "Or load the base model yourself and add the adapter:",
        "",
        "```python",
        *(["import os", ""] if sub else []),
        *(
            ["from rosa_peft import RosaModel, load_model", "", f"base, tokenizer = load_model({base_model!r})"]
            if default_base else
            [f"from transformers import {base_cls}", "", "from rosa_peft import RosaModel", "",
             f"base = {base_cls}.from_pretrained({(base_model or 'BASE_MODEL')!r})"]
        ),
        f"model = RosaModel.from_pretrained(base, {local}"
        + (f", adapter_name={first!r}" if first != "default" else "") + ")",
        "```",
        "",
        "`RosaModel.from_pretrained` takes a local folder (a downloaded copy of this repository). "
        "The tokenizer is not part of the adapter: load it with "
        "`transformers.AutoTokenizer.from_pretrained` from the base model (or from this folder if it holds one).",
    ]
    if len(names) > 1:
        lines += ["", "Further adapters load into the same model with "
                  "`model.load_adapter(<local folder of the adapter>, adapter_name=<name>)` "
                  "and are switched with `model.set_adapter(<name>)`."]
    return "\n".join(lines) + "\n"
