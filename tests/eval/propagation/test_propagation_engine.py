"""The propagation engine against a plain reference, its invariants, and runs on real DAVIS."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from siamae.errors import SiamaeError
from siamae.eval.propagation.engine import (
    LabelPropagator,
    PropagationParams,
    check_resize_rule,
    extract_features,
    frame_size,
    labels_to_grid,
    neighbourhood_mask,
    protocol,
)
from siamae.eval.propagation.metrics import score_sequence


def reference_propagation(feats, first_labels, p: PropagationParams):
    """The protocol written out loop by loop (slow, obvious): the engine must match it."""
    t, d, h, w = feats.shape
    n = h * w
    f = feats.reshape(t, d, n)
    labels = [first_labels.reshape(first_labels.shape[0], n)]
    queue = [(0, labels[0])] * p.queue if p.pad_queue else []
    for target in range(1, t):
        context = [(0, labels[0], p.restrict_first)] + [(i, lab, True) for i, lab in queue]
        pred = torch.zeros_like(labels[0])
        for qi in range(n):
            qy, qx = divmod(qi, w)
            cands = []  # (score, label column)
            for frame, lab, restricted in context:
                for ki in range(n):
                    ky, kx = divmod(ki, w)
                    if restricted:
                        if p.neighbourhood == "square":
                            ok = abs(ky - qy) <= p.radius and abs(kx - qx) <= p.radius
                        else:
                            ok = math.hypot(ky - qy, kx - qx) < p.radius
                        if not ok:
                            continue
                    score = float(f[target, :, qi] @ f[frame, :, ki]) / p.temperature
                    cands.append((score, lab[:, ki]))
            cands.sort(key=lambda c: -c[0])
            top = cands[: p.topk]
            wts = torch.softmax(torch.tensor([c[0] for c in top]), 0)
            pred[:, qi] = sum(wt * c[1] for wt, c in zip(wts, top))
        labels.append(pred)
        queue = (queue + [(target, pred)])[-p.queue :] if p.queue else []
    return torch.stack([lab.reshape(-1, h, w) for lab in labels])


def random_features(t, d, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(t, d, h, w, generator=g, dtype=torch.float64).float(), dim=1)


def random_labels(c, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(c, h, w, generator=g), 0)


@pytest.mark.parametrize(
    "params",
    [
        PropagationParams(topk=5, radius=2, queue=3, chunk=7),
        PropagationParams(topk=3, radius=1.5, queue=2, pad_queue=False),
        PropagationParams(
            topk=4,
            radius=1,
            queue=2,
            neighbourhood="square",
            restrict_first=True,
            pad_queue=False,
            temperature=0.1,
        ),  # fmt: skip
    ],
)
def test_engine_matches_reference(params):
    feats = random_features(6, 8, 4, 5)
    first = random_labels(3, 4, 5)
    fast = torch.stack(list(LabelPropagator(params).propagate(feats, first)))
    slow = reference_propagation(feats, first, params)
    assert fast.shape == (6, 3, 4, 5)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def straightforward_step(p: PropagationParams, query, keys, labels, restricted):
    """One target frame the plain way: the whole (N, M*N) affinity divided by T, the
    neighbourhood masked slot by slot, one top-k, softmax, weighted sum of the labels."""
    d, h, w = query.shape
    n = h * w
    q = query.reshape(d, n)
    aff = torch.cat([q.T @ k.reshape(d, n) for k in keys], dim=1) / p.temperature
    allowed = neighbourhood_mask((h, w), p.radius, p.neighbourhood)
    for slot, r in enumerate(restricted):
        if r:
            aff[:, slot * n : (slot + 1) * n].masked_fill_(~allowed, float("-inf"))
    weights, idx = torch.topk(aff, min(p.topk, len(keys) * n), dim=1)
    ctx = torch.cat([lab.reshape(lab.shape[0], n) for lab in labels], dim=1)
    out = (ctx[:, idx] * torch.softmax(weights, dim=1)[None]).sum(dim=2)
    return out.reshape(-1, h, w)


@pytest.mark.parametrize("padded", [False, True, "partly"])
@pytest.mark.parametrize(
    "params",
    [
        PropagationParams(topk=7, radius=3, queue=4, chunk=9),
        PropagationParams(topk=5, radius=2, queue=3, neighbourhood="square", restrict_first=True),
        PropagationParams(topk=3, radius=2.5, queue=2, temperature=0.1, chunk=1),
    ],
)
def test_optimised_step_equals_the_straightforward_step(params, padded):
    """The engine's step (temperature on the kept scores only, one masking pass per run of
    restricted slots, padded copies multiplied once) gives the same labels and argmax."""
    feats = random_features(params.queue + 2, 16, 6, 7, seed=5)
    labels = [random_labels(4, 6, 7, seed=s) for s in range(params.queue + 1)]
    # Padding: the queue holds the first frame's features and labels again (the same tensors);
    # "partly": the first frame, one padded copy, then real frames (a queue filling up).
    if padded == "partly":
        keys = [feats[0], feats[0]] + list(feats[1 : params.queue])
        labels = [labels[0], labels[0]] + labels[1 : params.queue]
    elif padded:
        keys, labels = [feats[0]] * (params.queue + 1), [labels[0]] * (params.queue + 1)
    else:
        keys = list(feats[: params.queue + 1])
    restricted = [params.restrict_first] + [True] * params.queue
    fast = LabelPropagator(params).step(feats[-1], keys, labels, restricted)
    plain = straightforward_step(params, feats[-1], keys, labels, restricted)
    torch.testing.assert_close(fast, plain, atol=1e-6, rtol=1e-6)
    assert torch.equal(fast.argmax(0), plain.argmax(0))


def test_restricted_slots_need_not_be_contiguous():
    """A caller's own restriction pattern (restricted, free, restricted) masks each run."""
    p = PropagationParams(topk=4, radius=1.5, queue=2)
    feats = random_features(4, 8, 5, 5, seed=2)
    labels = [random_labels(3, 5, 5, seed=s) for s in range(3)]
    restricted = [True, False, True]
    fast = LabelPropagator(p).step(feats[3], list(feats[:3]), labels, restricted)
    plain = straightforward_step(p, feats[3], list(feats[:3]), labels, restricted)
    torch.testing.assert_close(fast, plain, atol=1e-6, rtol=1e-6)


