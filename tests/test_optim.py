"""Fused masked SGD / AdamW against torch.optim + re-masking, on the torch reference path (CPU) and
on the Triton kernel (CUDA tensors on a GPU; on CPU the interpreter, with a handful of tiny tensors)."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmask import masks
from fastmask.kernels import masked_optim
from fastmask.optim import MaskedAdamW, MaskedSGD
from helpers import rel_error

STEPS = 50
SPARSITIES = [0.0, 0.5, 0.95]
SGD_CONFIGS = {
    "plain": dict(lr=0.05),
    "momentum": dict(lr=0.05, momentum=0.9),
    "nesterov+wd": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "dampening+wd": dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-2),
}
ADAMW_CONFIGS = {
    "no-wd": dict(lr=3e-3, weight_decay=0.0),
    "wd": dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=5e-2),
}
INTERPRETED = not torch.cuda.is_available()
SGD_CASES = [(path, c, s) for path in ("torch", "triton") for c in SGD_CONFIGS for s in SPARSITIES]
ADAMW_CASES = [(path, c, s) for path in ("torch", "triton") for c in ADAMW_CONFIGS for s in SPARSITIES]


class SmallConvNet(nn.Module):
    """Tiny, so the interpreter is quick; conv2's 216 weights span a full and a partial kernel block."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, bias=False)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, bias=False)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def make_net(device, seed=0):
    torch.manual_seed(seed)
    return SmallConvNet().to(device)


def random_masks(model, sparsity, seed=1):
    """A mask for every weight (the fc bias stays dense); sparsity 0 still gives a (full) mask."""
    g = torch.Generator().manual_seed(seed)
    return {p: (torch.rand(p.shape, generator=g) >= sparsity).to(p.device) for name, p in model.named_parameters()
            if name.endswith("weight")}


def batches(steps, device, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 9, 9, generator=g).to(device), torch.randint(0, 5, (8,), generator=g).to(device))
            for _ in range(steps)]


def train_step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def remask(masks, opt=None):
    """Zero the pruned entries of the parameters (and of the torch optimizer's state)."""
    with torch.no_grad():
        for p, keep in masks.items():
            p.masked_fill_(~keep, 0)
            for value in (opt.state.get(p, {}) if opt is not None else {}).values():
                if value.shape == p.shape:
                    value.masked_fill_(~keep, 0)


def assert_pruned_zero(masks, opt=None):
    """Pruned weights (and, given the optimizer, their momentum / moments) are exactly 0.0."""
    for p, keep in masks.items():
        assert not p.detach()[~keep].any(), "a pruned weight is not 0.0"
        for name, value in (opt.state.get(p, {}) if opt is not None else {}).items():
            if value.shape == p.shape:
                assert not value[~keep].any(), f"optimizer state {name!r} of a pruned entry is not 0.0"


def assert_trajectories_match(ours, theirs, bound=1e-6):
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        err = rel_error(a, b)
        assert err < bound, f"{name}: relative error {err:.3g} against torch + re-masking"


def compare_with_torch(make_ours, make_torch, sparsity, device, steps=STEPS):
    """Train the net with our optimizer and with torch's + re-masking on the same batches; the
    pruned weights must be exactly 0.0 after every step, the trajectories equal to 1e-6."""
    ours, theirs = make_net(device), make_net(device)
    our_masks = random_masks(ours, sparsity)
    their_masks = random_masks(theirs, sparsity)
    opt = make_ours(ours.parameters(), our_masks)
    ref = make_torch(theirs.parameters())
    remask(their_masks)
    for x, y in batches(steps, device):
        train_step(ours, opt, x, y)
        assert_pruned_zero(our_masks, opt)
        train_step(theirs, ref, x, y)
        remask(their_masks)
    assert_trajectories_match(ours, theirs)
    return opt


def use_path(path, request, monkeypatch) -> torch.device:
    """Select the reference path (CPU tensors) or the kernel (CUDA tensors on a GPU, else the
    interpreter); return the device to put the tensors on."""
    if path == "torch":
        monkeypatch.setenv("FASTMASK_BACKEND", "torch")
        return torch.device("cpu")
    request.getfixturevalue("triton_backend")
    if INTERPRETED:
        return torch.device("cpu")
    # Both sides of a comparison run cuDNN / cuBLAS: keep TF32 rounding and nondeterministic
    # reductions out of the gradients, so only the optimizers differ.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    request.getfixturevalue("matmul_tf32")(False)
    return torch.device("cuda")


@pytest.fixture(params=["torch", "triton"])
def device(request, monkeypatch):
    """Runs the test on the reference path and on the kernel; the device of its tensors."""
    return use_path(request.param, request, monkeypatch)


