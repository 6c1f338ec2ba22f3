"""Service settings: one typed object that `gnsp serve`, `serve run deploy/serve_config.yaml` and the
tests all build, and every deployment receives.

It is a pydantic model because it crosses the Serve config boundary (the YAML's `args`); inside
the service it is read-only data. Field docstrings are the documentation of the YAML keys.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gnsp_core.data.archives import ArchiveLimits
from gnsp_core.errors import ConfigError

TOKEN_ENV = "GNSP_API_TOKEN"


def is_loopback(host: str) -> bool:
    """Whether `host` is an address only this machine reaches (localhost, 127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[] ")).is_loopback
    except ValueError:
        return False


class ServiceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    store: str = "gnsp-store"
    """Store location: a local directory or a pyarrow.fs URI (file://, s3://, gs://, ...)."""
    model: str | None = None
    """open_clip architecture of version 1 when the store is empty (None: the embedded gnsp-mini)."""
    pretrained: str | None = None
    """open_clip pretrained tag or local .safetensors/.pt for version 1."""
    seed: int = 0
    activation: Literal["auto", "manual"] = "auto"
    """auto: a version that passes the quality gate becomes active; manual: only POST .../activate does."""
    heldout: str | None = "builtin"
    """Held-out zero-shot set for the quality gate: 'builtin' (the held-out suite of gnsp_core.data.heldout),
    'module:function' returning a Task, a task source (folder/archive/built-in name), or None (no gate)."""
    max_heldout_drop: float = 2.0
    """Gate: the largest allowed drop of held-out accuracy (percentage points) from the base version."""
    reference: str | None = "builtin"
    """Reference image-caption pairs for methods with distillation terms (see service.training.sources)."""
    default_method: str = "gnsp"
    prime_node: bool = True
    """Before the first job, compute on the job runner's node what every job would compute there on
    first use: the frozen parts' outputs for the reference pairs and the held-out suite's trunk rows
    (service.jobs.attempt.prime_node, run in service.jobs.host's actor). Jobs queued meanwhile wait
    for it (it saves them as much)."""
    workers: int = Field(1, ge=0)
    """Ray Train workers per job. 0: the job runner's attempt host trains in its own process (Ray
    Train's local mode; service.training.local_run), on one worker's resources reserved for the
    run: on one machine it saves the two processes a worker group starts per job, most of a small
    job's time. Search trials always run a worker group (at least one worker)."""
    cpus_per_worker: float | None = Field(None, gt=0)
    """CPUs (and torch threads) per worker; None: the cluster's free CPUs when the job starts,
    shared by the workers, so on one machine training gets every core the service does not hold."""
    gpus_per_worker: float = Field(0.0, ge=0)
    worker_resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each training worker (jobs and search trials) asks for, e.g.
    {"trainer": 1}: workers run only on nodes started with that resource (`ray start --resources`)."""
    checkpoint_every: int = Field(25, ge=1)
    on_restart: Literal["resume", "fail"] = "resume"
    """What a restarted service does with a job that was running: resume it from its last Ray Train
    checkpoint, or mark it failed ('interrupted')."""
    max_attempts: int = Field(2, ge=1)
    """A job interrupted this many times is marked failed instead of resumed again."""
    work_dir: str | None = None
    """Node-local scratch for uploads being received, stored files being fetched and datasets being
    extracted, on every node (None: system temp). Nothing in it is shared between nodes: what
    outlives a job step, or crosses nodes, lives in the store."""
    max_upload_bytes: int = Field(512 * 1024**2, ge=1)
    """Bytes of a dataset archive upload (the whole multipart body may add the small text fields)."""
    max_files: int = Field(20_000, ge=1)
    """Entries (files and folders) in an uploaded archive, images in a dataset."""
    max_total_bytes: int = Field(2 * 1024**3, ge=1)
    max_file_bytes: int = Field(50 * 1024**2, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    """Pixels of one dataset image (width x height, read from its header)."""
    max_concurrent_uploads: int = Field(2, ge=1)
    """Dataset uploads (POST /v1/tasks, multipart /v1/tune) received and validated at once per ingress;
    validation runs on a pool of this many threads, off the event loop. Another upload waits for a
    slot up to `upload_slot_wait_s`, then gets 429."""
    upload_slot_wait_s: float = Field(10.0, ge=0)
    body_idle_timeout_s: float = Field(5.0, gt=0)
    """Longest pause between two chunks of an upload's body (a dataset, a search request) before 408."""
    classify_idle_timeout_s: float = Field(1.5, gt=0)
    """Longest pause between two chunks of a classify body before 408: a classify body is small and
    sent at once, so a pause this long means a stalled client, which holds an ingress slot."""
    max_classify_bytes: int = Field(32 * 1024**2, ge=1)
    """Bytes of a whole classify request body."""
    classify_body_timeout_s: float = Field(10.0, gt=0)
    """Time to receive a whole classify request body before 408 (a slow client cannot hold it open)."""
    max_classify_images: int = Field(64, ge=1)
    """Images in one classify request."""
    max_classify_pixels: int = Field(4096 * 4096, ge=1)
    """Pixels of one image to classify (width x height, read from its header before it is decoded);
    a JPEG is then decoded at a reduced scale near the model's input size (Pillow's draft mode)."""
    max_labels: int = Field(1000, ge=1)
    """Candidate labels in one classify request."""
    max_label_chars: int = Field(200, ge=1)
    """Characters of one label."""
    classifier_replicas: int | Literal["auto"] = 1
    """Fixed replica count, or 'auto' for Serve autoscaling between min/max replicas."""
    classifier_min_replicas: int = Field(1, ge=0)
    classifier_max_replicas: int = Field(2, ge=1)
    classifier_cpus: float = Field(1.0, ge=0)
    """CPUs Ray reserves for each classifier replica; its forward runs this many torch threads."""
    classifier_gpus: float = Field(0.0, ge=0)
    classifier_threads: int = Field(0, ge=0)
    """torch threads per classifier replica; 0: the CPUs Ray assigned the replica (at least one),
    never the host's core count, which replicas and training workers beside it share."""
    classifier_max_ongoing: int = Field(256, ge=1)
    """Requests one classifier replica holds at once (it is their HTTP ingress; beyond this Serve's
    proxy queues them). Batches still hold at most `max_batch_size` images."""
    active_pointer_ttl_s: float = Field(1.0, gt=0)
    """How long a classifier replica uses the active pointer (and the list of stored versions) it
    read before reading it again: a swap reaches new requests within this time, and a store that
    cannot be read meanwhile does not fail classify requests."""
    ingress_replicas: int = Field(1, ge=1)
    max_versions_per_replica: int = Field(3, ge=1)
    """Bounded LRU of versions each classifier replica keeps loaded besides the active one. The
    version that unpinned requests use (the active one) is held besides and never evicted, so
    requests pinned to old versions cannot push it out."""
    min_version_load_interval_s: float = Field(1.0, ge=0)
    """A classifier replica loads a version for pinned requests at most this often (and one at a
    time); a pinned request that would need another load sooner gets 429 with Retry-After, so
    requests pinned to more old versions than a replica keeps cannot make it load without end.
    Loads for the active version and for activation checks are never refused."""
    max_version_loads_waiting: int = Field(8, ge=0)
    """Requests a classifier replica lets wait for a version it has not loaded (loads run one at a
    time); more get 429, so requests pinned to many old versions cannot queue loads without end."""
    max_batch_size: int = Field(16, ge=1)
    """Images in one classifier forward (a request's images stay together: one with more images than
    this is a batch of its own)."""
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    """How long a batch waits to fill when the classifier replica is idle (0: a lone request goes at once)."""
    busy_batch_wait_max_s: float = Field(0.25, ge=0)
    """While other requests are in the replica, a batch waits about one forward's time to fill, at
    most this long; 0 keeps the idle wait always (then, under load, most batches hold one request)."""
    text_head_cache: int = Field(256, ge=1)
    """Zero-shot heads (one per version and label set) each classifier replica keeps, LRU."""
    text_head_cache_labels: int = Field(50_000, ge=1)
    """Labels (head rows) those cached heads may hold in all, so the cache's memory is bounded too
    (50,000 rows of a 512-wide head: about 100 MB)."""
    api_token: str | None = Field(None, repr=False)
    """Bearer token for write endpoints; None reads GNSP_API_TOKEN (unset: no auth)."""
    insecure: bool = False
    """Serve on a non-loopback address without a token (every write open to the network): only
    behind a proxy or network that authenticates; without it such a service refuses to start."""
    metrics_need_token: bool = False
    """/metrics needs the bearer token too (when a token is set)."""

    @field_validator("store", "work_dir")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        """Resolve local paths where the settings are made: replicas may run in another directory."""
        if value is None or "://" in value:
            return value
        return str(Path(value).expanduser().resolve())

    @field_validator("pretrained")
    @classmethod
    def _absolute_file(cls, value: str | None) -> str | None:
        return str(Path(value).resolve()) if value and Path(value).is_file() else value

    def scratch(self) -> str | None:
        """`work_dir` on this node, made if missing (every node has its own; None: the system temp dir)."""
        if self.work_dir is not None:
            Path(self.work_dir).mkdir(parents=True, exist_ok=True)
        return self.work_dir

    def archive_limits(self) -> ArchiveLimits:
        return ArchiveLimits(max_files=self.max_files, max_total_bytes=self.max_total_bytes,
                             max_file_bytes=self.max_file_bytes, max_image_pixels=self.max_image_pixels)

    def token(self) -> str | None:
        """The bearer token in force: the configured one, else the environment's, else none."""
        return self.api_token or os.environ.get(TOKEN_ENV) or None

    def check_exposure(self, host: str | None) -> None:
        """Refuse to serve writes without a token on an address other machines can reach."""
        if host is None or is_loopback(host) or self.token() or self.insecure:
            return
        raise ConfigError(
            f"refusing to serve on {host} without an API token: anyone who can reach it could add tasks and "
            f"activate versions. Set {TOKEN_ENV} (or the api_token setting) so writes need "
            "'Authorization: Bearer <token>', listen on 127.0.0.1, or pass --insecure (setting insecure=true) "
            "if a proxy in front of the service authenticates")

    def with_token_from_env(self) -> "ServiceSettings":
        """Resolve the token where the app is built, so replicas need not share its environment."""
        return self if self.api_token else self.model_copy(update={"api_token": os.environ.get(TOKEN_ENV) or None})
