"""Distillation losses against hand formulas, the Trainer-based distill() on tiny models (masks
kept, teacher untouched, resumable, labels), cross-layer sharing, and a 2-process torchrun run."""
import copy
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import pysparse
from pysparse.distill import (HiddenProjection, attention_kl, default_layer_map, distill,
                              embedding_loss, hidden_mse, logit_kd, neighbour_kl,
                              share_layers, similarity_loss)
from pysparse.formats.sparse24 import is_24
from pysparse.testing.models import tiny_bert, tiny_gpt2, tiny_llama


# ---------------------------------------------------------------------------------------------
# losses


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_logit_kd_formula(T, alpha):
    s, t = torch.randn(7, 5), torch.randn(7, 5)
    y = torch.randint(0, 5, (7,))
    kl = (F.softmax(t / T, -1) * (F.log_softmax(t / T, -1) - F.log_softmax(s / T, -1))).sum(-1)
    want = alpha * T * T * kl.mean() + (1 - alpha) * F.cross_entropy(s, y)
    torch.testing.assert_close(logit_kd(s, t, y, temperature=T, alpha=alpha), want)
    torch.testing.assert_close(logit_kd(s, t, temperature=T), T * T * kl.mean())


def test_logit_kd_masks_and_gradients():
    s = torch.randn(2, 6, 11, requires_grad=True)
    t = torch.randn(2, 6, 11)
    y = torch.randint(0, 11, (2, 6))
    y[0, 4:] = -100
    full = logit_kd(s, t, y, alpha=0.5)
    t2 = t.clone()
    t2[0, 4:] = 100 * torch.randn(2, 11)  # ignored positions: changing them changes nothing
    torch.testing.assert_close(logit_kd(s, t2, y, alpha=0.5), full)
    full.backward()
    assert s.grad is not None and s.grad[0, 4:].abs().max() == 0
    assert float(logit_kd(t, t)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="differ"):
        logit_kd(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="temperature"):
        logit_kd(t, t, temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        logit_kd(t, t, alpha=1.5)


def test_hidden_mse_formula_mask_and_projection():
    sh = [torch.randn(2, 5, 8) for _ in range(3)]
    th = [torch.randn(2, 5, 8) for _ in range(5)]
    lm = [(0, 0), (1, 2), (2, 4)]
    want = sum(((sh[i] - th[j]) ** 2).mean() for i, j in lm) / 3
    torch.testing.assert_close(hidden_mse(sh, th, lm), want)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    th2 = [h.clone() for h in th]
    for h in th2:
        h[1, 3:] += 50  # padding: ignored under the mask
    torch.testing.assert_close(hidden_mse(sh, th2, lm, mask), hidden_mse(sh, th, lm, mask))
    proj = HiddenProjection(6, 8, len(lm))
    s6 = [torch.randn(2, 5, 6) for _ in range(3)]
    loss = hidden_mse(s6, th, lm, projection=proj)
    loss.backward()
    assert all(p.grad is not None for p in proj.parameters())
    with pytest.raises(ValueError, match="HiddenProjection"):
        hidden_mse(s6, th, lm)
    with pytest.raises(ValueError, match="out of range"):
        hidden_mse(sh, th, [(3, 0)])
    assert len(list(HiddenProjection(8, 8, 3).parameters())) == 0


def test_hidden_mse_relative_weighs_layers_by_the_teachers_scale():
    sh = [torch.randn(2, 5, 8, requires_grad=True) for _ in range(3)]
    th = [torch.randn(2, 5, 8) * c for c in (1.0, 7.0, 0.2)]  # layers of very different scale
    lm = [(0, 0), (1, 1), (2, 2)]
    mask = torch.ones(2, 5)
    mask[0, 4:] = 0
    m = mask.unsqueeze(-1)
    want = sum((((sh[i] - th[j]) ** 2) * m).sum() / (th[j] ** 2 * m).sum() for i, j in lm) / 3
    got = hidden_mse(sh, th, lm, mask, relative=True)
    torch.testing.assert_close(got, want)
    # scale-free: multiplying one pair (student and teacher) by c leaves its term unchanged,
    # while its term of the plain MSE grows by c^2
    sc = [h.detach() * (10.0 if k == 2 else 1.0) for k, h in enumerate(sh)]
    tc = [h * (10.0 if k == 2 else 1.0) for k, h in enumerate(th)]
    torch.testing.assert_close(hidden_mse(sc, tc, lm, mask, relative=True), got.detach())
    plain = [hidden_mse([h.detach() for h in hs][2:], ts[2:], [(0, 0)], mask)
             for hs, ts in ((sh, th), (sc, tc))]
    torch.testing.assert_close(plain[1], 100 * plain[0])
    got.backward()  # the divisor is the teacher's: no gradient needed or taken there
    assert all(h.grad is not None and torch.isfinite(h.grad).all() for h in sh)
    zero = [torch.zeros(2, 5, 8)] * 3  # an all-zero teacher state: finite, no division by 0
    assert torch.isfinite(hidden_mse(sh, zero, lm, mask, relative=True))


def test_attention_kl():
    a = torch.softmax(torch.randn(2, 4, 6, 6), -1)
    b = torch.softmax(torch.randn(2, 4, 6, 6), -1)
    assert float(attention_kl([a], [a], [(0, 0)])) == pytest.approx(0.0, abs=1e-6)
    want = (b * (b.log() - a.log())).sum(-1).mean()
    torch.testing.assert_close(attention_kl([a], [b], [(0, 0)]), want)
    c = torch.softmax(torch.randn(2, 2, 6, 6), -1)  # fewer heads (head-pruned student)
    am, cm = a.mean(1, keepdim=True), c.mean(1, keepdim=True)
    torch.testing.assert_close(attention_kl([c], [a], [(0, 0)]),
                               (am * (am.log() - cm.log())).sum(-1).mean())
    with pytest.raises(ValueError, match="missing"):
        attention_kl([None], [a], [(0, 0)])


def test_embedding_loss():
    s, t = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    mask = torch.ones(3, 5)
    mask[0, 2:] = 0
    ps = (s * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    pt = (t * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(embedding_loss(s, t, mask),
                               (1 - F.cosine_similarity(ps, pt, dim=-1)).mean())
    assert float(embedding_loss(t, t, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(embedding_loss(s, t, mask, kind="mse")) > 0
    with pytest.raises(ValueError, match="kind"):
        embedding_loss(s, t, kind="l1")


def test_default_layer_map():
    assert default_layer_map(3, 6) == [(0, 0), (1, 2), (2, 4), (3, 6)]
    assert default_layer_map(6, 6) == [(i, i) for i in range(7)]
    with pytest.raises(ValueError):
        default_layer_map(0, 6)


# ---------------------------------------------------------------------------------------------
# sharing


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2, tiny_llama])
def test_share_layers(make, tmp_path):
    model = make()
    base = copy.deepcopy(model)
    n0 = sum(p.numel() for p in model.parameters())
    groups = share_layers(model, every=2)
    assert groups == [[0, 1]]
    from pysparse.prune import structured
    blocks = structured._blocks(model, structured._family(model))[2]
    assert blocks[0] is blocks[1]
    n1 = sum(p.numel() for p in model.parameters())
    assert n1 < n0
    # mean init: a shared parameter is the average of the two originals
    (name, p), = [(n, p) for n, p in model.named_parameters() if n.endswith("0.mlp.c_fc.weight")
                  or n.endswith("0.intermediate.dense.weight")
                  or n.endswith("0.mlp.gate_proj.weight")]
    other = dict(base.named_parameters())
    torch.testing.assert_close(p, (other[name] + other[name.replace(".0.", ".1.")]) / 2)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    kw = {"use_cache": False} if make is not tiny_bert else {}
    with torch.inference_mode():
        ref = model(input_ids=ids, **kw)[0]
    pysparse.save(model, tmp_path)
    loaded = pysparse.load(tmp_path)
    assert sum(p.numel() for p in loaded.parameters()) == n1
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids, **kw)[0], ref)


def test_share_layers_errors():
    model = tiny_bert()
    with pytest.raises(ValueError, match="exactly one"):
        share_layers(model)
    with pytest.raises(ValueError, match="every"):
        share_layers(model, every=5)
    with pytest.raises(ValueError, match="disjoint"):
        share_layers(model, groups=[[0, 1], [1]])
    share_layers(model, groups=[[0, 1]])
    with pytest.raises(ValueError, match="already shared"):
        share_layers(model, groups=[[0, 1]])


# ---------------------------------------------------------------------------------------------
# distill() on tiny models


class _Ids(torch.utils.data.Dataset):
    def __init__(self, n, vocab, seq=12, labels=None):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (n, seq), generator=g)
        self.labels = labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        item = {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def _pair():
    teacher = tiny_bert()
    student = copy.deepcopy(teacher)
    pysparse.prune(student, pattern="2:4", progress=False)
    return student, teacher


def test_distill_reduces_loss_keeps_masks_and_teacher(tmp_path):
    student, teacher = _pair()
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = {n: m.weight.detach().clone() for n, m in student.named_modules()
              if isinstance(m, torch.nn.Linear)}
    res = distill(student, teacher, _Ids(64, 128), output_dir=tmp_path, max_steps=24,
                  batch_size=8, learning_rate=3e-3, logging_steps=4, progress=False,
                  losses={"hidden": 1.0, "embedding": 1.0, "attention": 0.5})
    assert res.steps == 24 and set(res.losses) == {"hidden", "embedding", "attention"}
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    for n, m in student.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert is_24(m.weight.detach()), n                  # masks enforced
            assert not torch.equal(m.weight.detach(), before[n]) or "pooler" in n
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_state.items())
    assert all(p.requires_grad for p in teacher.parameters())  # frozen only while training
    assert not student.training and student.config._attn_implementation != "eager"
    assert not hasattr(student, "pysparse_distill_projection")


