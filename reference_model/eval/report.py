"""The metrics table: one row per metric (chance level first), one column per block."""

from __future__ import annotations

# (metric, its chance key, label)
ROWS = [
    ("zero_shot_top1", "zero_shot_chance", "zero-shot top-1 (36 colour+shape)"),
    ("zero_shot_top5", "zero_shot_top5_chance", "zero-shot top-5"),
    ("zero_shot_shape_top1", "zero_shot_shape_chance", "zero-shot shape (6)"),
    ("zero_shot_colour_top1", "zero_shot_colour_chance", "zero-shot colour (6)"),
    ("i2t_r1", "i2t_chance_r1", "image->text R@1"),
    ("i2t_r5", "i2t_chance_r5", "image->text R@5"),
    ("i2t_r10", "i2t_chance_r10", "image->text R@10"),
    ("t2i_r1", "t2i_chance_r1", "text->image R@1"),
    ("t2i_r5", "t2i_chance_r5", "text->image R@5"),
    ("t2i_r10", "t2i_chance_r10", "text->image R@10"),
    ("relation_top1", "relation_chance", "relation (true vs inverted caption)"),
    ("video_top1", "video_chance", "video zero-shot (7 motions)"),
    ("video_probe_top1", "video_probe_chance", "video linear probe"),
    ("hashtag_map", "hashtag_map_chance", "hashtag mAP"),
    ("fmnist_top1", "fmnist_chance", "Fashion-MNIST zero-shot"),
]
ORDER = ("float", "int8", "tome", "evit", "index_int8", "index_pca_int8", "noise", "blur", "fgsm")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def format_table(result: dict) -> str:
    """The evaluation as a text table (percentages), then points lost vs float and timings."""
    blocks = [b for b in ORDER if b in result] + \
        [b for b in result if b not in ORDER and b != "meta"]
    width = max(len(label) for _, _, label in ROWS) + 2
    head = f"{'metric (%)':<{width}}{'chance':>8}" + "".join(f"{b:>15}" for b in blocks)
    lines = [head, "-" * len(head)]
    for key, chance_key, label in ROWS:
        if not any(key in result[b] for b in blocks):
            continue
        chance = next((result[b][chance_key] for b in blocks if chance_key in result[b]), None)
        row = f"{label:<{width}}{_pct(chance):>8}"
        for b in blocks:
            row += f"{_pct(result[b].get(key)):>15}"
        lines.append(row)
    meta = result.get("meta", {})
    lost = meta.get("points_lost_vs_float", {})
    if lost:
        lines.append("points lost vs float (worst metric): " +
                     ", ".join(f"{b} {v:.1f}" for b, v in lost.items()))
    if "index_pca_int8" in result:
        blk = result["index_pca_int8"]
        lines.append(f"index_pca_int8: dim {blk['dim']}, gallery bytes x"
                     f"{blk['i2t_bytes_ratio']:.3f} of float32 (i2t)")
    if meta.get("fmnist_skipped"):
        lines.append(f"Fashion-MNIST skipped: {meta['fmnist_skipped']}")
    if meta.get("seconds"):
        lines.append("seconds: " + ", ".join(f"{b} {s:.1f}" for b, s in meta["seconds"].items())
                     + f"; total {meta.get('seconds_total', 0):.1f}")
    return "\n".join(lines)
