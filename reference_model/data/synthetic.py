"""``synthetic``: procedurally drawn scenes and clips with captions and hashtags (the default data).

Images: one or two shapes (6 shapes × 6 colours × 2 sizes, rotated a little, lit from the top
left) on a grey textured background (5 textures). Captions name size, colour and shape of each
object and, for two, their relation ("a small red star left of a large blue circle"); the second
caption is a paraphrase (the relation inverted with the objects swapped, or synonyms). Hashtags:
the colours, shapes, sizes and the texture. Single-object scenes carry a class label among the
36 "colour shape" classes (zero-shot classification); two-object scenes have label -1.

Clips: one shape (from a small palette, 3 colours × 2 shapes by default) moving left / right /
up / down, rotating, growing or shrinking (7 motion classes, the label) over T frames on a
static textured background; caption "a red square moving left", paraphrase "a red square that
moves to the left", hashtags colour, shape, texture, motion.

So colour and shape decide zero-shot classification, the relation decides retrieval among
two-object scenes of the same objects, and only motion decides the clip's class.

Every item is a pure function of (seed, split, index): random access, any worker order, any
resolution and frame count give the same scene. ``train`` also mimics web data on request
(``duplicate_rate``, ``tag_noise``, ``spam_rate``, ``untagged_rate``) for the curation steps.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

from . import shapes as S
from .base import CaptionDataset, check_index, check_size, make_meta

SPLITS = {"train": 0, "val": 1, "test": 2}
# radius, a fraction of the side: at 32 px a small shape is 8-10 px across, two patches of
# the tiny model (smaller ones made every shape a blob the model could not tell apart)
SIZES = {"small": (0.12, 0.15), "large": (0.18, 0.22)}
RELATIONS = ("left of", "right of", "above", "below")
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_SYNONYM = {"left of": "to the left of", "right of": "to the right of", "above": "over",
            "below": "under"}
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "rotating", "growing",
           "shrinking")
_MOTION_PARAPHRASE = {"moving left": "that moves to the left",
                      "moving right": "that moves to the right",
                      "moving up": "that moves up", "moving down": "that moves down",
                      "rotating": "that spins", "growing": "that gets bigger",
                      "shrinking": "that gets smaller"}
_MOTION_TAGS = {"moving left": ["moving", "left"], "moving right": ["moving", "right"],
                "moving up": ["moving", "up"], "moving down": ["moving", "down"],
                "rotating": ["rotating"], "growing": ["growing"], "shrinking": ["shrinking"]}
# uninformative web-style tags, drawn Zipf-like (a few common, a long rare tail)
NOISE_TAGS = tuple(f"tag{k:02d}" for k in range(60))
_NOISE_WEIGHTS = [1.0 / (k + 1) ** 1.5 for k in range(len(NOISE_TAGS))]
IMAGE_CLASSES = [f"{c} {s}" for c in S.COLOURS for s in S.SHAPES]
IMAGE_PROMPTS = ["a {}.", "a photo of a {}.", "a picture of a {}.", "a drawing of a {}.",
                 "a small {}.", "a large {}.", "a {} on a textured background."]
VIDEO_PROMPTS = ["a shape {}.", "a video of a shape {}.", "an object {}."]
# clips draw their object from a small palette: in a batch of 16 a clip then has ~2.5 others
# of the same look, so a contrastive loss can only tell them apart by their motion (with all
# 36 looks, colour and shape alone would match clips to captions and motion would never be
# learnt)
CLIP_COLOURS = ("red", "green", "blue")
CLIP_SHAPES = ("square", "triangle")
_COLOUR_RGB = {k: np.asarray(v, dtype=np.float32) for k, v in S.COLOURS.items()}


def _rng(*key: int) -> np.random.Generator:
    """numpy's generator for the pixels (textures, sensor noise) of one item."""
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]))


