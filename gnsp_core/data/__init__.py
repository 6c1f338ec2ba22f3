"""Task data: samples and tasks, ImageFolder folders, archives, built-in tasks, MTIL and reference pairs."""

from gnsp_core.data.archives import ArchiveLimits, safe_extract
from gnsp_core.data.folders import FolderLayout, validate_image_folder
from gnsp_core.data.samples import ImageLike, ImageSamples, Task, cap_task, per_class_subset, split_per_class, to_rgb
from gnsp_core.data.sources import load_task

__all__ = [
    "ArchiveLimits", "FolderLayout", "ImageLike", "ImageSamples", "Task", "cap_task", "load_task",
    "per_class_subset", "safe_extract", "split_per_class", "to_rgb", "validate_image_folder",
]