def test_distill_resume(tmp_path):
    student, teacher = _pair()
    distill(student, teacher, _Ids(32, 128), output_dir=tmp_path, max_steps=4, batch_size=8,
            save_steps=2, progress=False)
    assert (tmp_path / "checkpoint-4").is_dir()
    student2, _ = _pair()
    res = distill(student2, teacher, _Ids(32, 128), output_dir=tmp_path, max_steps=6,
                  batch_size=8, save_steps=2, resume=True, progress=False)
    assert res.steps == 6 and len([h for h in res.history]) <= 6


def test_distill_classifier_with_labels_and_texts(tmp_path):
    import transformers
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=128, num_labels=3,
                                  max_position_embeddings=32)
    teacher = transformers.BertForSequenceClassification(cfg).eval()
    student = copy.deepcopy(teacher)
    labels = [i % 3 for i in range(48)]
    res = distill(student, teacher, _Ids(48, 128, labels=labels), output_dir=tmp_path,
                  max_steps=6, batch_size=8, progress=False)
    assert set(res.losses) == {"logits"} and res.steps == 6


def test_distill_smaller_student_and_width_projection(tmp_path):
    """3 of 6 blocks kept (layer pruning) -> uniform map; a narrower student gets a projection."""
    import transformers
    teacher = transformers.BertModel(transformers.BertConfig(
        num_hidden_layers=4, hidden_size=64, num_attention_heads=4, intermediate_size=128,
        vocab_size=128, max_position_embeddings=32)).eval()
    student = transformers.BertModel(transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
        vocab_size=128, max_position_embeddings=32))
    res = distill(student, teacher, _Ids(32, 128), output_dir=tmp_path, max_steps=3,
                  batch_size=8, losses={"hidden": 1.0}, progress=False)
    assert res.steps == 3 and not hasattr(student, "pysparse_distill_projection")