def _prng(*key: int) -> random.Random:
    """Python's generator for one item's scene: seeding it costs microseconds, not the
    ~50-100 us of a numpy SeedSequence, so meta() (curation, vocabulary) stays cheap."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _choice(rng: random.Random, seq):
    return seq[rng.randrange(len(seq))]


def _sample_object(rng, shape=None, size_word=None, colours=tuple(S.COLOURS),
                   shapes=S.SHAPES) -> dict:
    size_word = size_word or _choice(rng, tuple(SIZES))
    lo, hi = SIZES[size_word]
    return {"shape": shape or _choice(rng, shapes), "colour": _choice(rng, colours),
            "size": size_word, "radius": rng.uniform(lo, hi), "angle": rng.uniform(-0.25, 0.25),
            "jitter": np.array([rng.uniform(-0.06, 0.06) for _ in range(3)], np.float32),
            "shade": rng.uniform(0.05, 0.2)}


def _place_pair(rng, a: dict, b: dict, relation: str) -> None:
    """Centres for a (first) and b so that 'a <relation> b' holds and they do not overlap:
    separated along the relation's axis by more than the radii, off-axis by less."""
    horizontal = relation in ("left of", "right of")
    axis = 0 if horizontal else 1
    after = 1.0 if relation in ("left of", "above") else -1.0  # b after a along the axis
    gap_min = a["radius"] + b["radius"] + 0.03
    ra, rb = a["radius"], b["radius"]
    for _ in range(200):
        pa = (rng.uniform(ra, 1 - ra), rng.uniform(ra, 1 - ra))
        pb = (rng.uniform(rb, 1 - rb), rng.uniform(rb, 1 - rb))
        along = (pb[axis] - pa[axis]) * after
        if along > gap_min and abs(pb[1 - axis] - pa[1 - axis]) < 0.5 * along:
            a["cx"], a["cy"], b["cx"], b["cy"] = pa[0], pa[1], pb[0], pb[1]
            return
    # the radii leave almost no room: put them at the two ends of the axis
    ends = (ra + 0.01, 1 - rb - 0.01) if after > 0 else (1 - ra - 0.01, rb + 0.01)
    if horizontal:
        a["cx"], a["cy"], b["cx"], b["cy"] = ends[0], 0.5, ends[1], 0.5
    else:
        a["cx"], a["cy"], b["cx"], b["cy"] = 0.5, ends[0], 0.5, ends[1]


def _phrase(obj: dict, with_size: bool = True) -> str:
    return f"a {obj['size'] + ' ' if with_size else ''}{obj['colour']} {obj['shape']}"


def _web_tags(rng, tags: list[str], tag_noise: float, spam_rate: float,
              untagged_rate: float) -> list[str]:
    """Make clean tags look like web hashtags: sometimes none, sometimes an uninformative
    Zipf-distributed extra tag, rarely a spam burst of many."""
    u = [rng.random() for _ in range(3)]
    if u[0] < untagged_rate:
        return []
    if u[1] < tag_noise:
        tags = tags + rng.choices(NOISE_TAGS, weights=_NOISE_WEIGHTS)
    if u[2] < spam_rate:
        tags = tags + rng.sample(NOISE_TAGS, 12)
    return list(dict.fromkeys(tags))


