"""Data for the reference model: datasets, collate, the hashtag vocabulary, curation, loaders.

See reference_model/README.md, "Samples and batches", for the item format and the API.
Nothing is downloaded: synthetic data is generated, openclipart and Fashion-MNIST come from
Debian packages, user data from local folders and tar shards.
"""

from .base import CaptionDataset, UnreadableSample, normalize_tag, parse_tags
from .curation import (Curated, CurationReport, StepReport, balance_report, balance_weights,
                       curate, pseudo_label, remove_duplicates, remove_many_tags,
                       remove_rare_tags, tag_frequencies)
from .fashion_mnist import FashionMNIST
from .folder import ImageFolderCaptions, VideoFolder
from .loader import ResumableLoader, collate, make_loader
from .openclipart import OpenClipart
from .packages import MissingPackage
from .registry import NAMES, WEB_LIKE, build_dataset
from .synthetic import IMAGE_CLASSES, MOTIONS, SyntheticClips, SyntheticImages
from .vocab import HashtagVocab
from .webdataset_shards import WebDatasetShards

__all__ = [
    "CaptionDataset", "UnreadableSample", "normalize_tag", "parse_tags",
    "Curated", "CurationReport", "StepReport", "balance_report", "balance_weights", "curate",
    "pseudo_label", "remove_duplicates", "remove_many_tags", "remove_rare_tags",
    "tag_frequencies", "FashionMNIST", "ImageFolderCaptions", "VideoFolder",
    "ResumableLoader", "collate", "make_loader", "OpenClipart", "MissingPackage", "NAMES",
    "WEB_LIKE", "build_dataset", "IMAGE_CLASSES", "MOTIONS", "SyntheticClips",
    "SyntheticImages", "HashtagVocab", "WebDatasetShards",
]