def test_distill_errors(tmp_path):
    student, teacher = _pair()
    with pytest.raises(ValueError, match="same object"):
        distill(teacher, teacher, ["a"], object(), output_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown loss"):
        distill(student, teacher, _Ids(8, 128), output_dir=tmp_path, losses={"l2": 1.0})
    with pytest.raises(ValueError, match="finite"):
        distill(student, teacher, _Ids(8, 128), output_dir=tmp_path,
                losses={"hidden": math.nan})
    with pytest.raises(ValueError, match="empty"):
        distill(student, teacher, [], output_dir=tmp_path)
    with pytest.raises(ValueError, match="tokenizer"):
        distill(student, teacher, ["text"], output_dir=tmp_path)
    with pytest.raises(TypeError, match="transformers model"):
        distill(torch.nn.Linear(2, 2), teacher, _Ids(8, 128), output_dir=tmp_path)
    with pytest.raises(ValueError, match="requires grad"):
        distill(copy.deepcopy(student).requires_grad_(False), teacher, _Ids(8, 128),
                output_dir=tmp_path)


def test_distill_student_attention_eager_trains_the_same_and_is_restored(tmp_path):
    """"auto" trains the student with eager attention on the CPU (faster backward there) and
    restores its implementation; the math is the same as with sdpa."""
    from transformers import TrainerCallback

    seen = []

    class Spy(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            seen.append(model.config._attn_implementation)

    student, teacher = _pair()
    student.set_attn_implementation("sdpa")
    twin = copy.deepcopy(student)
    kw = dict(max_steps=3, batch_size=8, learning_rate=1e-3, progress=False, seed=3)
    distill(student, teacher, _Ids(24, 128), output_dir=tmp_path / "a", callbacks=[Spy()],
            **kw)
    assert seen == ["eager"] * 3 and student.config._attn_implementation == "sdpa"
    seen.clear()
    distill(twin, teacher, _Ids(24, 128), output_dir=tmp_path / "b", student_attention=None,
            callbacks=[Spy()], **kw)
    assert seen == ["sdpa"] * 3
    for (n, a), (_, b) in zip(student.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
    with pytest.raises(ValueError, match="student_attention"):
        distill(student, teacher, _Ids(8, 128), output_dir=tmp_path / "c",
                student_attention="flash")


@pytest.mark.parametrize("relative", [False, True])
def test_distill_hidden_relative_reaches_the_loss(tmp_path, monkeypatch, relative):
    from pysparse.distill import losses as L
    seen, orig = [], L.hidden_mse

    def spy(*a, **k):
        seen.append(k.get("relative"))
        return orig(*a, **k)

    monkeypatch.setattr(L, "hidden_mse", spy)
    student, teacher = _pair()
    res = distill(student, teacher, _Ids(16, 128), output_dir=tmp_path, max_steps=2,
                  batch_size=8, progress=False, losses={"hidden": 1.0},
                  hidden_relative=relative)
    assert res.steps == 2 and seen == [relative] * 2
    assert math.isfinite(res.losses["hidden"]) and res.losses["hidden"] > 0


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("bf16", [True, False])
def test_distill_bf16_autocast_covers_the_teacher_too(tmp_path, bf16, cache):
    """bf16=True: student and teacher both run under bf16 autocast (the Trainer's own autocast
    wraps only the student's forward, so the hooks sit on a submodule); bf16=False: neither."""
    student, teacher = _pair()
    seen = {"teacher": [], "student": []}
    hooks = [m.register_forward_hook(lambda *_, who=who: seen[who].append(
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16))
        for who, m in (("teacher", teacher.encoder), ("student", student.encoder))]
    texts = [f"text number {i} " * (1 + i % 3) for i in range(16)]
    res = distill(student, teacher, texts, _CharTok(), output_dir=tmp_path, max_steps=2,
                  batch_size=8, bf16=bf16, progress=False, cache_teacher=cache, max_length=32)
    for h in hooks:
        h.remove()
    assert res.steps == 2
    assert len(seen["teacher"]) == 2 and len(seen["student"]) == 2
    assert seen["teacher"] == [bf16] * 2 and seen["student"] == [bf16] * 2
    assert next(student.parameters()).dtype == torch.float32  # autocast, master weights fp32
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.slow
def test_distill_torchrun_two_processes(tmp_path):
    """The distributed path: torchrun, 2 CPU processes, gloo; both ranks end with the same
    student weights (DDP averaged the gradients) and the 2:4 masks."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import copy, os, torch, pysparse
        from pysparse.distill import distill
        from pysparse.formats.sparse24 import is_24
        from pysparse.testing.models import tiny_bert
        sys_path = {str(os.path.dirname(__file__))!r}
        import sys; sys.path.insert(0, sys_path)
        from test_distill import _Ids
        torch.manual_seed(0)
        teacher = tiny_bert()
        student = copy.deepcopy(teacher)
        pysparse.prune(student, pattern="2:4", progress=False)
        res = distill(student, teacher, _Ids(32, 128), output_dir={str(tmp_path / 'out')!r},
                      max_steps=4, batch_size=4, progress=False)
        rank = int(os.environ["RANK"])
        assert torch.distributed.get_world_size() == 2
        assert all(is_24(m.weight.detach()) for n, m in student.named_modules()
                   if isinstance(m, torch.nn.Linear))
        torch.save({{k: v for k, v in student.state_dict().items()}},
                   {str(tmp_path)!r} + f"/rank{{rank}}.pt")
        print("rank", rank, "steps", res.steps)
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29533", str(script)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "steps 4" in proc.stdout


def test_distill_shared_layers_checkpoints_and_resume(tmp_path):
    """save_pretrained refuses shared blocks; the checkpoints of a shared model still round-trip."""
    teacher = tiny_bert()
    student = copy.deepcopy(teacher)
    share_layers(student, every=2)
    distill(student, teacher, _Ids(16, 128), output_dir=tmp_path, max_steps=2, batch_size=8,
            save_steps=2, progress=False)
    assert (tmp_path / "checkpoint-2" / "model.safetensors").exists()
    res = distill(student, teacher, _Ids(16, 128), output_dir=tmp_path, max_steps=3,
                  batch_size=8, save_steps=2, resume=True, progress=False)
    assert res.steps == 3
    blocks = student.encoder.layer
    assert blocks[0] is blocks[1]


# ---------------------------------------------------------------------------------------------
# relational loss, pre-tokenized texts, the teacher-output cache, dropout off


def test_similarity_loss_formula_and_padding():
    s, t = torch.randn(5, 7, 16), torch.randn(5, 7, 16)
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[1, 4:] = 0
    es = F.normalize(pysparse.distill.losses.mean_pool(s, mask), dim=-1)
    et = F.normalize(pysparse.distill.losses.mean_pool(t, mask), dim=-1)
    d = es @ es.T - et @ et.T
    want = (d.pow(2).sum() - d.diagonal().pow(2).sum()) / (5 * 4)
    torch.testing.assert_close(similarity_loss(s, t, mask), want)
    s2 = s.clone()
    s2[1, 4:] = 1e3  # padding never counts
    torch.testing.assert_close(similarity_loss(s2, t, mask), want)
    assert float(similarity_loss(t, t, mask)) == pytest.approx(0.0, abs=1e-6)
    # invariant to a per-row scale of the embeddings (cosine), not to rotations of one row
    torch.testing.assert_close(similarity_loss(s * torch.rand(5, 1, 1) + 0, t, None),
                               similarity_loss(s, t, None))
    assert float(similarity_loss(s[:1], t[:1])) == 0.0
    with pytest.raises(ValueError, match="widths"):
        similarity_loss(s, t[..., :8])


@pytest.mark.parametrize("T", [0.05, 1.0])
def test_neighbour_kl_formula_padding_and_self_bank(T):
    s, t = torch.randn(5, 7, 16), torch.randn(5, 7, 16)
    bank = F.normalize(torch.randn(11, 16), dim=-1)
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[2, 3:] = 0
    es = F.normalize(pysparse.distill.losses.mean_pool(s, mask), dim=-1)
    et = F.normalize(pysparse.distill.losses.mean_pool(t, mask), dim=-1)
    ps, pt = (es @ bank.T / T).softmax(-1), (et @ bank.T / T).softmax(-1)
    want = (pt * (pt.log() - ps.log())).sum(-1).mean()
    torch.testing.assert_close(neighbour_kl(s, t, bank, mask, temperature=T), want)
    s2 = s.clone()
    s2[2, 3:] = 1e3  # padding never counts
    torch.testing.assert_close(neighbour_kl(s2, t, bank, mask, temperature=T), want)
    assert float(neighbour_kl(t, t, bank, mask, temperature=T)) == pytest.approx(0, abs=1e-6)
    # self_bank: the batch's own teacher embeddings are the anchors, each row's own left out
    own = neighbour_kl(s, t, et, mask, temperature=T, self_bank=True)
    for i in range(5):
        keep = [j for j in range(5) if j != i]
        qs = (es[i] @ et[keep].T / T).softmax(-1)
        qt = (et[i] @ et[keep].T / T).softmax(-1)
        own = own - (qt * (qt.log() - qs.log())).sum() / 5
    assert float(own) == pytest.approx(0, abs=1e-5)
    g = s.clone().requires_grad_(True)
    neighbour_kl(g, t, bank, mask, temperature=T).backward()
    assert g.grad.abs().sum() > 0 and g.grad[2, 3:].abs().sum() == 0
    with pytest.raises(ValueError, match="widths"):
        neighbour_kl(s, t, bank[:, :8])
    with pytest.raises(ValueError, match="temperature"):
        neighbour_kl(s, t, bank, temperature=0)
    with pytest.raises(ValueError, match="one anchor per row"):
        neighbour_kl(s, t, bank, self_bank=True)


def test_anchor_bank_is_a_fifo_of_earlier_batches():
    from pysparse.distill.losses import AnchorBank
    bank = AnchorBank(5)
    a, b, c = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    got, own = bank.anchors(a)
    assert own and got is a  # empty: the batch itself (its own rows left out by the loss)
    bank.push(a)
    got, own = bank.anchors(b)
    assert not own and torch.equal(got, a)
    bank.push(b)
    bank.push(c)  # newest first, capped at 5
    assert torch.equal(bank.anchors(a)[0], torch.cat([c, b[:2]]))
    with pytest.raises(ValueError, match="bank size"):
        AnchorBank(-1)


def test_distill_with_the_neighbours_loss(tmp_path):
    student, teacher = _pair()
    res = distill(student, teacher, _Ids(48, 128), output_dir=tmp_path, max_steps=6,
                  batch_size=8, learning_rate=3e-3, progress=False, logging_steps=1,
                  losses={"embedding": 1.0, "neighbours": 1.0}, bank_size=16)
    assert res.steps == 6 and set(res.losses) == {"embedding", "neighbours"}
    assert res.losses["neighbours"] > 0 and math.isfinite(res.history[-1]["loss"])
    with pytest.raises(ValueError, match="temperature"):
        distill(*_pair(), _Ids(8, 128), output_dir=tmp_path, max_steps=1,
                losses={"neighbours": 1.0}, bank_temperature=-1)


class _CharTok:
    """A tokenizer stand-in: one id per character (1 + ord % 100), pad id 0."""

    pad_token_id, pad_token_type_id = 0, 0

    def __init__(self, side="right"):
        self.padding_side = side

    def __call__(self, texts, truncation=True, max_length=None, **kw):
        ids = [[1 + ord(c) % 100 for c in t][:max_length] for t in texts]
        return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}


@pytest.mark.parametrize("side", ["right", "left"])
def test_text_data_and_collate_pad_on_the_right(side):
    from pysparse.distill.trainer import _Collate, _TextData
    data = _TextData(["abc", "a", "abcdefgh"], [0, 1, 2], _CharTok(side), max_length=6)
    assert len(data) == 3 and len(data[2]["input_ids"]) == 6  # truncated once, up front
    b = _Collate(_CharTok(side))([data[0], data[1], data[2]])
    assert b["input_ids"].shape == (3, 6) and b["pysparse_idx"].tolist() == [0, 1, 2]
    assert b["labels"].tolist() == [0, 1, 2]
    assert b["attention_mask"].sum(1).tolist() == [3, 1, 6]
    row = b["input_ids"][1].tolist()
    assert row[1:] == [0] * 5 and row[0] == 1 + ord("a") % 100
    assert torch.equal(b["input_ids"] != 0, b["attention_mask"].bool())


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_teacher_cache_returns_the_teachers_outputs_for_any_batching(dtype):
    from pysparse.distill.trainer import _TeacherCache
    import transformers
    teacher = transformers.BertForSequenceClassification(transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
        vocab_size=128, max_position_embeddings=32, num_labels=3)).eval()
    g = torch.Generator().manual_seed(1)
    lens = [5, 9, 3, 12, 7]
    ids = [torch.randint(1, 128, (n,), generator=g) for n in lens]

    def batch(order, T):
        x = torch.zeros(len(order), T, dtype=torch.long)
        m = torch.zeros_like(x)
        for r, i in enumerate(order):
            x[r, :lens[i]], m[r, :lens[i]] = ids[i], 1
        return {"input_ids": x, "attention_mask": m}

    def check(got, inputs, layers=(0, 2)):
        with torch.no_grad():
            want = teacher(**inputs, output_hidden_states=True)
        keep = inputs["attention_mask"].bool()
        for j in layers:
            g, w = got.hidden_states[j][keep], want.hidden_states[j][keep]
            if dtype == "fp16":
                torch.testing.assert_close(g, w, atol=2e-3, rtol=2e-3)
            else:  # per-token int8: each entry within half a step (absmax / 127) of the truth
                step = w.abs().amax(-1, keepdim=True) / 127
                assert ((g - w).abs() <= step * 0.5 + 1e-6).all()
                assert (g - w).abs().max() > 0  # really rounded
            assert got.hidden_states[j][~keep].abs().max() == 0
        assert got.hidden_states[1] is None
        torch.testing.assert_close(got.logits, want.logits, atol=2e-3, rtol=2e-3)

    cache = _TeacherCache({0, 2}, 2, True, budget=2 ** 30, dtype=dtype)
    x = batch([0, 1, 2, 3], 12)
    check(cache.run(teacher, x, torch.tensor([0, 1, 2, 3]), output_hidden_states=True), x)
    assert (cache.rows_run, cache.rows_cached, len(cache.store)) == (4, 0, 4)
    # hidden states: 2 layers x (5 + 9 + 3 + 12) tokens x 32, at 2 bytes or 1 byte + a 4-byte
    # scale per token and layer; logits: 4 x 3 fp16
    tokens = 5 + 9 + 3 + 12
    want_bytes = (2 * tokens * 32 * 2 if dtype == "fp16" else 2 * tokens * (32 + 4)) + 4 * 3 * 2
    assert cache.bytes == want_bytes
    x = batch([3, 4, 1, 0], 14)  # other order, longer padding, one new example
    check(cache.run(teacher, x, torch.tensor([3, 4, 1, 0]), output_hidden_states=True), x)
    assert (cache.rows_run, cache.rows_cached) == (5, 3)  # the teacher ran on row 4 only
    small = _TeacherCache({2}, 2, True, budget=1, dtype=dtype)  # room for the first example
    for _ in range(2):
        x = batch([2, 0, 4], 8)
        check(small.run(teacher, x, torch.tensor([2, 0, 4]), output_hidden_states=True), x,
              layers=(2,))
    assert list(small.store) == [2] and (small.rows_run, small.rows_cached) == (5, 1)


def test_distill_rejects_an_unknown_cache_dtype(tmp_path):
    student, teacher = _pair()
    with pytest.raises(ValueError, match="cache_dtype must be one of"):
        distill(student, teacher, ["a b"] * 4, _CharTok(), output_dir=tmp_path, max_steps=1,
                cache_dtype="fp8", progress=False)


def test_distill_texts_cache_the_teacher_after_the_first_epoch(tmp_path):
    import transformers
    teacher = transformers.BertModel(transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
        vocab_size=128, max_position_embeddings=64)).eval()
    texts = [("pysparse " * (1 + i % 5))[: 4 + 3 * i] for i in range(16)]
    students = {True: copy.deepcopy(teacher)}
    pysparse.prune(students[True], pattern="2:4", progress=False)  # a real gap to close
    students[False] = copy.deepcopy(students[True])
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    seen = []

    class Spy(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            seen.append([m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)])

    runs = {}
    for cache in (True, False):
        student = students[cache]
        calls.clear()
        res = distill(student, teacher, texts, _CharTok(), output_dir=tmp_path / str(cache),
                      max_steps=12, batch_size=4, learning_rate=1e-3, progress=False,
                      cache_teacher=cache, dropout=False, callbacks=[Spy()], logging_steps=1)
        runs[cache] = (len(calls), res, student)
    n, res, student = runs[True]
    assert n == 4 and res.teacher_cache["texts"] == 16
    assert (res.teacher_cache["rows_run"], res.teacher_cache["rows_cached"]) == (16, 32)
    assert runs[False][0] == 12 and runs[False][1].teacher_cache is None
    # same batches, same targets up to fp16 rounding -> the same training
    for a, b in zip(res.history, runs[False][1].history):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)
    assert all(p == 0.0 for ps in seen for p in ps) and seen
    assert all(m.p == 0.1 for m in student.modules() if isinstance(m, torch.nn.Dropout))


def test_distill_qat_start_switches_in_place_mid_run(tmp_path):
    """qat="w8a8", qat_start=0.5: the first half trains the float student, the second half the
    fake-quant one; the switch keeps the very parameter tensors (the optimizer goes on training
    them) and the 2:4 masks."""
    from transformers import TrainerCallback

    from pysparse.quant.qat import QATLinear
    student, teacher = _pair()
    params = {n: p for n, p in student.named_parameters()}
    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen.append(sum(isinstance(m, QATLinear) for m in student.modules()))

    res = distill(student, teacher, _Ids(32, 128), output_dir=tmp_path, max_steps=6,
                  batch_size=8, learning_rate=3e-3, progress=False, logging_steps=1,
                  qat="w8a8", qat_start=0.5, callbacks=[Watch()])
    n_lin = sum(isinstance(m, torch.nn.Linear) for m in teacher.modules())
    assert res.qat_step == 3 and seen == [0, 0, 0] + [n_lin] * 3
    assert {n: p for n, p in student.named_parameters()}.keys() == params.keys()
    for n, p in student.named_parameters():
        assert p is params[n], n
    for n, m in student.named_modules():
        if isinstance(m, QATLinear):
            assert is_24(m.weight.detach()), n
    with pytest.raises(ValueError, match="qat must be"):
        distill(*_pair(), _Ids(8, 128), output_dir=tmp_path, max_steps=1, qat="w4a4")
    with pytest.raises(ValueError, match="qat_start"):
        distill(*_pair(), _Ids(8, 128), output_dir=tmp_path, max_steps=1, qat="w8a8",
                qat_start=1.0)


def test_distill_with_qat_fake_quant_then_real_2_4_int8(tmp_path):
    """2:4 + QAT fake-quant under distillation: masks kept through the QATLinear modules, and
    the trained model converts to the real 2:4+w8a8 kernels with the outputs it trained with."""
    from pysparse.quant.qat import QATLinear
    student, teacher = _pair()
    pysparse.prepare_qat(student)
    n_qat = sum(isinstance(m, QATLinear) for m in student.modules())
    assert n_qat > 0
    res = distill(student, teacher, _Ids(32, 128), output_dir=tmp_path, max_steps=6,
                  batch_size=8, learning_rate=3e-3, progress=False, logging_steps=1)
    assert res.steps == 6 and math.isfinite(res.history[-1]["loss"])
    assert sum(isinstance(m, QATLinear) for m in student.modules()) == n_qat
    for n, m in student.named_modules():
        if isinstance(m, QATLinear):
            assert is_24(m.weight.detach()), n
    x = _Ids(4, 128)[0]["input_ids"][None]
    with torch.no_grad():
        fake = student(input_ids=x).last_hidden_state
        pysparse.replace_linear(student, "2:4+w8a8")
        real = student(input_ids=x).last_hidden_state
    assert not any(isinstance(m, QATLinear) for m in student.modules())
    torch.testing.assert_close(real, fake, atol=2e-3, rtol=2e-3)