class _Synthetic(CaptionDataset):
    """Shared by the image and clip datasets: seeding, splits, duplicates, web-style tags."""

    _kind_code = 0

    def __init__(self, n: int, size: int, seed: int, split: str, duplicate_rate: float,
                 tag_noise: float, spam_rate: float, untagged_rate: float, noise: float):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n: expected a positive int (number of items), got {n!r}")
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {tuple(SPLITS)}, got {split!r}")
        for name, v in (("duplicate_rate", duplicate_rate), ("tag_noise", tag_noise),
                        ("spam_rate", spam_rate), ("untagged_rate", untagged_rate)):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1], got {v}")
        self.n, self.size, self.seed, self.split = n, check_size(size), int(seed), split
        self.duplicate_rate, self.tag_noise = float(duplicate_rate), float(tag_noise)
        self.spam_rate, self.untagged_rate = float(spam_rate), float(untagged_rate)
        self.noise = float(noise)
        self._grid = S.grid(self.size)

    def __len__(self) -> int:
        return self.n

    def _key(self, i: int, stream: int) -> random.Random:
        return _prng(self.seed, SPLITS[self.split], self._kind_code, i, stream)

    def _pixel_rng(self, src: int) -> np.random.Generator:
        return _rng(self.seed, SPLITS[self.split], self._kind_code, src, 1)

    def source(self, i: int) -> int:
        """The index whose scene item i shows: i itself, or an earlier one it duplicates."""
        i = check_index(i, self.n)
        while i > 0 and self.duplicate_rate > 0:
            r = self._key(i, 9)
            if r.random() >= self.duplicate_rate:
                break
            i = r.randrange(i)
        return i

    def content_hash(self, i: int) -> str:
        """Hash of the item's content. Its pixels are a pure function of the generator's
        settings and the scene it shows (``source``), so hashing those finds exactly the
        duplicates that hashing the rendered pixels finds, without rendering (a test checks
        the two agree)."""
        key = (type(self).__name__, self.seed, self.split, self.size, self.frames, self.noise,
               self.source(i))
        return hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest()

    def _web(self, src: int, tags: list[str]) -> list[str]:
        return _web_tags(self._key(src, 3), tags, self.tag_noise, self.spam_rate,
                         self.untagged_rate)

    def _sensor_noise(self, rng, img: np.ndarray) -> np.ndarray:
        if self.noise > 0:
            img = img + rng.normal(0.0, self.noise, size=img.shape).astype(np.float32)
        return np.clip(img, 0.0, 1.0)


class SyntheticImages(_Synthetic):
    """Scenes of one or two shapes with captions, paraphrases and hashtags.

    Args:
        n: number of items. size: image side in pixels. seed, split ("train" | "val" |
        "test"): the stream; splits never share a scene. two_object_rate: fraction of
        two-object scenes. duplicate_rate, tag_noise, spam_rate, untagged_rate: web-data
        imperfections (0 gives clean data). noise: std of per-pixel sensor noise.

    Items: ``image`` (3, size, size); ``label`` in ``classes`` ("red circle", ...) for
    single-object scenes, -1 for two objects.

    Equivalent (what an item is)::

        scene = sample(seed, split, index)  # texture, objects, relation
        image = render(scene, size); caption = describe(scene)
    """

    _kind_code = 0
    kind = "image"
    classes = IMAGE_CLASSES
    prompts = IMAGE_PROMPTS
    shape_classes = list(S.SHAPES)
    colour_classes = list(S.COLOURS)

    def __init__(self, n: int = 10000, size: int = 32, *, seed: int = 0, split: str = "train",
                 two_object_rate: float = 0.6, duplicate_rate: float = 0.0,
                 tag_noise: float = 0.0, spam_rate: float = 0.0, untagged_rate: float = 0.0,
                 noise: float = 0.02):
        super().__init__(n, size, seed, split, duplicate_rate, tag_noise, spam_rate,
                         untagged_rate, noise)
        if not 0.0 <= float(two_object_rate) <= 1.0:
            raise ValueError(f"two_object_rate: expected a probability in [0, 1], "
                             f"got {two_object_rate}")
        self.two_object_rate = float(two_object_rate)

    def scene(self, i: int) -> dict:
        """The scene of item i: texture, objects (shape, colour, size, centre, ...), relation."""
        src = self.source(i)
        rng = self._key(src, 0)
        texture = _choice(rng, S.TEXTURES)
        if rng.random() < self.two_object_rate:
            a, b = _sample_object(rng), _sample_object(rng)
            relation = _choice(rng, RELATIONS)
            _place_pair(rng, a, b, relation)
            objects = [a, b]
        else:
            a = _sample_object(rng)
            a["cx"], a["cy"] = (rng.uniform(a["radius"], 1 - a["radius"]) for _ in range(2))
            objects, relation = [a], None
        return {"source": src, "texture": texture, "objects": objects, "relation": relation,
                "paraphrase": rng.randrange(3)}

    def meta(self, i: int) -> dict:
        i = check_index(i, self.n)
        sc = self.scene(i)
        objs, rel, k = sc["objects"], sc["relation"], sc["paraphrase"]
        if rel is None:
            o = objs[0]
            caption = _phrase(o)
            caption2 = (f"one {o['size']} {o['colour']} {o['shape']}",
                        f"a picture of a {o['size']} {o['colour']} {o['shape']}",
                        f"a {o['size']} {o['shape']} coloured {o['colour']}")[k]
            label = IMAGE_CLASSES.index(f"{o['colour']} {o['shape']}")
        else:
            a, b = objs
            caption = f"{_phrase(a)} {rel} {_phrase(b)}"
            caption2 = (f"{_phrase(b)} {_INVERSE[rel]} {_phrase(a)}",
                        f"there is {_phrase(a)} {_SYNONYM[rel]} {_phrase(b)}",
                        f"{_phrase(b)} with {_phrase(a)} {_SYNONYM[rel]} it")[k]
            label = -1
        tags = []
        for o in objs:
            tags += [o["colour"], o["shape"], o["size"]]
        tags.append(sc["texture"])
        return make_meta(i, caption, caption2, self._web(sc["source"], tags), label)

    def swapped_caption(self, i: int) -> str | None:
        """Item i's caption with the relation inverted and the objects kept in place ("a red
        star left of a blue circle" -> "a red star right of a blue circle"): a false caption
        that only the relation tells apart from the true one. None for one-object scenes."""
        sc = self.scene(check_index(i, self.n))
        if sc["relation"] is None:
            return None
        a, b = sc["objects"]
        return f"{_phrase(a)} {_INVERSE[sc['relation']]} {_phrase(b)}"

    def pixels(self, i: int) -> torch.Tensor:
        sc = self.scene(i)
        rng = self._pixel_rng(sc["source"])
        x, y = self._grid
        img = S.background(rng, sc["texture"], x, y)
        for o in sc["objects"]:
            alpha = S.shape_alpha(o["shape"], x, y, o["cx"], o["cy"], o["radius"], o["angle"],
                                  self.size)
            rgb = np.clip(_COLOUR_RGB[o["colour"]] + o["jitter"], 0, 1)
            S.paint(img, alpha, rgb, o["shade"], x, y, o["cx"], o["cy"], o["radius"])
        img = self._sensor_noise(rng, img)
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