@pytest.mark.parametrize("path, config, sparsity", SGD_CASES)
def test_sgd_equals_torch_sgd_then_remasking(path, config, sparsity, request, monkeypatch):
    device = use_path(path, request, monkeypatch)
    kwargs = SGD_CONFIGS[config]
    compare_with_torch(lambda params, masks: MaskedSGD(params, masks=masks, **kwargs),
                       lambda params: torch.optim.SGD(params, foreach=False, **kwargs), sparsity, device)


@pytest.mark.parametrize("path, config, sparsity", ADAMW_CASES)
def test_adamw_equals_torch_adamw_then_remasking(path, config, sparsity, request, monkeypatch):
    device = use_path(path, request, monkeypatch)
    kwargs = ADAMW_CONFIGS[config]
    opt = compare_with_torch(lambda params, masks: MaskedAdamW(params, masks=masks, **kwargs),
                             lambda params: torch.optim.AdamW(params, foreach=False, **kwargs), sparsity, device)
    assert all(float(state["step"]) == STEPS for state in opt.state.values())


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_state_dict_round_trip_continues_the_same_trajectory(device, kind):
    def make(model):
        masks = random_masks(model, 0.5)
        if kind == "sgd":
            return MaskedSGD(model.parameters(), lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3, masks=masks)
        return MaskedAdamW(model.parameters(), lr=3e-3, masks=masks)

    data = batches(16, device)
    model = make_net(device)
    opt = make(model)
    for x, y in data[:8]:
        train_step(model, opt, x, y)
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, saved)
    for x, y in data[8:]:
        train_step(model, opt, x, y)

    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    resumed = make_net(device, seed=5)
    resumed.load_state_dict(checkpoint["model"])
    opt2 = make(resumed)
    opt2.load_state_dict(checkpoint["opt"])
    names = {"sgd": {"momentum_buffer"}, "adamw": {"step", "exp_avg", "exp_avg_sq"}}[kind]
    assert all(set(s) == names for s in opt2.state_dict()["state"].values())  # torch's state names
    for x, y in data[8:]:
        train_step(resumed, opt2, x, y)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_set_masks_prunes_further_and_zeroes_the_new_state(device, kind):
    if kind == "sgd":
        ours_cls, theirs_cls, kwargs = MaskedSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    else:
        ours_cls, theirs_cls, kwargs = MaskedAdamW, torch.optim.AdamW, dict(lr=3e-3)
    ours, theirs = make_net(device), make_net(device)
    opt = ours_cls(ours.parameters(), masks=random_masks(ours, 0.3), **kwargs)
    ref = theirs_cls(theirs.parameters(), foreach=False, **kwargs)
    their_masks = random_masks(theirs, 0.3)
    remask(their_masks)
    data = batches(10, device)
    for x, y in data[:5]:
        train_step(ours, opt, x, y)
        train_step(theirs, ref, x, y)
        remask(their_masks)

    # IMP: prune further (the new masks are subsets of the old ones).
    new_masks = {p: keep & (p.detach().abs() > p.detach().abs().median()) for p, keep in random_masks(ours, 0.3).items()}
    opt.set_masks(new_masks)
    for p, keep in new_masks.items():
        assert not p[~keep].any()
        for value in opt.state[p].values():
            if value.shape == p.shape:
                assert not value[~keep].any(), "state of a newly pruned entry is not zero"
    their_masks = {q: new_masks[p].clone() for p, q in zip(ours.parameters(), theirs.parameters()) if p in new_masks}
    remask(their_masks, ref)
    for x, y in data[5:]:
        train_step(ours, opt, x, y)
        assert_pruned_zero(new_masks)
        train_step(theirs, ref, x, y)
        remask(their_masks)
    assert_trajectories_match(ours, theirs)


def test_lr_scheduler_drives_the_step(device):
    ours, theirs = make_net(device), make_net(device)
    masks = random_masks(ours, 0.5)
    opt = MaskedSGD(ours.parameters(), lr=0.1, momentum=0.9, masks=masks)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda epoch: 0.5**epoch)
    their_masks = random_masks(theirs, 0.5)
    remask(their_masks)
    for x, y in batches(6, device):
        train_step(ours, opt, x, y)
        sched.step()
        train_step(theirs, ref, x, y)
        ref_sched.step()
        remask(their_masks)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**6)
    assert_trajectories_match(ours, theirs)


