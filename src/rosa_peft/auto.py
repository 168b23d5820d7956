"""AutoRosaModel*: load a saved RoSA adapter together with the base model its config names (PEFT's AutoPeftModel*)."""
from __future__ import annotations

import inspect
import os
from typing import Any, Optional

from . import hub
from .model import RosaModel
from .utils import model_loading as models
from .utils.checks import UserError
from .utils.io import read_json_object

CONFIG_NAME = "adapter_config.json"
# Keyword arguments that locate the adapter (and, except subfolder, also the base model on the Hub).
_HUB_SHARED = ("token", "cache_dir", "local_files_only", "force_download")
# Task types with a dedicated class here, and the class that loads them.
_TASK_CLASSES = {"CAUSAL_LM": "AutoRosaModelForCausalLM", "SEQ_CLS": "AutoRosaModelForSequenceClassification"}


class _TransformersClass:
    """A class attribute that resolves to a transformers class on access (``import rosa_peft`` stays light)."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj, owner=None):
        import transformers

        return getattr(transformers, self.name)


def _is_default_model(name: str) -> bool:
    return bool(name) and models.is_default_model(name)


class AutoRosaModel:
    """Load ``RosaModel.from_pretrained(<base model>, <adapter>)`` in one call.

    The base model is the ``base_model_name_or_path`` recorded in the adapter's ``adapter_config.json``,
    loaded with ``_target_class.from_pretrained`` (the embedded default model ``"smollm2-135m"`` goes
    through :func:`rosa_peft.load_model` instead, offline). The tokenizer is not loaded: use
    ``transformers.AutoTokenizer.from_pretrained`` on the base model (or on the adapter folder when it
    holds one). Subclasses set ``_target_class`` (a transformers Auto class) and ``_task_type``.
    """

    _target_class: Any = _TransformersClass("AutoModel")
    _task_type: Optional[str] = None

    def __init__(self, *args, **kwargs):
        raise EnvironmentError(  # noqa: UP024 - the error transformers' Auto classes raise
            f"{type(self).__name__} is designed to be instantiated with "
            f"`{type(self).__name__}.from_pretrained(adapter_dir_or_id)`."
        )

    @classmethod
    def from_pretrained(
        cls,
        adapter_dir_or_id: str,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Any = None,
        revision: Optional[str] = None,
        **kwargs: Any,
    ):
        """The base model with the RoSA adapter at ``adapter_dir_or_id`` (a local folder or a Hub repo id).

        Args:
            adapter_dir_or_id: a folder written by ``RosaModel.save_pretrained``, or a Hub repo id.
            adapter_name: the name the adapter gets in the returned ``RosaModel``.
            is_trainable: keep the adapter trainable (default: inference mode, ``eval()``).
            config: a ``RosaConfig`` (or its dict) to use instead of the saved ``adapter_config.json``
                (its ``base_model_name_or_path`` and ``task_type`` win when set).
            revision: the adapter repository's revision (branch, tag or commit) on the Hub.
            **kwargs: ``subfolder`` locates the adapter inside its folder/repository; ``token``,
                ``cache_dir``, ``local_files_only`` and ``force_download`` apply to the adapter download
                and to the base model; everything else (``dtype`` / ``torch_dtype``, ``device_map``,
                ``trust_remote_code``, ``low_cpu_mem_usage``, ...) goes to the base model's loader.
        """
        subfolder = kwargs.pop("subfolder", None)
        hub_kwargs = {k: kwargs[k] for k in _HUB_SHARED if k in kwargs}
        adapter_dir = hub.resolve_adapter_dir(adapter_dir_or_id, subfolder=subfolder, revision=revision, **hub_kwargs)
        config_path = os.path.join(adapter_dir, CONFIG_NAME)
        saved = read_json_object(config_path)
        override = {}
        if config is not None:
            override = dict(config) if isinstance(config, dict) else config.to_dict()
        base_name = override.get("base_model_name_or_path") or saved.get("base_model_name_or_path")
        if not base_name or not isinstance(base_name, str):
            raise UserError(
                f"{config_path}: 'base_model_name_or_path' is missing or null, so {cls.__name__} cannot tell "
                "which base model to load; load it yourself and call RosaModel.from_pretrained(base, adapter_dir)"
            )
        cls._check_task_type(override.get("task_type", saved.get("task_type")), config_path)

        base_model = cls._load_base_model(base_name, kwargs)


        extra = {}
        if config is not None:
            params = inspect.signature(RosaModel.from_pretrained).parameters
            if "config" not in params:
                raise TypeError("this RosaModel.from_pretrained does not accept config=; "
                                "save the adapter with the config you want instead")
            extra["config"] = config
        return RosaModel.from_pretrained(base_model, adapter_dir, adapter_name=adapter_name,
                                         is_trainable=is_trainable, **extra)

    @classmethod
    def _check_task_type(cls, task_type: Optional[str], config_path: str) -> None:
        if task_type is None or task_type == cls._task_type:
            return
        if task_type in _TASK_CLASSES or cls._task_type is not None:
            wanted = _TASK_CLASSES.get(task_type, "AutoRosaModel")
            raise UserError(f"{config_path}: the adapter's task_type is {task_type!r}; load it with {wanted}, "
                            f"not {cls.__name__}")

    @classmethod
    def _load_base_model(cls, name: str, kwargs: dict):
        target = cls._target_class
        if not _is_default_model(name):
            return target.from_pretrained(name, **kwargs)
        # The embedded default model is local: Hub options mean nothing to it.
        local = {k: v for k, v in kwargs.items() if k not in _HUB_SHARED}
        import transformers

        if target is transformers.AutoModelForCausalLM:
            dtype = local.pop("dtype", None)
            torch_dtype = local.pop("torch_dtype", None)
            dtype = dtype if dtype is not None else torch_dtype if torch_dtype is not None else "float32"
            model, _tokenizer = models.load_model(name, dtype=None if dtype == "auto" else dtype, **local)
            return model
        return target.from_pretrained(models.resolve_model_path(name), **local)


class AutoRosaModelForCausalLM(AutoRosaModel):
    """:class:`AutoRosaModel` for ``task_type="CAUSAL_LM"`` adapters (``AutoModelForCausalLM`` base)."""

    _target_class = _TransformersClass("AutoModelForCausalLM")
    _task_type = "CAUSAL_LM"


class AutoRosaModelForSequenceClassification(AutoRosaModel):
    """:class:`AutoRosaModel` for ``task_type="SEQ_CLS"`` adapters (``AutoModelForSequenceClassification`` base)."""

    _target_class = _TransformersClass("AutoModelForSequenceClassification")
    _task_type = "SEQ_CLS"