class SyntheticClips(_Synthetic):
    """Clips of one shape moving, rotating, growing or shrinking; the motion is the label.

    Args as :class:`SyntheticImages`, plus ``frames`` (T >= 1; motion shows from T >= 2) and
    the object palette ``colours`` / ``shapes`` (default :data:`CLIP_COLOURS` ×
    :data:`CLIP_SHAPES`: few looks, so motion is what tells clips apart).
    Items: ``video`` (3, T, size, size); ``label`` in ``classes`` (the 7 motions).
    ``prompts`` (zero-shot on motions) name every look of the palette, as the captions do.
    """

    _kind_code = 1
    kind = "video"
    classes = list(MOTIONS)

    def __init__(self, n: int = 2000, size: int = 32, frames: int = 8, *, seed: int = 0,
                 split: str = "train", duplicate_rate: float = 0.0, tag_noise: float = 0.0,
                 spam_rate: float = 0.0, untagged_rate: float = 0.0, noise: float = 0.02,
                 colours=CLIP_COLOURS, shapes=CLIP_SHAPES):
        super().__init__(n, size, seed, split, duplicate_rate, tag_noise, spam_rate,
                         untagged_rate, noise)
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"frames: expected an int >= 1, got {frames!r}")
        self.frames = frames
        self.colours, self.shapes = tuple(colours), tuple(shapes)
        bad = [c for c in self.colours if c not in S.COLOURS] + \
            [x for x in self.shapes if x not in S.SHAPES]
        if bad or not self.colours or not self.shapes:
            raise ValueError(f"colours, shapes: expected non-empty subsets of "
                             f"{tuple(S.COLOURS)} and {S.SHAPES}, got {bad or 'an empty one'}")
        self.rotatable = tuple(x for x in self.shapes if x not in S.ROTATION_INVARIANT)
        # an ensemble over what a clip is not classified by, in the captions' own words
        self.prompts = VIDEO_PROMPTS + [f"a {c} {x} {{}}" for c in self.colours
                                        for x in self.shapes]

    def scene(self, i: int) -> dict:
        """The clip's texture, object, motion and its start/end state."""
        src = self.source(i)
        rng = self._key(src, 0)
        texture = _choice(rng, S.TEXTURES)
        motions = MOTIONS if self.rotatable else tuple(m for m in MOTIONS if m != "rotating")
        motion = _choice(rng, motions)
        shape = None
        if motion == "rotating":  # a circle or ring would not show it
            shape = _choice(rng, self.rotatable)
        o = _sample_object(rng, shape=shape, colours=self.colours, shapes=self.shapes)
        r0 = r1 = o["radius"]
        a0 = a1 = o["angle"]
        if motion in ("growing", "shrinking"):
            small, large = rng.uniform(0.08, 0.1), rng.uniform(0.2, 0.24)
            r0, r1 = (small, large) if motion == "growing" else (large, small)
        if motion == "rotating":
            a1 = a0 + rng.choice((-1, 1)) * rng.uniform(0.5, 0.9)  # 30-50 degrees
        rmax = max(r0, r1)
        p0 = [rng.uniform(rmax, 1 - rmax) for _ in range(2)]
        p1 = list(p0)
        if motion.startswith("moving"):
            dist = rng.uniform(0.35, 0.5)
            axis = 0 if motion in ("moving left", "moving right") else 1
            step = -dist if motion in ("moving left", "moving up") else dist
            start = rng.uniform(rmax, 1 - rmax - dist) if step > 0 else \
                rng.uniform(rmax + dist, 1 - rmax)
            p0[axis], p1[axis] = start, start + step
        return {"source": src, "texture": texture, "motion": motion, "object": o,
                "start": (float(p0[0]), float(p0[1]), float(r0), float(a0)),
                "end": (float(p1[0]), float(p1[1]), float(r1), float(a1)),
                "paraphrase": rng.randrange(2)}

    def meta(self, i: int) -> dict:
        i = check_index(i, self.n)
        sc = self.scene(i)
        o, m = sc["object"], sc["motion"]
        caption = f"a {o['colour']} {o['shape']} {m}"
        caption2 = (f"a {o['colour']} {o['shape']} {_MOTION_PARAPHRASE[m]}",
                    f"a video of a {o['colour']} {o['shape']} {m}")[sc["paraphrase"]]
        tags = [o["colour"], o["shape"], sc["texture"]] + _MOTION_TAGS[m]
        return make_meta(i, caption, caption2, self._web(sc["source"], tags), MOTIONS.index(m))

    def pixels(self, i: int) -> torch.Tensor:
        sc = self.scene(i)
        rng = self._pixel_rng(sc["source"])
        x, y = self._grid
        bg = S.background(rng, sc["texture"], x, y)
        o = sc["object"]
        rgb = np.clip(_COLOUR_RGB[o["colour"]] + o["jitter"], 0, 1)
        T = self.frames
        out = np.empty((3, T, self.size, self.size), dtype=np.float32)
        for t in range(T):
            f = t / (T - 1) if T > 1 else 0.0
            cx, cy, r, a = (s + f * (e - s) for s, e in zip(sc["start"], sc["end"]))
            img = bg.copy()
            alpha = S.shape_alpha(o["shape"], x, y, cx, cy, r, a, self.size)
            S.paint(img, alpha, rgb, o["shade"], x, y, cx, cy, r)
            out[:, t] = self._sensor_noise(rng, img).transpose(2, 0, 1)
        return torch.from_numpy(out)


def motion_of(label: int) -> str:
    """The motion class name of a clip label."""
    return MOTIONS[label]


def colour_shape_of(label: int) -> tuple[int, int]:
    """(colour index, shape index) of an image label (a "colour shape" class)."""
    return divmod(int(label), len(S.SHAPES))


__all__ = ["SyntheticImages", "SyntheticClips", "IMAGE_CLASSES", "MOTIONS", "RELATIONS",
           "CLIP_COLOURS", "CLIP_SHAPES", "colour_shape_of", "motion_of"]