def test_param_groups_and_parameters_without_gradients(device):
    """Two groups with their own hyperparameters; one parameter skips steps, so AdamW's step
    counts differ between parameters (torch counts a step only where there is a gradient)."""
    def groups(model):
        return [{"params": [model.conv1.weight, model.conv2.weight]},
                {"params": [model.fc.weight, model.fc.bias], "lr": 1e-2, "weight_decay": 0.0}]

    ours, theirs = make_net(device), make_net(device)
    masks = random_masks(ours, 0.5)
    opt = MaskedAdamW(groups(ours), lr=3e-3, masks=masks)
    ref = torch.optim.AdamW(groups(theirs), lr=3e-3, foreach=False)
    their_masks = random_masks(theirs, 0.5)
    remask(their_masks)
    for i, (x, y) in enumerate(batches(8, device)):
        for model, optimizer in ((ours, opt), (theirs, ref)):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if i % 3 == 1:
                model.conv1.weight.grad = None
            optimizer.step()
        remask(their_masks)
        assert_pruned_zero(masks)
    assert float(opt.state[ours.conv1.weight]["step"]) == 5
    assert float(opt.state[ours.fc.weight]["step"]) == 8
    assert_trajectories_match(ours, theirs)


def test_odd_tensors_layouts_and_new_gradient_tensors(device):
    """Sizes around the kernel's block, a 1-element tensor, a channels_last weight, an unaligned
    view (storage offset 1), a non-dense view and a float64 tensor (these two take the torch
    path), and gradient tensors replaced between steps (one with another memory layout)."""
    block = masked_optim.block_size()

    def parameters():
        g = torch.Generator().manual_seed(3)
        unaligned = torch.empty(2 * block - 2, device=device)[1:]  # one element into its storage
        return [
            nn.Parameter(torch.randn(block, generator=g).to(device)),
            nn.Parameter(torch.randn(block + 1, generator=g).to(device)),
            nn.Parameter(torch.randn(1, generator=g).to(device)),
            nn.Parameter(torch.randn(5, 3, 3, 3, generator=g).to(device).to(memory_format=torch.channels_last)),
            nn.Parameter(torch.randn(9, 14, generator=g).to(device)[:, ::2]),
            nn.Parameter(torch.randn(7, 3, generator=g, dtype=torch.float64).to(device)),
            nn.Parameter(unaligned.copy_(torch.randn(unaligned.shape, generator=g))),
        ]

    ours, theirs = parameters(), parameters()
    assert ours[3].is_contiguous(memory_format=torch.channels_last) and not ours[3].is_contiguous()
    assert ours[6].data_ptr() % 16 != 0
    g = torch.Generator().manual_seed(4)
    masked = (0, 1, 3, 4, 5, 6)
    masks = {ours[i]: (torch.rand(ours[i].shape, generator=g) > 0.4).to(device) for i in masked}
    their_masks = {theirs[i]: masks[ours[i]].clone() for i in masked}
    opt = MaskedSGD(ours, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, masks=masks)
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, foreach=False)
    remask(their_masks)
    old_grads = []  # kept alive, so every step's gradients are new tensors at new addresses
    for step in range(4):
        for p, q in zip(ours, theirs):
            grad = torch.randn(p.shape, generator=g, dtype=p.dtype).to(device)
            if step != 2:  # at step 2 the channels_last weight gets a gradient of another layout
                grad = torch.empty_like(p).copy_(grad)
            old_grads.append(p.grad)
            p.grad = grad.clone()
            q.grad = grad.clone()
        opt.step()
        ref.step()
        remask(their_masks)
        assert_pruned_zero(masks)
    for a, b in zip(ours, theirs):
        assert rel_error(a, b) < 1e-6


def test_one_launch_per_step_whatever_the_number_of_tensors(monkeypatch, request):
    device = use_path("triton", request, monkeypatch)
    launches = []

    class CountingKernel:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(masked_optim, "_masked_sgd_kernel", CountingKernel(masked_optim._masked_sgd_kernel))
    g = torch.Generator().manual_seed(4)
    params = [nn.Parameter(torch.randn(n, generator=g).to(device)) for n in (1, 7, 30, 64, 100, 129, 5, 12, 3, 40, 77, 2)]
    masks = {p: (torch.rand(p.shape, generator=g) > 0.5).to(device) for p in params[::2]}
    opt = MaskedSGD(params, lr=0.1, momentum=0.9, masks=masks)
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    ref = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9, foreach=False)
    ref_masks = {q: masks[p] for p, q in zip(params, ref_params) if p in masks}
    for step in range(3):
        for p, q in zip(params, ref_params):
            p.grad = torch.randn(p.shape, generator=g).to(device)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        remask(ref_masks)
        assert len(launches) == step + 1, f"{len(launches)} launches after {step + 1} steps of 12 tensors"
    for a, b in zip(params, ref_params):
        assert rel_error(a, b) < 1e-6