def test_query_equal_to_context_copies_labels_with_top1():
    feats = random_features(1, 16, 5, 6, seed=3)
    feats = torch.cat([feats, feats])  # frame 1 is frame 0
    ids = torch.randint(0, 4, (5, 6), generator=torch.Generator().manual_seed(1))
    first = F.one_hot(ids, 4).permute(2, 0, 1).float()
    p = PropagationParams(topk=1, queue=0)
    out = list(LabelPropagator(p).propagate(feats, first))
    assert torch.equal(out[1], first)


def test_radius_excludes_far_queue_cells_but_never_first_frame_cells():
    d, h, w = 3, 1, 10
    prop = LabelPropagator(PropagationParams(topk=1, radius=3, queue=1, temperature=1.0))
    query = F.normalize(torch.ones(d, h, w), dim=0)
    first = torch.zeros(d, h, w)
    first[2] = 1.0  # dissimilar everywhere (score 0.577)
    queue = torch.zeros(d, h, w)
    queue[1] = 1.0
    queue[:, 0, 9] = F.normalize(torch.ones(d), dim=0)  # identical to the query (score 1)
    lab_first = torch.tensor([1.0, 0.0])[:, None, None].expand(2, h, w).clone()
    lab_queue = torch.tensor([0.0, 1.0])[:, None, None].expand(2, h, w).clone()
    out = prop.step(query, [first, queue], [lab_first, lab_queue], [False, True])
    assert torch.equal(out[:, 0, 8], torch.tensor([0.0, 1.0]))  # distance 1: uses the queue
    assert torch.equal(out[:, 0, 2], torch.tensor([1.0, 0.0]))  # distance 7: excluded
    # The same cell in the FIRST frame is never excluded.
    out = prop.step(query, [queue, first], [lab_queue, lab_first], [False, True])
    assert torch.equal(out[:, 0, 2], torch.tensor([0.0, 1.0]))


