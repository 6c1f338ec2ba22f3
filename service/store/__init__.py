"""The versioned store: model versions, the active pointer, job records and uploads, on a local
folder or any filesystem pyarrow.fs knows."""

from service.store.lease import LeaseLost, StoreLease
from service.store.model_store import ACTIVE, BLOBS, CLAIM, MANIFEST, SHARED_DIR, STATE_FILES, ModelStore, version_dir

__all__ = ["ACTIVE", "BLOBS", "CLAIM", "MANIFEST", "SHARED_DIR", "STATE_FILES", "LeaseLost", "ModelStore",
           "StoreLease", "version_dir"]
