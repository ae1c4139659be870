"""Publishing a directory (an export, a conversion) to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub

from ..errors import LatentKVError, first_line


def upload_listing(folder: Path) -> list[dict]:
    """The files `push` uploads: every file under `folder` but hidden ones (temporaries, locks)."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return [{"path": str(p.relative_to(folder)), "bytes": p.stat().st_size} for p in files]


def push(folder, repo_id: str, private: bool = False, dry_run: bool = False) -> dict:
    """Create (or reuse) the model repo `repo_id` and upload `folder` in one commit.
    -> {repo_id, private, files [{path, bytes}], bytes, dry_run, url (after an upload)}."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LatentKVError(f"{folder} is not a directory; pass the folder `latentkv export` (or convert) wrote")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise LatentKVError(f"--repo-id {repo_id!r}: give it as OWNER/NAME, e.g. me/smollm2-135m-mla50")
    files = upload_listing(folder)
    if not files:
        raise LatentKVError(f"{folder} holds no files to upload")
    out = {"repo_id": repo_id, "private": private, "files": files, "bytes": sum(f["bytes"] for f in files),
           "dry_run": dry_run}
    if dry_run:
        return out
    try:
        huggingface_hub.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                               ignore_patterns=[".*", "**/.*"], commit_message="Upload with latentkv push")
    except Exception as e:  # network, auth and offline errors all come from deep inside huggingface_hub/requests
        reason = first_line(e)
        raise LatentKVError(f"could not push to {repo_id} ({reason}); check the network, `hf auth login` or HF_TOKEN, "
                            "and that HF_HUB_OFFLINE is unset") from None
    return {**out, "url": str(getattr(commit, "commit_url", commit))}


# what a streaming conversion reads of a hub repo: weights as safetensors only (no pickles), configs, tokenizer
SNAPSHOT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer*", "*.model", "*.txt"]


def local_snapshot(source: str) -> Path:
    """A local directory for `source`: itself when it is one, else the hub repo's snapshot (downloaded into
    the Hugging Face cache, or found there when HF_HUB_OFFLINE=1), safetensors weights only."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise LatentKVError(f"{source} not found: no such directory, and not a hub id (OWNER/NAME); check the path")
    try:
        return Path(huggingface_hub.snapshot_download(source, allow_patterns=SNAPSHOT_PATTERNS))
    except Exception as e:  # offline with nothing cached, unknown repo, gated repo, no network
        reason = first_line(e)
        raise LatentKVError(f"could not get {source} from the hub ({reason}); download it once with network "
                            "(`hf download ID`), or pass a local directory; HF_HUB_OFFLINE=1 uses the cache only") from None

