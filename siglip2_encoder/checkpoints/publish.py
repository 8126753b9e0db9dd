"""Publishing to the Hugging Face Hub: a folder with a generated model card, uploaded by huggingface_hub.

Everything publishable here (the tower, the image-text model, a projector, a LoRA-wrapped tower, the LLaVA-style VLM)
inherits :class:`HubMixin`: ``save_for_hub(folder, repo_id)`` writes what would be uploaded (its ``save_pretrained``
files and ``README.md``, a ``huggingface_hub.ModelCard``), and ``push_to_hub(repo_id, ...)`` writes that folder and
hands it to ``create_repo`` + ``upload_folder``. The card names the base checkpoint, what was trained and how, leaves
the training data for the user to fill in, carries the base checkpoint's license (read from its own card) unless one
is given, and shows loading code for this library and, where it loads the result, for transformers.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .hub import CheckpointError, CheckpointSource

__all__ = ["HubMixin", "ModelCardInfo", "base_license", "hub_id", "write_model_card"]

logger = logging.getLogger(__name__)

LIBRARY_NAME = "siglip2-encoder"
TRAINING_DATA_PLACEHOLDER = "[Describe the training data here: source, size, license, and how it was filtered.]"


@dataclass(frozen=True)
class ModelCardInfo:
    """What a generated model card says."""

    title: str
    summary: str
    details: Sequence[tuple[str, str]]  # (field, value) rows: base checkpoint, recipe, projector, LoRA settings
    snippet: str  # loading code with this library; "{repo_id}" stands for the repo
    transformers_snippet: str | None = None  # the same with transformers alone, where it loads the result
    base_model: str | None = None  # the base checkpoint's Hub id, for the card's metadata
    tags: Sequence[str] = field(default_factory=tuple)
    # The library whose loading code and widget the Hub shows: "transformers" (or "peft") for folders it loads, this
    # library's name for formats only this library reads.
    library_name: str = LIBRARY_NAME
    pipeline_tag: str | None = None  # the Hub's task for the folder, e.g. "image-feature-extraction"


def hub_id(name_or_path: str | None) -> str | None:
    """``name_or_path`` if it names a Hub repo rather than a local folder."""
    if not name_or_path or Path(name_or_path).expanduser().exists() or name_or_path.startswith((".", "/", "~")):
        return None
    return name_or_path


def base_license(name_or_path: str | None) -> str | None:
    """The license in the base checkpoint's own model card (README.md front matter), if it can be read (a local
    folder, the cache, or the Hub when reachable); None otherwise."""
    if not name_or_path:
        return None
    from huggingface_hub import ModelCard

    try:
        card = CheckpointSource(name_or_path).get("README.md")
    except CheckpointError:  # unreachable Hub, bad id: the card then says the license is to be set
        return None
    return ModelCard.load(card).data.license if card is not None else None


def write_model_card(
    folder: str | os.PathLike, repo_id: str, info: ModelCardInfo, *, license: str | None, training_data: str | None
) -> None:
    """``README.md`` in ``folder``: metadata (license, base model, library, task, tags) and the card's text."""
    from huggingface_hub import ModelCard, ModelCardData

    tags = list(dict.fromkeys([*info.tags, LIBRARY_NAME]))  # found by this library's name whichever library loads it
    data = ModelCardData(
        license=license,
        library_name=info.library_name,
        pipeline_tag=info.pipeline_tag,
        base_model=info.base_model,
        tags=tags,
    )
    rows = "\n".join(f"| {name} | {value} |" for name, value in info.details)
    license_line = license or "not known: the base checkpoint's card could not be read; set it before sharing"
    parts = [
        f"---\n{data.to_yaml()}\n---",
        f"# {info.title}",
        info.summary,
        "## Details",
        f"| field | value |\n|---|---|\n{rows}\n| license | {license_line} |",
        "## Training data",
        training_data or TRAINING_DATA_PLACEHOLDER,
        "## Use it",
        f"With [siglip2-encoder](https://pypi.org/project/siglip2-encoder/):\n\n```python\n"
        f"{info.snippet.format(repo_id=repo_id).strip()}\n```",
    ]
    if info.transformers_snippet:
        code = info.transformers_snippet.format(repo_id=repo_id).strip()
        parts.append(f"With transformers alone:\n\n```python\n{code}\n```")
    ModelCard("\n\n".join(parts) + "\n").save(Path(folder) / "README.md")


class HubMixin:
    """``save_for_hub`` and ``push_to_hub`` for a class with ``save_pretrained(folder)``, ``model_card_info()`` and
    ``base_checkpoint`` (the name or path it was built from)."""

    def model_card_info(self) -> ModelCardInfo:
        raise NotImplementedError

    @property
    def base_checkpoint(self) -> str | None:
        return None

    def save_for_hub(
        self,
        folder: str | os.PathLike,
        repo_id: str,
        *,
        license: str | None = None,
        training_data: str | None = None,
        **save_options,
    ) -> Path:
        """Write exactly what :meth:`push_to_hub` uploads: the model's files (``save_pretrained(folder,
        **save_options)``, e.g. the VLM's ``tokenizer=``) and README.md, its model card."""
        folder = Path(folder)
        self.save_pretrained(folder, **save_options)  # type: ignore[attr-defined]
        license = license or base_license(self.base_checkpoint)
        if license is None:
            logger.warning("the base checkpoint's license is not known; pass license= to state it in the card")
        write_model_card(folder, repo_id, self.model_card_info(), license=license, training_data=training_data)
        return folder

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | bool | None = None,
        private: bool = False,
        revision: str | None = None,
        commit_message: str = "Upload with siglip2-encoder",
        license: str | None = None,
        training_data: str | None = None,
        **save_options,
    ) -> str:
        """Create ``repo_id`` if needed (``private``), write :meth:`save_for_hub`'s folder and upload it with
        huggingface_hub (to branch ``revision``, created if missing); returns the commit's URL."""
        from huggingface_hub import create_branch, create_repo, upload_folder

        create_repo(repo_id, token=token, private=private, exist_ok=True)
        if revision is not None:
            create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_for_hub(folder, repo_id, license=license, training_data=training_data, **save_options)
            commit = upload_folder(
                folder_path=folder, repo_id=repo_id, revision=revision, token=token, commit_message=commit_message
            )
        return str(getattr(commit, "commit_url", commit))
