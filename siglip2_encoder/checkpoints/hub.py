"""Where checkpoint files come from: a local folder, or a Hugging Face Hub repo (its local cache first).

:class:`CheckpointSource` hands out local paths of a checkpoint's files and knows nothing about what they hold;
:mod:`~siglip2_encoder.checkpoints.folders` reads them. huggingface_hub is imported only when a Hub repo is asked for.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

__all__ = ["CheckpointError", "CheckpointSource", "FromPretrainedMixin", "HubUnreachableError"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the tower; the message says which file or weights."""


class HubUnreachableError(CheckpointError):
    """The Hub could not be reached (or offline mode is on) and the files are not in the local cache."""

    def __init__(self, repo_id: str, reason: str) -> None:
        self.repo_id, self.reason = repo_id, reason
        super().__init__(
            f"cannot fetch {repo_id!r} from the Hugging Face Hub ({reason}). Without Hub access, download the "
            f"checkpoint elsewhere and pass its local folder, e.g. "
            f"SigLIP2Encoder.from_pretrained('/path/to/{repo_id.split('/')[-1]}'); for an architecture with random "
            f"weights, use SigLIP2Encoder.from_preset(name)"
        )


class CheckpointSource:
    """A local folder or a Hub repo, fetching files on demand.

    Args:
        name_or_path: a folder, or a Hub repo id such as ``"google/siglip2-so400m-patch14-384"``.
        revision, cache_dir, token, local_files_only: as in ``huggingface_hub.hf_hub_download``; ``HF_HUB_OFFLINE=1``
            means ``local_files_only=True``.
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> None:
        self.path = Path(name_or_path).expanduser()
        self.is_local = self.path.is_dir()
        if not self.is_local and (self.path.exists() or str(name_or_path).startswith((".", "/", "~"))):
            raise CheckpointError(
                f"{str(name_or_path)!r} is not a folder; pass the folder that holds config.json and the weights"
            )
        self.repo_id = str(name_or_path)
        self.revision, self.cache_dir, self.token = revision, cache_dir, token
        self.local_files_only = local_files_only

    def __str__(self) -> str:
        return str(self.path) if self.is_local else f"Hub repo {self.repo_id!r}"

    @property
    def offline(self) -> bool:
        """True when only the local cache may be read (a Hub repo with local_files_only or HF_HUB_OFFLINE)."""
        if self.is_local:
            return False
        from huggingface_hub import constants

        return self.local_files_only or constants.HF_HUB_OFFLINE

    def get(self, filename: str) -> Path | None:
        """The local path of ``filename``, or None if the folder / repo has no such file.

        Offline, a file missing from the cache counts as absent: callers that find none of the files they can use
        raise :meth:`missing`, which then says that offline mode is why.
        """
        if self.is_local:
            file = self.path / filename
            return file if file.is_file() else None
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.errors import HFValidationError

        try:
            cached = try_to_load_from_cache(self.repo_id, filename, cache_dir=self.cache_dir, revision=self.revision)
        except HFValidationError as err:
            raise CheckpointError(
                f"{self.repo_id!r} is neither a local folder nor a valid Hub repo id: {err}"
            ) from None
        if isinstance(cached, str):
            return Path(cached)
        if cached is not None or self.offline:  # cached "no such file" marker, or we may not ask the Hub
            return None
        return self._download(filename)

    def missing(self, what: str) -> CheckpointError:
        """The error for a required file (``what`` names it) that :meth:`get` did not find."""
        if self.offline:
            return HubUnreachableError(self.repo_id, f"{what} is not in the local cache and offline mode is on")
        return CheckpointError(f"{self} has no {what}")

    def read_json(self, filename: str) -> dict[str, Any] | None:
        """A JSON object file, or None if the source has no such file."""
        file = self.get(filename)
        if file is None:
            return None
        try:
            value = json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{filename} of {self} is not valid JSON: {err}") from err
        if not isinstance(value, dict):
            raise CheckpointError(f"{filename} of {self} must hold a JSON object, got a {type(value).__name__}")
        return value

    def snapshot(self) -> Path:
        """A local folder holding every file of the checkpoint: the folder itself, or the repo's snapshot in the
        cache (downloaded if missing and allowed), for formats spread over several files and subfolders."""
        if self.is_local:
            return self.path
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        if not self.offline:
            self._check_reachable()
        try:
            return Path(
                snapshot_download(
                    self.repo_id,
                    revision=self.revision,
                    cache_dir=self.cache_dir,
                    token=self.token,
                    local_files_only=self.offline,
                )
            )
        except LocalEntryNotFoundError as err:
            raise HubUnreachableError(self.repo_id, str(err).splitlines()[0]) from None
        except Exception as err:  # a missing, gated or private repo, a bad revision: say which
            raise self._access_error(err) from None

    def _check_reachable(self) -> None:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or ""
        try:
            # huggingface_hub retries unreachable hosts for ~20 s; an unresolvable one fails here at once instead.
            socket.getaddrinfo(host, 443)
        except OSError as err:
            raise HubUnreachableError(self.repo_id, f"cannot resolve {host}: {err}") from None

    def _access_error(self, err: Exception) -> CheckpointError:
        return CheckpointError(
            f"cannot access {self.repo_id!r} (revision {self.revision or 'main'}) on the Hub: "
            f"{str(err).splitlines()[0]}. Check the id and revision; for gated or private repos log in or pass token="
        )

    def _download(self, filename: str) -> Path | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        self._check_reachable()
        try:
            return Path(
                hf_hub_download(
                    self.repo_id, filename, revision=self.revision, cache_dir=self.cache_dir, token=self.token
                )
            )
        except LocalEntryNotFoundError as err:  # a subclass of EntryNotFoundError: the network, not the file
            raise HubUnreachableError(self.repo_id, str(err).splitlines()[0]) from None
        except EntryNotFoundError:
            return None
        except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as err:
            raise self._access_error(err) from None


Loadable = TypeVar("Loadable", bound="FromPretrainedMixin")


class FromPretrainedMixin:
    """The one ``from_pretrained`` of every model class: a Hub id or a local folder becomes a
    :class:`CheckpointSource` with the Hub options, which the class reads in its ``from_source``."""

    name_or_path: str | None

    @classmethod
    def from_source(
        cls: type[Loadable], source: CheckpointSource, *, dtype: Any = None, device: Any = None
    ) -> Loadable:
        """Read the model from ``source`` (what checkpoints the class takes is said in its own docstring)."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(
        cls: type[Loadable],
        name_or_path: str | os.PathLike,
        *,
        dtype: Any = None,
        device: Any = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> Loadable:
        """Load from a local folder or a Hub repo (its local cache first; ``HF_HUB_OFFLINE=1`` or
        ``local_files_only=True`` reads the cache only), strictly, in eval(): what it reads is :meth:`from_source`'s.

        Args:
            name_or_path: a folder, or a Hub repo id such as ``"google/siglip2-so400m-patch14-384"``.
            dtype: the weights' dtype; None keeps the stored one.
            device: where the weights go (default: the CPU).
            revision, cache_dir, token, local_files_only: as in ``huggingface_hub.hf_hub_download``.
        """
        source = CheckpointSource(
            name_or_path, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
        )
        model = cls.from_source(source, dtype=dtype, device=device)
        model.name_or_path = str(name_or_path)
        return model
