"""ViGGO in the RoSA direction: utterance -> meaning representation.

The prompt is the paper's instruction (three sentences joined by single spaces, no period after
``'specifier']``), then the target sentence; the response is ``meaning_representation``.
RoSA trains on ``train`` and evaluates on ``validation`` with the same prompt.
"""
from __future__ import annotations

from .base import Example, FileTask
from ._files import get_field

FUNCTIONS = ["inform", "request", "give_opinion", "confirm", "verify_attribute", "suggest",
             "request_explanation", "recommend", "request_attribute"]
ATTRIBUTES = ["name", "exp_release_date", "release_year", "developer", "esrb", "rating", "genres",
              "player_perspective", "has_multiplayer", "platforms", "available_on_steam",
              "has_linux_release", "has_mac_release", "specifier"]

INSTRUCTION = (
    "Given a target sentence construct the underlying meaning representation of the input sentence "
    "as a single function with attributes and attribute values. "
    "This function should describe the target string accurately and the function must be one of the "
    f"following {FUNCTIONS}. "
    f"The attributes must be one of the following: {ATTRIBUTES}"
)

PROMPT_TEMPLATE = INSTRUCTION + "\n\n### Target sentence:\n{target}\n\n### Meaning representation:\n"


def viggo_prompt(target: str) -> str:
    """The exact RoSA ViGGO prompt for one target sentence."""
    return PROMPT_TEMPLATE.format(target=target)


class ViGGOTask(FileTask):
    name = "viggo"
    description = "video-game utterance -> meaning representation (train 5,103 / validation 714 / test 1,083)"
    splits = ("train", "validation", "test")
    train_split = "train"
    eval_split = "validation"
    subdir = "viggo"
    files = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}
    hf_id = "GEM/viggo"

    def convert(self, record: dict, source: str, lineno: int, split: str) -> Example:
        target = get_field(record, "target", source, lineno)
        mr = get_field(record, "meaning_representation", source, lineno)
        meta = {"meaning_representation": mr, "target": target}
        if isinstance(record.get("gem_id"), str):
            meta["gem_id"] = record["gem_id"]
        return Example(prompt=viggo_prompt(target), response=mr, meta=meta)
