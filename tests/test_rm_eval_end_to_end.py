"""The evaluation on a tiny random model runs end to end: every block, the chance levels, the
JSON, the table, the console script."""

import json
import math

import pytest
import torch

import reference_model as rm
from reference_model.data import HashtagVocab, SyntheticImages
from reference_model.eval import build_eval_data, evaluate
from reference_model.eval.__main__ import main
from reference_model.text import create_text_tower

SUMMARY_KEYS = ("zero_shot_top1", "zero_shot_chance", "i2t_r1", "t2i_r1",
                "retrieval_chance_r1", "video_top1", "video_chance", "hashtag_map")


def _tiny_models(depth=1):
    torch.manual_seed(0)
    over = {"depth": depth, "text_depth": 1}
    vit = rm.create_vit("tiny", **over)
    clip = rm.CLIPModel(vit, create_text_tower("clip", vit.cfg))
    vocab = HashtagVocab.build(SyntheticImages(200, 8, seed=0))
    hashtag = rm.HashtagModel(rm.create_vit("tiny", **over), len(vocab))
    return clip, hashtag, vocab


@pytest.fixture(scope="module")
def eval_data():
    return build_eval_data(16, 2, n_images=20, n_clips=7, n_fmnist=10, seed=7)


def test_evaluate_all_blocks(tmp_path, eval_data, capsys):
    clip, hashtag, vocab = _tiny_models()
    clip.train()
    hashtag.eval()
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    out = tmp_path / "metrics.json"
    res = evaluate(clip, hashtag_model=hashtag, vocab=vocab, size=16, frames=2,
                   data=eval_data, batch_size=32, out=out, show=True)
    assert set(res) == {"float", "int8", "tome", "evit", "index_int8", "index_pca_int8",
                        "noise", "blur", "fgsm", "meta"}
    for name in ("float", "int8", "tome", "evit", "noise", "blur", "fgsm"):
        for k in SUMMARY_KEYS:
            assert 0.0 <= res[name][k] <= 1.0, (name, k)
        assert "video_probe_top1" in res[name] and "zero_shot_shape_top1" in res[name]
        assert 0.0 <= res[name]["relation_top1"] <= 1.0
    for name in ("index_int8", "index_pca_int8"):
        assert {"i2t_r1", "t2i_r10", "retrieval_chance_r1"} <= set(res[name])
    assert res["index_pca_int8"]["dim"] == clip.embed_dim // 4
    # int8 codes + a scale per vector; (a 20-item gallery is too small for PCA's basis to pay)
    assert res["index_int8"]["i2t_bytes_ratio"] < 0.5
    fl = res["float"]
    assert fl["zero_shot_chance"] == pytest.approx(1 / 36)
    assert fl["video_chance"] == pytest.approx(1 / 7) and fl["relation_chance"] == 0.5
    n_texts = res["meta"]["n_texts"]
    assert fl["i2t_chance_r1"] == pytest.approx(1 / n_texts)
    assert 0 < fl["hashtag_map_chance"] < 1 and res["meta"]["hashtag_source"] == "hashtag_model"
    if eval_data.fmnist_images is not None:
        assert fl["fmnist_chance"] == pytest.approx(0.1) and "fmnist_top1" in res["int8"]
    # the variants differ from float only where they should: ToMe changes the embeddings,
    # the robustness blocks see other pixels; the index blocks rank the same embeddings
    assert res["fgsm"]["eps"] == pytest.approx(2 / 255)
    assert set(res["meta"]["points_lost_vs_float"]) == set(res) - {"float", "meta"}
    # the model is left as it was: training mode and weights
    assert clip.training and not hashtag.training
    after = clip.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in clip.parameters())
    saved = json.loads(out.read_text())
    assert saved["float"]["i2t_r1"] == fl["i2t_r1"]
    table = capsys.readouterr().out
    assert "zero-shot top-1" in table and "chance" in table and "index_pca_int8" in table


def test_evaluate_zero_shot_hashtags_and_subset(eval_data):
    clip, _, _ = _tiny_models()
    res = evaluate(clip, size=16, frames=2, variants=("float",), robustness=False,
                   data=eval_data, show=False)
    assert set(res) == {"float", "meta"}
    assert res["meta"]["hashtag_source"] == "zero-shot text prompts"
    assert not math.isnan(res["float"]["hashtag_map"])
    with pytest.raises(ValueError, match="variants"):
        evaluate(clip, variants=("float", "bogus"), data=eval_data)
    with pytest.raises(TypeError, match="CLIPModel"):
        evaluate(object(), data=eval_data)
    _, hashtag, vocab = _tiny_models()
    with pytest.raises(ValueError, match="vocab"):
        evaluate(clip, hashtag_model=hashtag, variants=("float",), robustness=False,
                 data=eval_data, show=False)


def test_tome_and_evit_change_the_image_side(eval_data):
    """Inference-only ToMe / EViT act on the model (different embeddings), and are off again
    after the evaluation. (Three blocks, and sharper attention than a random init's: ToMe with
    proportional attention under uniform attention, or a reduction after the last attention,
    leaves the CLS output as it was.)"""
    from reference_model.eval.suite import _reduction, default_evit, default_tome

    clip, _, _ = _tiny_models(depth=3)
    clip.eval()
    with torch.no_grad():
        for blk in clip.vit.blocks:
            blk.attn.qkv.weight.mul_(30)
    assert default_evit(clip.vit).locations == (1,)
    x = eval_data.images[:4]
    with torch.no_grad():
        ref = clip.encode_image(x)
        for kw in ({"tome": default_tome(clip.vit, 16)}, {"evit": default_evit(clip.vit)}):
            with _reduction([clip], **kw):
                assert not torch.allclose(clip.encode_image(x), ref, atol=1e-6)
            torch.testing.assert_close(clip.encode_image(x), ref)


def test_quantized_copy_image_side_only():
    import xray_ops as xo

    from reference_model.eval import quantized_copy

    clip, _, _ = _tiny_models()
    q = quantized_copy(clip, [clip.text_tower])
    seen = set()
    for name, m in q.named_modules():
        if isinstance(m, (torch.nn.Linear, xo.nn.Int8Linear)):
            part = name.split(".")[0]
            seen.add(part)
            assert isinstance(m, xo.nn.Int8Linear) == (part in ("vit", "visual_proj")), name
    assert seen == {"vit", "visual_proj", "text_tower", "text_proj"}
    assert q.text_tower is clip.text_tower and q.vit is not clip.vit
    assert type(clip.vit.blocks[0].attn.qkv) is torch.nn.Linear  # the original stays float


def test_console_script(tmp_path, capsys):
    out = tmp_path / "m.json"
    rc = main(["--random-init", "tiny", "--size", "16", "--frames", "2", "--n-images", "16",
               "--n-clips", "7", "--variants", "float,index", "--no-robustness",
               "--no-fashion-mnist", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res) == {"float", "index_int8", "index_pca_int8", "meta"}
    assert "wrote" in capsys.readouterr().out
    assert main(["--random-init", "tiny", "--variants", "nope"]) == 2