def test_soft_labels_sum_to_one_and_context_is_bounded():
    feats = random_features(12, 8, 5, 5, seed=5)
    first = random_labels(4, 5, 5, seed=2)
    p = PropagationParams(topk=6, radius=2, queue=3)
    seen = []

    class Spy(LabelPropagator):
        def step(self, query, keys, labels, restricted):
            seen.append(len(keys))
            return super().step(query, keys, labels, restricted)

    for soft in Spy(p).propagate(iter(list(feats)), first):
        torch.testing.assert_close(soft.sum(0), torch.ones(5, 5))
    assert max(seen) == 1 + p.queue  # memory bounded by the context, not the video


def test_features_in_batches_are_normalised():
    calls = []

    def enc(x):
        calls.append(x.shape[0])
        return torch.randn(x.shape[0], 6, x.shape[2] // 4, x.shape[3] // 4)

    frames = (torch.zeros(3, 8, 12) for _ in range(7))
    feats = list(extract_features(enc, frames, batch_size=3))
    assert calls == [3, 3, 1] and len(feats) == 7
    torch.testing.assert_close(feats[0].norm(dim=0), torch.ones(2, 3))


def test_protocol_presets_and_overrides():
    c = protocol("cropmae", "davis")
    assert (c.resize, c.temperature, c.topk, c.radius, c.queue) == ("480x880", 0.7, 7, 20, 20)
    assert protocol("cropmae", "vip").topk == 10
    assert protocol("cropmae", "jhmdb").resize == "320x320"
    d = protocol("dino", "davis")
    assert (d.temperature, d.topk, d.radius, d.queue, d.neighbourhood) == (
        0.1, 5, 12, 7, "square",
    )  # fmt: skip
    o = protocol("cropmae", "davis", ["topk=3", "pad_queue=false", "resize=long:440"])
    assert o.topk == 3 and o.pad_queue is False and o.resize == "long:440"
    for bad in (["nope=1"], ["topk=x"], ["neighbourhood=round"], ["resize=big"]):
        with pytest.raises(SiamaeError):
            protocol("cropmae", "davis", bad)
    with pytest.raises(SiamaeError):
        protocol("mine")


def test_frame_size_rules():
    assert frame_size("480x880", (480, 854), 16) == (480, 880)
    assert frame_size("long:880", (480, 854), 16) == (448, 880)  # short side floored to 64
    assert frame_size("long:880", (1080, 720), 16) == (880, 576)
    assert frame_size("short:480", (480, 854), 16) == (480, 832)  # DINO on DAVIS
    assert frame_size("native", (480, 854), 16) == (480, 848)


def test_labels_to_grid_bilinear_sums_to_one():
    ids = np.zeros((32, 48), dtype=np.uint8)
    ids[4:20, 10:30] = 1
    ids[20:, 30:] = 2
    soft = labels_to_grid(ids, 3, (2, 3), "bilinear")
    torch.testing.assert_close(soft.sum(0), torch.ones(2, 3))
    hard = labels_to_grid(ids, 3, (4, 6), "nearest")
    assert set(hard.unique().tolist()) == {0.0, 1.0}


# -- real DAVIS --------------------------------------------------------------------------------


def test_davis_ground_truth_as_prediction_scores_one(shared_data):
    from siamae.eval.propagation.davis import list_sequences, load_sequence, read_mask
    from siamae.eval.propagation.engine import resize_ids

    root = shared_data / "DAVIS"
    names = list_sequences(root, "2016/val")
    assert len(names) >= 2
    for name in names[:2]:
        seq = load_sequence(root, name)
        gt = np.stack([read_mask(p) for p in seq.masks[::4]])
        assert set(np.unique(gt).tolist()) <= {0, 1}
        assert score_sequence(name, gt, gt.copy()).j.min() == 1.0
        assert score_sequence(name, gt, gt.copy()).f.min() == 1.0
        small = np.stack([resize_ids(m, (480, 880)) for m in gt])  # the published resize
        s = score_sequence(name, small, small.copy())
        assert s.j.mean() == 1.0 and s.f.mean() == 1.0


def test_davis_random_init_tiny_vit(shared_data, tmp_path):
    from siamae import random_encoder
    from siamae.eval.propagation.davis import evaluate_davis

    encoder = random_encoder("vit_tiny_patch16")
    params = protocol("cropmae", "davis", ["resize=128x224"])
    res = evaluate_davis(
        encoder, shared_data / "DAVIS", tmp_path, params, sequences=["dog"], max_frames=5,
        overlays=["dog"], progress=False,
    )  # fmt: skip
    s = res.summary
    assert 0.0 <= s["J&F-Mean"] <= 1.0 and s["objects"] == 1
    assert s["protocol"] == "cropmae" and s["score_at"] == "resized"
    assert "random init" in s["encoder"]
    assert len(list((tmp_path / "dog").glob("*.png"))) == 5
    assert (tmp_path / "overlays" / "dog.png").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["J&F-Mean"] == s["J&F-Mean"]
    # Native scoring: predictions written at the annotations' size.
    res = evaluate_davis(
        encoder, shared_data / "DAVIS", tmp_path / "native", params, sequences=["dog"],
        max_frames=3, score_at="native", progress=False,
    )  # fmt: skip
    from PIL import Image

    assert Image.open(tmp_path / "native" / "dog" / "00001.png").size == (854, 480)
    assert "native" in res.summary["resolution"]


@pytest.mark.parametrize("size", [None, (480, 880)])
def test_davis_ground_truth_folder_scores_one(shared_data, tmp_path, size):
    """The real masks written as a submission folder score J&F = 1.0, native and resized."""
    from siamae.eval.propagation.davis import (
        load_sequence,
        read_mask,
        score_predictions,
        write_mask,
    )
    from siamae.eval.propagation.engine import resize_ids

    root = shared_data / "DAVIS"
    seq = load_sequence(root, "motocross-jump")
    (tmp_path / seq.name).mkdir()
    for m in seq.masks:
        ids = read_mask(m)
        write_mask(tmp_path / seq.name / f"{m.stem}.png", resize_ids(ids, size) if size else ids)
    summary, _ = score_predictions(root, tmp_path, sequences=[seq.name])
    assert summary["J&F-Mean"] == 1.0 and summary["objects"] == 1


@pytest.mark.parametrize("count", ["0", "1", "2"])
def test_davis_max_frames_below_three_is_refused(shared_data, tmp_path, count, capsys):
    from siamae.commands.cli import main

    code = main(
        ["eval", "davis", "--random-init", "vit_tiny_patch16", "--data-root",
         str(shared_data / "DAVIS"), "--sequences", "dog", "--max-frames", count,
         "--out", str(tmp_path / "out"), "--no-progress"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"siamae: error: --max-frames {count}: ") and "3 or more" in err[0]
    assert not (tmp_path / "out" / "dog").exists()  # nothing evaluated


@pytest.mark.parametrize(
    ("rule", "refused"),
    [("30x30", True), ("32x48", False), ("short:30", True), ("long:880", False), ("native", False)],
)
def test_a_fixed_resize_out_of_whole_patches_is_refused_before_any_frame(
    rule: str, refused: bool
) -> None:
    if refused:
        with pytest.raises(SiamaeError, match="multiple of the patch size 8"):
            check_resize_rule(rule, 8)
    else:
        check_resize_rule(rule, 8)


def test_davis_with_a_resize_out_of_whole_patches_is_one_line(tmp_path, capsys) -> None:  # noqa: ANN001
    from siamae.commands.cli import main

    out = tmp_path / "out"
    code = main(
        ["eval", "davis", "--random-init", "vit_tiny_patch8_32", "--data-root", str(tmp_path),
         "--set", "resize=30x30", "--out", str(out), "--no-progress"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'30x30'" in err[0], err
    assert not out.exists()