class TinyMasked(nn.Module):
    """Shaped like fastmask.nn's masked modules: a weight and a boolean `mask` buffer."""

    def __init__(self, shape, mask):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(shape))
        self.register_buffer("mask", mask)


def test_from_model_takes_the_masks_of_masked_modules(device):
    torch.manual_seed(0)
    model = nn.Sequential(TinyMasked((4, 5), torch.rand(4, 5) > 0.5),
                          TinyMasked((3, 2, 5), torch.rand(1, 2, 5) > 0.5),  # a stack sharing one mask
                          nn.Linear(5, 3)).to(device)
    found = masks.by_parameter(model)
    assert set(map(id, found)) == {id(model[0].weight), id(model[1].weight)}
    opt = MaskedSGD.from_model(model, lr=0.1, momentum=0.9)
    assert set(map(id, opt.masks)) == set(map(id, found))
    assert torch.equal(opt.masks[model[1].weight], model[1].mask.expand(3, 2, 5))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert not model[0].weight[~model[0].mask].any()
    assert not model[1].weight[~model[1].mask.expand(3, 2, 5)].any()
    assert model[2].weight.all()  # dense: no mask

    bad = nn.Sequential(TinyMasked((4, 5), torch.ones(5, 4, dtype=torch.bool)))
    with pytest.raises(ValueError, match="mask buffer"):
        MaskedAdamW.from_model(bad)


def test_masks_may_be_zero_one_floats_and_are_stored_as_booleans():
    p = nn.Parameter(torch.randn(3, 4))
    mask = (torch.rand(3, 4) > 0.5).float()
    opt = MaskedSGD([p], lr=0.1, masks={p: mask})
    assert opt.masks[p].dtype == torch.bool and torch.equal(opt.masks[p], mask.bool())
    assert not p[mask == 0].any()  # the constructor already zeroes the pruned weights


def test_bad_input_gives_a_clear_error():
    p, q = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(5))
    with pytest.raises(ValueError, match=r"masks: mask has shape \(4, 3\) but a parameter has shape \(3, 4\)"):
        MaskedSGD([p], lr=0.1, masks={p: torch.ones(4, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="boolean or hold only 0 and 1"):
        MaskedSGD([p], lr=0.1, masks={p: torch.full((3, 4), 0.5)})
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        MaskedAdamW([p], masks={q: torch.ones(5, dtype=torch.bool)})
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        MaskedSGD([p], lr=0.1, masks={p: [[True] * 4] * 3})
    with pytest.raises(TypeError, match="mapping"):
        MaskedSGD([p], lr=0.1, masks=[(p, torch.ones(3, 4, dtype=torch.bool))])
    with pytest.raises(ValueError, match="masks: mask is on meta"):
        MaskedSGD([p], lr=0.1, masks={p: torch.ones(3, 4, dtype=torch.bool, device="meta")})
    opt = MaskedSGD([p], lr=0.1)
    with pytest.raises(ValueError, match="masks: mask has shape"):
        opt.set_masks({p: torch.ones(12, dtype=torch.bool)})
    with pytest.raises(ValueError, match="nesterov"):
        MaskedSGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="lr"):
        MaskedAdamW([p], lr=-1.0)

    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse gradients"):
        MaskedSGD(emb.parameters(), lr=0.1).step()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_cuda_kernel_equals_the_reference(kind, monkeypatch):
    """On a GPU: the fused kernel against the torch reference, ResNet-sized tensors, aligned and not."""
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 3, 3, 3), (64,), (128, 64, 3, 3), (256, 128, 3, 3), (512, 256, 1, 1), (10, 512), (10,), (1000,)]
    base = [torch.randn(s, generator=g) for s in shapes]
    base.append(torch.randn(5001, generator=g)[1:])  # unaligned view
    grads = [[torch.randn(t.shape, generator=g) for t in base] for _ in range(4)]
    masks = [torch.rand(t.shape, generator=g) > 0.9 if t.numel() > 100 else None for t in base]
    results = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("FASTMASK_BACKEND", backend)
        params = []
        for t in base:
            if t.storage_offset():
                holder = torch.empty(t.numel() + 1, device="cuda")[1:]
                params.append(nn.Parameter(holder.copy_(t)))
            else:
                params.append(nn.Parameter(t.cuda()))
        m = {p: k.cuda() for p, k in zip(params, masks) if k is not None}
        opt = (MaskedSGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, masks=m) if kind == "sgd"
               else MaskedAdamW(params, lr=1e-3, masks=m))
        for step_grads in grads:
            for p, grad in zip(params, step_grads):
                p.grad = grad.cuda()
            opt.step()
        results[backend] = [p.detach().cpu() for p in params]
    for a, b in zip(results["triton"], results["torch"]):
        assert rel_error(a, b) < 1e-6
