"""stylenorm in the PyTorch ecosystem: torch.compile, TorchScript, torch.export, ONNX, autocast,
torch.func, factory kwargs and the meta device, copying and serialization.

Every check compares with something independent: the eager module, torch.nn's class, or the
float32 computation.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import io
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo.testing
from torch import Tensor, nn

import stylenorm
from stylenorm import stats

DROP_INS = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
]
SHAPES = {"1d": (4, 3, 7), "2d": (4, 3, 5, 6), "3d": (4, 3, 3, 4, 5)}


def _input(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = SHAPES[name[-2:]]
    return (0.5 + 2 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial parameters, so that weight and bias matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=generator, dtype=torch.float64).to(p.dtype) + 0.5)
    return module


def _close(actual: Any, expected: Any, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def _assert_same_state(actual: nn.Module, expected: nn.Module, tol: float = 1e-5) -> None:
    a, e = actual.state_dict(), expected.state_dict()
    assert list(a) == list(e)
    for key in e:
        torch.testing.assert_close(a[key], e[key], rtol=tol, atol=tol, msg=key)


# ------------------------------------------------------------------------------------------------
# Models using every layer and loss


class DropInModel(nn.Module):
    """Every drop-in, with running statistics tracked in every flavour (momentum, None)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = stylenorm.BatchNorm1d(3)
        self.in1 = stylenorm.InstanceNorm1d(3, affine=True)
        self.bn2 = stylenorm.BatchNorm2d(3, momentum=None)
        self.in2 = stylenorm.InstanceNorm2d(3, affine=True, track_running_stats=True)
        self.bn3 = stylenorm.BatchNorm3d(3, affine=False, momentum=0.3)
        self.in3 = stylenorm.InstanceNorm3d(3, track_running_stats=True, momentum=0.3)

    def forward(self, x1: Tensor, x2: Tensor, x3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.in1(self.bn1(x1)), self.in2(self.bn2(x2)), self.in3(self.bn3(x3))


def _drop_in_inputs(seed: int) -> tuple[Tensor, Tensor, Tensor]:
    return _input("x1d", seed), _input("x2d", seed + 1), _input("x3d", seed + 2)


class StyleModel(nn.Module):
    """Every style layer and every way to give a style."""

    def __init__(self) -> None:
        super().__init__()
        self.cin = stylenorm.ConditionalInstanceNorm2d(3, num_styles=4)
        self.adain = stylenorm.AdaIN()
        self.style_adain = stylenorm.StyleAdaIN(style_dim=5, num_features=3)
        self.chain = stylenorm.StyleSequential(
            nn.Conv2d(3, 3, 1), stylenorm.ConditionalInstanceNorm2d(3, num_styles=4), nn.ReLU()
        )

    def forward(
        self, x: Tensor, ids: Tensor, mix: Tensor, style: Tensor, mask: Tensor, code: Tensor
    ) -> tuple[Tensor, ...]:
        return (
            self.cin(x, 2),
            self.cin(x, ids),
            self.cin(x, mix),
            self.adain(x, style, alpha=0.7),
            self.adain(x, style, content_mask=mask),
            self.style_adain(x, code),
            self.chain(x, ids),
        )


def _style_inputs(seed: int = 0) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = 1 + 2 * torch.randn(4, 3, 6, 6, generator=g)
    ids = torch.tensor([0, 3, 1, 3])
    mix = torch.softmax(torch.randn(4, 4, generator=g), dim=1)
    style = 3 + torch.randn(1, 3, 7, 7, generator=g)
    mask = (torch.rand(4, 1, 6, 6, generator=g) > 0.4).float()
    mask[..., :2, :2] = 1.0  # every sample has selected positions
    code = torch.randn(4, 5, generator=g)
    return x, ids, mix, style, mask, code


def _style_model() -> StyleModel:
    torch.manual_seed(0)
    model = StyleModel()
    with torch.no_grad():
        for cin in (model.cin, model.chain[1]):
            cin.weight.uniform_(0.5, 1.5)
            cin.bias.uniform_(-1, 1)
    return model


class LossModel(nn.Module):
    """Every loss module against fixed targets."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        t1, t2 = torch.randn(1, 3, 6, 6, generator=g), 2 + torch.randn(1, 4, 5, 5, generator=g)
        self.gram = stylenorm.GramLoss(t1)
        self.mean_std = stylenorm.MeanStdLoss(t1, correction=1)
        self.mmd = stylenorm.MMDLoss(t1)
        self.mmd_gaussian = stylenorm.MMDLoss(t1, kernel="gaussian", sigma=3.0)
        self.style = stylenorm.StyleLoss({"a": t1, "b": t2}, loss="adain_lua")
        self.style_gram = stylenorm.StyleLoss([t1, t2], weights=[1.0, 0.5])

    def forward(self, x: Tensor, y: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        return (
            self.gram(x),
            self.gram(x, mask),
            self.mean_std(x),
            self.mmd(x),
            self.mmd_gaussian(x),
            self.style({"a": x, "b": y}),
            self.style_gram([x, y]),
        )


def _loss_inputs(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(2)
    x = 0.5 + torch.randn(2, 3, 6, 6, generator=g)
    y = 2 + torch.randn(2, 4, 5, 5, generator=g)
    mask = torch.rand(2, 1, 6, 6, generator=g)
    return x.to(dtype), y.to(dtype), mask


# TorchScript is deprecated by torch (and inductor's backward compilation uses it internally).
_ignore_jit_deprecation = pytest.mark.filterwarnings("ignore:`torch.jit.*:DeprecationWarning")


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)


@functools.cache
def _backend() -> str:
    """inductor where it can compile on this machine (it needs a C++ compiler), else aot_eager
    (the same graph capture and autograd tracing, without code generation)."""
    try:
        torch.compile(lambda t: t.sin() + 1, backend="inductor", fullgraph=True)(torch.randn(4))
    except Exception as error:  # pragma: no cover - depends on the machine
        warnings.warn(
            f"inductor cannot compile on this machine ({type(error).__name__}: {error}); "
            "the compile tests use backend='aot_eager'",
            stacklevel=2,
        )
        return "aot_eager"
    return "inductor"


@pytest.fixture
def compiler() -> Callable[[nn.Module], tuple[nn.Module, Any]]:
    """``compile(module) -> (compiled, counter)``: fullgraph (any graph break raises), with a
    frame counter to check that later steps reuse the graph."""
    torch._dynamo.reset()

    def compile_(module: nn.Module) -> tuple[nn.Module, Any]:
        counter = torch._dynamo.testing.CompileCounterWithBackend(_backend())
        return torch.compile(module, fullgraph=True, backend=counter), counter

    yield compile_
    torch._dynamo.reset()


def _backward(outputs: tuple[Tensor, ...]) -> None:
    g = torch.Generator().manual_seed(9)
    total = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outputs)
    assert isinstance(total, Tensor)
    total.backward()


def _grads(module: nn.Module) -> dict[str, Tensor | None]:
    return {name: p.grad for name, p in module.named_parameters()}


@_ignore_jit_deprecation
def test_compile_drop_ins_train_and_eval(compiler):
    """Training steps (running statistics, momentum=None, backward) and evaluation, compiled with
    fullgraph=True, give the eager outputs, gradients and running statistics."""
    eager = _randomize(DropInModel())
    compiled_model = copy.deepcopy(eager)
    compiled, counter = compiler(compiled_model)
    for step in range(3):
        inputs = _drop_in_inputs(seed=step)
        eager.zero_grad()
        compiled_model.zero_grad()
        x_eager = [x.clone().requires_grad_() for x in inputs]
        x_compiled = [x.clone().requires_grad_() for x in inputs]
        y_eager, y_compiled = eager(*x_eager), compiled(*x_compiled)
        _close(y_compiled, y_eager)
        _backward(y_eager)
        _backward(y_compiled)
        _close([x.grad for x in x_compiled], [x.grad for x in x_eager], 1e-4)
        _close(_grads(compiled_model), _grads(eager), 1e-4)
        _assert_same_state(compiled_model, eager)
    assert int(compiled_model.bn2.num_batches_tracked) == 3
    assert counter.frame_count == 1, "training steps must reuse one graph"
    eager.eval()
    compiled_model.eval()
    inputs = _drop_in_inputs(seed=10)
    with torch.no_grad():
        _close(compiled(*inputs), eager(*inputs))


@_ignore_jit_deprecation
def test_compile_batch_norm_cumulative_average_matches_torch_eager(compiler):
    """momentum=None (cumulative average) in training: torch.nn's class cannot be compiled with
    fullgraph=True (it reads float(num_batches_tracked)); ours compiles to one graph and its
    running statistics equal torch.nn's eager ones, step after step. SyncBatchNorm outside a
    process group is the same layer."""

    class Model(nn.Module):
        def __init__(self, bn1: type[nn.Module], bn2: type[nn.Module], sync: type[nn.Module]):
            super().__init__()
            self.bn1, self.bn2 = bn1(3, momentum=None), bn2(3, momentum=None)
            self.sync = sync(3, momentum=None)

        def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
            return self.bn1(x1), self.sync(self.bn2(x2))

    # Outside a process group SyncBatchNorm is a BatchNorm (torch's refuses CPU input).
    reference = _randomize(Model(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm2d))
    ours = Model(stylenorm.BatchNorm1d, stylenorm.BatchNorm2d, stylenorm.SyncBatchNorm)
    ours.load_state_dict(reference.state_dict())
    compiled, counter = compiler(ours)
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        x1 = (step + torch.randn(6, 3, generator=g)) * (1 + step)
        x2 = (step + torch.randn(4, 3, 5, 5, generator=g)) * (1 + step)
        with torch.no_grad():
            _close(compiled(x1, x2), reference(x1, x2))
        _assert_same_state(ours, reference, 1e-6)
    assert int(ours.bn2.num_batches_tracked) == 4
    assert counter.frame_count == 1


@_ignore_jit_deprecation
def test_compile_style_layers(compiler):
    """CIN with int, id and mixture styles, AdaIN (plain and masked), StyleAdaIN and a
    StyleSequential: one graph, the eager outputs and gradients."""
    eager = _style_model()
    compiled_model = copy.deepcopy(eager)
    compiled, counter = compiler(compiled_model)
    for seed in range(2):
        inputs = _style_inputs(seed)
        x_eager, x_compiled = inputs[0].clone().requires_grad_(), inputs[0].clone().requires_grad_()
        y_eager = eager(x_eager, *inputs[1:])
        y_compiled = compiled(x_compiled, *inputs[1:])
        _close(y_compiled, y_eager)
        eager.zero_grad()
        compiled_model.zero_grad()
        _backward(y_eager)
        _backward(y_compiled)
        _close(x_compiled.grad, x_eager.grad, 1e-4)
        _close(_grads(compiled_model), _grads(eager), 1e-4)
    assert counter.frame_count == 1


@_ignore_jit_deprecation
@pytest.mark.parametrize("bad", [-1, 3])
def test_compiled_cin_rejects_out_of_range_ids(compiler, bad: int):
    """A compiled graph cannot read the ids to range-check them; a negative id must still fail
    (compiled indexing would wrap it round to the last style), as one past the end does."""
    module = stylenorm.ConditionalInstanceNorm2d(4, num_styles=3)
    compiled, _ = compiler(module)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(compiled(x, torch.tensor([0, 2])), module(x, torch.tensor([0, 2])))
    with pytest.raises((RuntimeError, IndexError)):
        compiled(x, torch.tensor([0, bad]))


@_ignore_jit_deprecation
def test_compiled_cin_names_an_out_of_range_int_style(compiler):
    """An int style id past the bank, compiled with fullgraph=True: dynamo refuses every raised
    exception there, but its message carries ours (the id was a symbolic int, which our message
    could not format: dynamo's BUILD_STRING error, without it). Without fullgraph, our
    IndexError itself."""
    layer = stylenorm.ConditionalInstanceNorm2d(4, 3)
    x = torch.randn(2, 4, 8, 8)
    compiled, _ = compiler(layer)
    compiled(x, 1)
    compiled(x, 2)  # a second int: dynamo makes the id symbolic
    message = "style id 7 is out of range for num_styles=3"
    with pytest.raises(Exception, match=message):
        compiled(x, 7)
    torch._dynamo.reset()
    with pytest.raises(IndexError, match=message):
        torch.compile(layer, backend=_backend())(x, 7)


@_ignore_jit_deprecation
def test_compile_losses(compiler):
    """Gram, mean/std, MMD (closed form and Gaussian) and StyleLoss (a convention and per-layer
    weights), with a mask: one graph, the eager values and input gradients."""
    eager = LossModel()
    compiled, counter = compiler(copy.deepcopy(eager))
    x, y, mask = _loss_inputs()
    xe, ye = x.clone().requires_grad_(), y.clone().requires_grad_()
    xc, yc = x.clone().requires_grad_(), y.clone().requires_grad_()
    expected, actual = eager(xe, ye, mask), compiled(xc, yc, mask)
    _close(actual, expected)
    sum(expected).backward()
    sum(actual).backward()
    _close((xc.grad, yc.grad), (xe.grad, ye.grad), 1e-4)
    assert counter.frame_count == 1


@_ignore_jit_deprecation
@pytest.mark.parametrize(
    "loss",
    [
        lambda x, y: stylenorm.functional.gram_loss(x, y),
        lambda x, y: stylenorm.functional.mean_std_loss(x, y),
        lambda x, y: stylenorm.functional.mmd_loss(x, y),
        lambda x, y: stylenorm.functional.mmd_loss(x, y, kernel="gaussian"),
    ],
    ids=["gram", "mean_std", "mmd", "mmd-gaussian"],
)
def test_compile_loss_functions_with_dynamic_shapes(loss: Callable[[Tensor, Tensor], Tensor]):
    """fullgraph=True with dynamic=True, where dynamo makes the float defaults symbolic: the
    option checks trace (math.isfinite of a symbolic offset broke the graph), two sizes give
    the eager values."""
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, dynamic=True, backend=_backend())
    for size in (8, 12):
        g = torch.Generator().manual_seed(size)
        x, y = (torch.randn(2, 16, size, size, generator=g) for _ in "xy")
        _close(compiled(x, y), loss(x, y))
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# TorchScript (deprecated by torch in favour of compile/export, still used in deployed pipelines)


def _script_options(name: str) -> list[dict[str, Any]]:
    if name.startswith("Batch"):
        return [{}, {"momentum": None}, {"affine": False, "track_running_stats": False}]
    return [{"affine": True}, {"affine": True, "track_running_stats": True}, {"momentum": None}]


@_ignore_jit_deprecation
@pytest.mark.parametrize("name", DROP_INS)
def test_script_drop_ins_train_and_eval(name: str):
    """torch.jit.script works on every drop-in (they replace scripted torch.nn norms); the scripted
    module computes with torch's kernels and gives the eager outputs and running statistics."""
    for options in _script_options(name):
        eager = _randomize(getattr(stylenorm, name)(3, **options))
        scripted_source = copy.deepcopy(eager)
        scripted = torch.jit.script(scripted_source)
        for step, training in enumerate((True, True, False, True)):
            eager.train(training)
            scripted.train(training)
            x = _input(name, seed=step)
            _close(scripted(x), eager(x))
            _assert_same_state(scripted_source, eager)
        if name.startswith("Instance"):  # unbatched input
            _close(scripted(x[0]), eager(x[0]))


@_ignore_jit_deprecation
def test_script_batch_norm_empty_batch_is_not_a_step():
    """Scripted, an empty batch still leaves the running statistics and the count untouched, so
    momentum=None's cumulative average matches eager's."""
    eager = stylenorm.BatchNorm2d(3, momentum=None)
    scripted_source = copy.deepcopy(eager)
    scripted = torch.jit.script(scripted_source)
    for x in (_input("x2d", 0), torch.randn(0, 3, 5, 6), _input("x2d", 1) + 2):
        _close(scripted(x), eager(x))
        _assert_same_state(scripted_source, eager)
    assert int(scripted_source.num_batches_tracked) == 2


@_ignore_jit_deprecation
def test_script_model_with_drop_ins():
    """A scripted network with drop-ins (as a scripted torch.nn network would have) runs, saves
    and loads, with the eager outputs in training and evaluation."""
    model = _randomize(
        nn.Sequential(
            nn.Conv2d(3, 4, 3),
            stylenorm.BatchNorm2d(4),
            nn.ReLU(),
            stylenorm.InstanceNorm2d(4, affine=True),
        )
    )
    scripted = torch.jit.script(copy.deepcopy(model))
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = _input("x2d")
    _close(loaded(x), model(x))
    model.eval()
    loaded.eval()
    _close(loaded(x), model(x))


# ------------------------------------------------------------------------------------------------
# torch.export


def _export_and_run(module: nn.Module, args: tuple[Any, ...]) -> Any:
    program = torch.export.export(module, args)
    return program.module()(*args)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_drop_ins(training: bool):
    """torch.export of every drop-in (momentum=None included): the exported program gives the
    eager outputs and, in training, updates the running statistics as eager does."""
    eager = _randomize(DropInModel()).train(training)
    exported = copy.deepcopy(eager)
    inputs = _drop_in_inputs(seed=0)
    program = torch.export.export(exported, inputs)
    # Exporting traces without running: the buffers are still the eager model's.
    _assert_same_state(exported, eager, 0.0)
    runnable = program.module()
    for step in range(2):
        inputs = _drop_in_inputs(seed=step)
        _close(runnable(*inputs), eager(*inputs))
    if training:
        for key, value in eager.state_dict().items():
            _close(runnable.state_dict()[key], value, 1e-6)


def test_export_style_layers_and_losses():
    """torch.export of CIN (int, ids, mixture), AdaIN (plain, masked), StyleAdaIN,
    StyleSequential and every loss: the exported programs give the eager outputs."""
    style_model = _style_model()
    inputs = _style_inputs(0)
    _close(_export_and_run(style_model, inputs), style_model(*inputs))
    loss_model = LossModel()
    loss_inputs = _loss_inputs()
    _close(_export_and_run(loss_model, loss_inputs), loss_model(*loss_inputs))


# ------------------------------------------------------------------------------------------------
# ONNX (optional extra: pip install stylenorm[onnx])

_ONNX_MISSING = [
    name for name in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(name) is None
]


def _onnx_cases() -> list[tuple[str, Callable[[], tuple[nn.Module, tuple[Tensor, ...]]]]]:
    def drop_in(name: str, **options: Any) -> Callable[[], tuple[nn.Module, tuple[Tensor, ...]]]:
        return lambda: (_randomize(getattr(stylenorm, name)(3, **options)), (_input(name),))

    class CIN(nn.Module):
        def __init__(self, style: int | None) -> None:
            super().__init__()
            self.norm, self.style = _style_model().cin, style

        def forward(self, x: Tensor, style: Tensor) -> Tensor:
            return self.norm(x, style if self.style is None else self.style)

    class AdaINCall(nn.Module):
        def forward(self, x: Tensor, style: Tensor, mask: Tensor) -> Tensor:
            return stylenorm.AdaIN()(x, style, content_mask=mask, alpha=0.8)

    x, ids, mix, style, mask, code = _style_inputs(0)
    cases = [(f"{n}-{o}", drop_in(n, **o)) for n in DROP_INS for o in _script_options(n)[:2]]
    cases += [
        ("CIN-int", lambda: (CIN(2), (x, ids))),
        ("CIN-ids", lambda: (CIN(None), (x, ids))),
        ("CIN-mixture", lambda: (CIN(None), (x, mix))),
        ("AdaIN", lambda: (stylenorm.AdaIN(), (x, style))),
        ("AdaIN-masked", lambda: (AdaINCall(), (x, style, mask))),
        ("StyleAdaIN", lambda: (_style_model().style_adain, (x, code))),
    ]
    return cases


@pytest.mark.skipif(
    bool(_ONNX_MISSING),
    reason=f"ONNX export needs the optional 'onnx' extra, pip install 'stylenorm[onnx]' "
    f"(missing: {', '.join(_ONNX_MISSING)})",
)
@pytest.mark.parametrize(("case", "make"), _onnx_cases(), ids=[c for c, _ in _onnx_cases()])
def test_onnx_export_runs_in_onnxruntime(case: str, make):
    """Evaluation-mode ONNX export (torch.onnx.export, dynamo exporter) of the drop-ins, CIN,
    AdaIN and StyleAdaIN: onnxruntime's output equals PyTorch's."""
    import onnxruntime

    module, args = make()
    module.eval()
    with torch.no_grad():
        expected = module(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, verbose=False)
    assert program is not None
    session = onnxruntime.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]
    feeds = {n: a.numpy() for n, a in zip(names, args, strict=False)}
    (actual,) = session.run(None, feeds)
    _close(torch.from_numpy(actual), expected)


# ------------------------------------------------------------------------------------------------
# Autocast


@pytest.mark.parametrize("name", DROP_INS)
def test_autocast_drop_ins_match_torch(name: str):
    """Under autocast(bfloat16) after a convolution (bfloat16 activations): the output dtype is
    torch.nn's, running statistics stay float32, and values are close to float32's."""
    conv = {"1d": nn.Conv1d, "2d": nn.Conv2d, "3d": nn.Conv3d}[name[-2:]](3, 3, 1)
    options: dict[str, Any] = {"affine": True, "track_running_stats": True}
    theirs = nn.Sequential(conv, _randomize(getattr(nn, name)(3, **options)))
    ours = nn.Sequential(copy.deepcopy(conv), getattr(stylenorm, name)(3, **options))
    ours.load_state_dict(theirs.state_dict())
    full = copy.deepcopy(ours)
    for training in (True, False):
        for model in (theirs, ours, full):
            model.train(training)
        x = _input(name, seed=int(training))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_theirs, y_ours = theirs(x), ours(x)
        y_full = full(x)
        assert y_ours.dtype == y_theirs.dtype == torch.bfloat16
        assert ours[1].running_mean.dtype == ours[1].running_var.dtype == torch.float32
        _close(y_ours.float(), y_full, 6e-2)
        _close(y_ours.float(), y_theirs.float(), 6e-2)
    for key, value in full.state_dict().items():
        _close(ours.state_dict()[key], value, 2e-2)


def test_autocast_style_layers():
    """Under autocast(bfloat16) the style layers return the dtype of their input (bfloat16
    activations stay bfloat16, as torch's norms do), with values close to float32's."""
    model = _style_model()
    conv = nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
        conv.bias.zero_()
    inputs = _style_inputs(0)
    expected = model(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = conv(inputs[0])
        assert x.dtype == torch.bfloat16
        actual = model(x, *inputs[1:])
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == torch.bfloat16
        _close(a.float(), e, 1e-1)


def test_autocast_losses_are_float32():
    """Under autocast(bfloat16) every loss is float32 and is the float32 loss of its input: the
    Gram and kernel products do not drop to bfloat16."""
    model = LossModel()
    x, y, mask = _loss_inputs()
    expected = model(x, y, mask)
    half_inputs = (x.bfloat16(), y.bfloat16(), mask)
    expected_half = model(*half_inputs)  # float32 statistics of the bfloat16 input
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = model(x, y, mask)
        actual_half = model(*half_inputs)
    for a, ah, e, eh in zip(actual, actual_half, expected, expected_half, strict=True):
        assert a.dtype == ah.dtype == torch.float32
        _close(a, e, 1e-6)
        _close(ah, eh, 1e-6)


def test_autocast_loss_functions_are_float32():
    """The function forms too: under autocast(bfloat16) gram_matrix and every loss function
    return the float32 value of the same input, not a bfloat16 matrix product."""
    x, _, mask = _loss_inputs()
    y = 2.0 + 1.5 * x.flip(0, -1)  # a target with x's channels
    functions: list[Callable[[], Tensor]] = [
        lambda: stylenorm.functional.gram_matrix(x, mask=mask),
        lambda: stylenorm.functional.gram_loss(x, y),
        lambda: stylenorm.functional.mean_std_loss(x, y),
        lambda: stylenorm.functional.mmd_loss(x, y),
        lambda: stylenorm.functional.mmd_loss(x, y, kernel="gaussian"),
    ]
    for fn in functions:
        expected = fn()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = fn()
        assert actual.dtype == torch.float32
        _close(actual, expected, 1e-6)


# ------------------------------------------------------------------------------------------------
# torch.func


def _every_layer() -> list[tuple[str, Callable[[], tuple[nn.Module, tuple[Any, ...]]]]]:
    x, ids, mix, style, _, code = _style_inputs(0)
    cases: list[tuple[str, Callable[[], tuple[nn.Module, tuple[Any, ...]]]]] = [
        (name, lambda name=name: (getattr(stylenorm, name)(3, affine=True), (_input(name),)))
        for name in DROP_INS
    ]
    cases += [
        ("SyncBatchNorm", lambda: (stylenorm.SyncBatchNorm(3), (x,))),
        ("ConditionalInstanceNorm2d", lambda: (_style_model().cin, (x, ids))),
        ("StyleAdaIN", lambda: (_style_model().style_adain, (x, code))),
        ("AdaIN", lambda: (stylenorm.AdaIN(), (x, style))),
        ("StyleSequential", lambda: (_style_model().chain, (x, mix))),
    ]
    return cases


@pytest.mark.parametrize(("name", "make"), _every_layer(), ids=[n for n, _ in _every_layer()])
def test_functional_call_and_grad(name: str, make):
    """torch.func.functional_call with other parameters (and buffers) equals the module holding
    them; torch.func.grad through it equals autograd's gradients."""
    module, args = make()
    module = _randomize(module)
    params = {k: v.detach() * 0.5 + 0.25 for k, v in module.named_parameters()}
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    holder = copy.deepcopy(module)
    holder.load_state_dict({**params, **buffers})
    out = torch.func.functional_call(module, (params, buffers), args)
    expected = holder(*args)
    _close(out, expected)
    _assert_same_state(module, _randomize(make()[0]), 0.0)  # the module's own state is untouched
    if not params:
        return

    def loss(p: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(module, (p, b), args).square().mean()

    grads = torch.func.grad(loss)(params, {k: v.clone() for k, v in buffers.items()})
    holder.zero_grad()
    holder.load_state_dict({**params, **buffers})
    holder(*args).square().mean().backward()
    for key, value in grads.items():
        _close(value, holder.get_parameter(key).grad, 1e-5)


@pytest.mark.parametrize(
    "options",
    [{}, {"affine": True}, {"affine": True, "track_running_stats": True, "eval": True}],
    ids=["plain", "affine", "tracked-eval"],
)
@pytest.mark.parametrize("name", ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"])
def test_vmap_instance_norm_like_torch(name: str, options: dict[str, Any]):
    """vmap over an extra leading dimension works where torch.nn's InstanceNorm supports it
    (torch refuses tracked running statistics in training under vmap, and so does ours), with
    torch's numbers."""
    options = dict(options)
    evaluate = options.pop("eval", False)
    theirs = _randomize(getattr(nn, name)(3, **options)).train(not evaluate)
    ours = getattr(stylenorm, name)(3, **options).train(not evaluate)
    ours.load_state_dict(theirs.state_dict())
    xs = torch.stack([_input(name, seed) for seed in range(3)])
    _close(torch.func.vmap(ours)(xs), torch.func.vmap(theirs)(xs))
    _close(torch.func.vmap(ours)(xs), torch.stack([ours(x) for x in xs]))


@pytest.mark.parametrize("name", ["InstanceNorm2d", "BatchNorm2d"])
def test_vmap_tracked_training_is_refused_like_torch(name: str):
    """torch.nn's norms refuse vmap in training with tracked running statistics (an in-place
    update of unbatched buffers); ours refuse it too instead of silently mixing the batch."""
    options = {"track_running_stats": True}
    xs = torch.stack([_input(name, seed) for seed in range(2)])
    with pytest.raises(RuntimeError) as theirs:
        torch.func.vmap(getattr(nn, name)(3, **options))(xs)
    with pytest.raises(RuntimeError) as ours:
        torch.func.vmap(getattr(stylenorm, name)(3, **options))(xs)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("InstanceNorm1d", "contiguous"),
        ("InstanceNorm2d", "contiguous"),
        ("InstanceNorm2d", "channels_last"),
    ],
)
def test_func_transforms_of_tracked_instance_norm_update_captured_buffers_like_torch(
    name: str, layout: str
):
    """torch.func.grad and jvp through a tracked InstanceNorm whose running statistics are the
    module's own (captured, not passed in): torch.nn updates them with the primal statistics;
    so does ours, with torch's gradients, tangents and buffers."""
    shape = {"InstanceNorm1d": (2, 16, 50), "InstanceNorm2d": (2, 16, 128, 128)}[name]
    theirs = _randomize(getattr(nn, name)(16, affine=True, track_running_stats=True))
    ours = getattr(stylenorm, name)(16, affine=True, track_running_stats=True)
    ours.load_state_dict(theirs.state_dict())
    generator = torch.Generator().manual_seed(0)
    x = 1 + 2 * torch.randn(shape, generator=generator)
    if layout == "channels_last":  # 2^19 values: the channels_last route
        x = x.contiguous(memory_format=torch.channels_last)
    tangent = torch.randn(shape, generator=generator)
    results = []
    for module in (theirs, ours):
        params = dict(module.named_parameters())

        def loss(p: dict[str, Tensor], inp: Tensor, module: nn.Module = module) -> Tensor:
            return torch.func.functional_call(module, p, (inp,)).square().mean()

        grads = torch.func.grad(loss, argnums=(0, 1))(params, x)
        out, out_tangent = torch.func.jvp(module, (x,), (tangent,))
        results.append((grads, out, out_tangent))
    (their_grads, their_out, their_tangent), (our_grads, our_out, our_tangent) = results
    _close(our_grads, their_grads, 1e-4)
    _close(our_out, their_out)
    _close(our_tangent, their_tangent)
    _assert_same_state(ours, theirs)  # both updates, grad's and jvp's, took the primal values


@pytest.mark.filterwarnings("error")  # no vmap fallback warnings (torch.nn gives none)
@pytest.mark.parametrize(
    "transform", ["vmap", "vmap-buffers-only", "vmap-of-grad", "grad-of-vmap", "vmap-of-jvp"]
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_vmap_with_batched_running_statistics_like_torch(transform: str, layout: str):
    """Per-model running statistics passed in batched (functional_call under vmap, as for model
    ensembles), with grad or jvp inside or outside: each model's buffers take its own batch's
    statistics (all the same one batch's, where only the buffers are batched), as torch.nn's
    do."""
    generator = torch.Generator().manual_seed(3)
    models, channels = 3, 16
    xs = 1 + 2 * torch.randn(models, 2, channels, 128, 128, generator=generator)
    if layout == "channels_last":  # each model's batch on the channels_last route
        xs = torch.stack([x.contiguous(memory_format=torch.channels_last) for x in xs])
        assert xs[0].is_contiguous(memory_format=torch.channels_last)
    buffers = []
    for lib in (nn, stylenorm):
        module = lib.InstanceNorm2d(channels, track_running_stats=True)
        state = {
            "running_mean": torch.rand(
                models, channels, generator=torch.Generator().manual_seed(4)
            ),
            "running_var": torch.ones(models, channels),
        }

        def out(b: dict[str, Tensor], x: Tensor, module: nn.Module = module) -> Tensor:
            return torch.func.functional_call(module, b, (x,))

        def loss_grad(b: dict[str, Tensor], x: Tensor) -> Tensor:
            return torch.func.grad(lambda x: out(b, x).pow(3).mean())(x)

        if transform == "vmap":
            result = torch.func.vmap(out)(state, xs)
        elif transform == "vmap-buffers-only":
            result = torch.func.vmap(out, in_dims=(0, None))(state, xs[0])
        elif transform == "vmap-of-grad":
            result = torch.func.vmap(loss_grad)(state, xs)
        elif transform == "grad-of-vmap":

            def vmapped_loss(x: Tensor, state: dict[str, Tensor] = state) -> Tensor:
                return torch.func.vmap(out)(state, x).pow(3).mean()

            result = torch.func.grad(vmapped_loss)(xs)
        else:
            tangent = torch.ones_like(xs)
            result = torch.func.vmap(
                lambda b, x, t: torch.func.jvp(lambda x: out(b, x), (x,), (t,))[1]
            )(state, xs, tangent)
        buffers.append((result, state))
    (their_result, theirs), (our_result, ours) = buffers
    _close(our_result, their_result, 1e-4)
    _close(ours, theirs)
    assert not torch.equal(ours["running_var"], torch.ones(models, channels))  # updated


def _batched_gradient_case(op: str, x: Tensor) -> Tensor:
    generator = torch.Generator().manual_seed(2)
    n, c = x.shape[0], x.shape[1]
    w, b = 0.5 + torch.rand(c, generator=generator), torch.randn(c, generator=generator)
    style = 1 + 2 * torch.randn(n, c, 1, 1, generator=generator)
    target = 1 + 2 * torch.randn(x.shape, generator=generator)
    if op == "instance_norm":
        return stylenorm.functional.instance_norm(x, weight=w, bias=b)
    if op == "adain":
        return stylenorm.functional.adain(x, style_mean=style, style_std=style.abs())
    if op == "mean_std":
        return torch.cat(stylenorm.stats.mean_std(x))
    if op == "mean_std_loss":
        return stylenorm.functional.mean_std_loss(x, target)
    return stylenorm.functional.gram_loss(x, target)


@pytest.mark.parametrize("mean", [0.5, 5.0], ids=["mean-0.5", "mean-5"])
@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((2, 16, 8, 8), "contiguous"),
        ((2, 16, 8, 8), "channels_last"),
        ((2, 16, 128, 128), "contiguous"),
        ((2, 16, 128, 128), "channels_last"),
        ((1, 16, 256, 256), "channels_last"),
    ],
    ids=["small", "small-cl", "large", "large-cl", "one-sample-cl"],
)
@pytest.mark.parametrize("op", ["instance_norm", "adain", "mean_std", "mean_std_loss", "gram_loss"])
def test_batched_incoming_gradients_equal_a_loop(op: str, shape, layout: str, mean: float):
    """autograd.grad(..., is_grads_batched=True) runs the backwards under autograd's vmap:
    every route (the channels_last ones with their reused buffers and in-place sums included)
    gives each gradient of the batch as computed one by one."""
    generator = torch.Generator().manual_seed(1)
    x = mean + 2 * torch.randn(shape, generator=generator)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = _batched_gradient_case(op, x)
    grads = torch.randn((3, *y.shape), generator=generator)
    (batched,) = torch.autograd.grad(y, x, grads, is_grads_batched=True, retain_graph=True)
    for k in range(3):
        (expected,) = torch.autograd.grad(y, x, grads[k], retain_graph=True)
        scale = float(expected.abs().max())
        # 1e-5 of the largest entry: a batch of one on channels_last takes torch's kernel one
        # by one, whose sums are less precise (3e-6) than the batched whole-batch ops.
        _close(batched[k] / scale, expected / scale, 1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train-untracked", "eval"])
def test_vmap_batch_norm_like_torch(training: bool):
    """vmap of BatchNorm where torch's supports it: evaluation, and training without tracking."""
    theirs = _randomize(nn.BatchNorm2d(3, track_running_stats=not training)).train(training)
    ours = stylenorm.BatchNorm2d(3, track_running_stats=not training).train(training)
    ours.load_state_dict(theirs.state_dict())
    xs = torch.stack([_input("x2d", seed) for seed in range(3)])
    _close(torch.func.vmap(ours)(xs), torch.func.vmap(theirs)(xs))


def test_vmap_conditional_layers():
    """vmap of CIN (ids) and StyleAdaIN over an extra leading dimension equals a loop."""
    model = _style_model()
    inputs = [_style_inputs(seed) for seed in range(3)]
    xs = torch.stack([i[0] for i in inputs])
    codes = torch.stack([i[5] for i in inputs])
    ids = inputs[0][1]
    _close(
        torch.func.vmap(lambda x: model.cin(x, ids))(xs),
        torch.stack([model.cin(x, ids) for x in xs]),
    )
    _close(
        torch.func.vmap(model.style_adain)(xs, codes),
        torch.stack([model.style_adain(x, c) for x, c in zip(xs, codes, strict=True)]),
    )


def test_vmap_adain():
    """vmap of AdaIN over an extra leading dimension equals a loop."""
    adain = stylenorm.AdaIN()
    inputs = [_style_inputs(seed) for seed in range(3)]
    xs, styles = (torch.stack([i[k] for i in inputs]) for k in (0, 3))
    _close(
        torch.func.vmap(adain)(xs, styles),
        torch.stack([adain(x, s) for x, s in zip(xs, styles, strict=True)]),
    )


def test_vmap_adain_masked():
    """vmap of masked AdaIN over an extra leading dimension equals a loop."""
    adain = stylenorm.AdaIN()
    inputs = [_style_inputs(seed) for seed in range(3)]
    xs, styles, masks = (torch.stack([i[k] for i in inputs]) for k in (0, 3, 4))
    _close(
        torch.func.vmap(lambda x, s, m: adain(x, s, content_mask=m))(xs, styles, masks),
        torch.stack(
            [adain(x, s, content_mask=m) for x, s, m in zip(xs, styles, masks, strict=True)]
        ),
    )


def _vmap_losses(names: tuple[str, ...]) -> None:
    model = LossModel()
    batches = [_loss_inputs() for _ in range(2)]
    xs = torch.stack([b[0] + k for k, b in enumerate(batches)])
    for name in names:
        loss = model.get_submodule(name)
        _close(torch.func.vmap(loss)(xs), torch.stack([loss(x) for x in xs]))


def test_vmap_gram_and_gaussian_mmd_losses():
    """vmap of the Gram and Gaussian-MMD losses over an extra leading dimension equals a loop."""
    _vmap_losses(("gram", "mmd_gaussian"))


def test_vmap_mean_std_and_closed_form_mmd_losses():
    """vmap of the mean/std and closed-form MMD losses (which reduce with stats) equals a loop."""
    _vmap_losses(("mean_std", "mmd"))


def test_vmap_over_a_strided_dimension_and_of_grad():
    """vmap over a middle dimension (strided per-sample views) of the statistics, instance norm
    and AdaIN, and vmap of torch.func.grad of the statistics, each equal a loop."""
    gen = torch.Generator().manual_seed(4)
    xs = torch.randn(2, 3, 4, 5, 6, generator=gen, dtype=torch.float64)
    adain = stylenorm.AdaIN()
    for fn in (
        lambda x: torch.stack(stats.mean_std(x)),
        lambda x: stylenorm.functional.instance_norm(x),
        lambda x: adain(x, x.flip(0)),
    ):
        _close(torch.func.vmap(fn, in_dims=1)(xs), torch.stack([fn(xs[:, i]) for i in range(3)]))

    def spread(x: torch.Tensor) -> torch.Tensor:
        return stats.mean_std(x)[1].sum()

    per_sample = torch.func.vmap(torch.func.grad(spread))(xs)
    _close(per_sample, torch.stack([torch.func.grad(spread)(x) for x in xs]))


def _large_channels_last(seed: int, *batch: int) -> Tensor:
    """Big enough for the blockwise channels_last code as shipped (2^18 values, 16 channels),
    with 289 positions in blocks of 256: the last block is short."""
    gen = torch.Generator().manual_seed(seed)
    x = 3.0 + torch.randn(*batch, 2, 512, 17, 17, generator=gen)
    return x if batch else x.contiguous(memory_format=torch.channels_last)


def test_vmap_over_parameters_with_large_channels_last_input():
    """vmap over the style or the affine parameters of a large channels_last (unbatched) input:
    the blockwise Function has no vmap rule, so these take the contiguous kernels; each equals
    a loop."""
    x = _large_channels_last(1)
    assert stats._blockwise_channels_last(x)
    styles = _large_channels_last(2, 3)
    adain = stylenorm.AdaIN()
    _close(
        torch.func.vmap(lambda s: adain(x, s))(styles),
        torch.stack([adain(x, s) for s in styles]),
    )
    weights = torch.rand(3, 512) + 0.5

    def normalize(w: Tensor) -> Tensor:
        return stylenorm.functional.instance_norm(x, weight=w, bias=-w)

    _close(torch.func.vmap(normalize)(weights), torch.stack([normalize(w) for w in weights]))


@_ignore_jit_deprecation
def test_compile_large_channels_last(compiler):
    """Statistics and instance norm of a channels_last input that eager mode reduces blockwise
    (uneven blocks) compile to one graph and give the eager values and gradients."""
    x = _large_channels_last(3)
    assert stats._blockwise_channels_last(x)

    class NormAndStats(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = stylenorm.InstanceNorm2d(512, affine=True)

        def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
            return self.norm(t), torch.stack(stats.mean_std(t))

    model = NormAndStats()
    compiled, _ = compiler(model)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager_out, compiled_out = model(xe), compiled(xc)
    for e, c in zip(eager_out, compiled_out, strict=True):
        _close(c, e)
    _backward(eager_out)
    _backward(compiled_out)
    assert xe.grad is not None and xc.grad is not None
    _close(xc.grad, xe.grad)


def _norm_by_formula(x: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-5) -> Tensor:
    """(x - mean) / sqrt(var + eps) * scale + shift with torch.var_mean, (N, C) parameters."""
    var, mean = torch.var_mean(x, (2, 3), correction=0, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * scale[..., None, None] + shift[..., None, None]


@_ignore_jit_deprecation
@pytest.mark.parametrize("layer", ["InstanceNorm2d", "ConditionalInstanceNorm2d", "AdaIN"])
def test_compile_channels_last_with_gradient_is_precise_at_large_means(layer: str):
    """Compiled with a gradient, channels_last instance norm, CIN and AdaIN are traced as the
    corrected two-pass formula on the input's layout (not the eager route's group norm behind
    transposing copies): at |mean|/std = 1e3, output and gradients are as close to float64 as
    the same formula run eagerly with torch.var_mean (the plain two-pass had up to 29x its
    error, the group-norm route up to 120x), give or take 1e-6 of the largest value: the
    compiled sums over positions add in float32 one by one (the bias gradient, a plain sum of
    the incoming gradient, has 6e-7)."""
    gen = torch.Generator().manual_seed(4)
    x64 = 1e3 + torch.randn(2, 16, 32, 32, generator=gen, dtype=torch.float64)
    x64 = x64.contiguous(memory_format=torch.channels_last)
    g64 = torch.randn(x64.shape, generator=gen, dtype=torch.float64)
    scale64 = 0.5 + torch.rand(2, 16, generator=gen, dtype=torch.float64)
    shift64 = torch.randn(2, 16, generator=gen, dtype=torch.float64)
    ids = torch.tensor([1, 0])

    def ours(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        if layer == "InstanceNorm2d":  # one (C,) affine pair
            return stylenorm.functional.instance_norm(x, weight=scale[0], bias=shift[0])
        if layer == "ConditionalInstanceNorm2d":  # bank rows picked by style id
            return stylenorm.functional.conditional_instance_norm(
                x, ids, scale.flip(0), shift.flip(0)
            )
        return stylenorm.functional.adain(
            x, style_mean=shift[..., None, None], style_std=scale[..., None, None]
        )

    def by_formula(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        if layer == "InstanceNorm2d":
            scale, shift = scale[:1].expand(2, -1), shift[:1].expand(2, -1)
        return _norm_by_formula(x, scale, shift)

    def results(fn: Callable[..., Tensor], dtype: torch.dtype) -> list[Tensor]:
        inputs = [t.to(dtype, copy=True).requires_grad_() for t in (x64, scale64, shift64)]
        y = fn(*inputs)
        y.backward(g64.to(dtype))
        return [y.detach().double()] + [t.grad.double() for t in inputs]

    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend=_backend())
    reference = results(by_formula, torch.float64)
    yardstick = results(by_formula, torch.float32)
    ours_results = results(compiled, torch.float32)
    torch._dynamo.reset()
    for name, got, plain, ref in zip(
        ("y", "x", "scale", "shift"), ours_results, yardstick, reference, strict=True
    ):
        scale_of = ref.abs().max()
        err, plain_err = (got - ref).abs().max() / scale_of, (plain - ref).abs().max() / scale_of
        assert err <= 2 * plain_err + 1e-6, (name, float(err), float(plain_err))


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((2, 16, 8, 8), torch.float32),
        ((2, 16, 4, 4, 4), torch.float32),
        ((2, 16, 8, 8), torch.bfloat16),
    ],
    ids=["channels_last", "channels_last_3d", "bfloat16"],
)
def test_compile_channels_last_traces_the_formula_only_with_a_gradient(
    shape: tuple[int, ...], dtype: torch.dtype
):
    """The traced graph of a channels_last instance norm: with a gradient, reductions on the
    input's layout (the group-norm route compiled to a forward+backward 3.3x-4.8x slower);
    without one, the eager route, whose forward compiles faster. Same values, layout and dtype
    either way (a half input with float32 parameters, as torch.nn takes it, too)."""
    seen: list[str] = []

    def recording(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., Any]:
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    layout = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.randn(shape).to(dtype).contiguous(memory_format=layout)
    weight = torch.rand(16, requires_grad=True)
    expected = stylenorm.functional.instance_norm(x, weight=weight)
    try:
        for grad in (True, False):
            seen.clear()
            torch._dynamo.reset()
            fn = torch.compile(
                stylenorm.functional.instance_norm, fullgraph=True, backend=recording
            )
            with torch.set_grad_enabled(grad):
                y = fn(x, weight=weight)
            assert y.dtype == dtype and y.is_contiguous(memory_format=layout)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            _close(y, expected.detach(), tol)
            group_norm = any("group_norm" in target for target in seen)
            assert group_norm is not grad, seen
            assert ("mean" in seen) is grad, seen  # the formula's reductions
    finally:
        torch._dynamo.reset()


@_ignore_jit_deprecation
def test_compile_channels_last_with_gradient_keeps_running_stats_and_errors(compiler):
    """Compiled channels_last InstanceNorm with a gradient and running statistics: the same
    output, gradients and running statistics as eager; parameters of another dtype take the
    same compiled route with a gradient as without."""
    gen = torch.Generator().manual_seed(6)
    x = (50 + torch.randn(3, 16, 8, 8, generator=gen)).contiguous(memory_format=torch.channels_last)
    eager = stylenorm.InstanceNorm2d(16, affine=True, track_running_stats=True)
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5)
    model = copy.deepcopy(eager)
    compiled, _ = compiler(model)
    for _ in range(2):
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        _close(yc, ye)
        _backward((ye,))
        _backward((yc,))
        _close(xc.grad, xe.grad, 1e-4)
        _close(_grads(model), _grads(eager), 1e-4)
        _assert_same_state(model, eager)
    # Parameters of another dtype: eager raises torch's error; compiled, torch's meta kernels do
    # not check it (nor for torch.nn's), and with or without a gradient the same route runs.
    wrong = model.weight.detach().double()
    with pytest.raises(RuntimeError, match="mixed dtype"):
        stylenorm.functional.instance_norm(x, weight=wrong)
    outputs = []
    for grad in (True, False):
        torch._dynamo.reset()
        fn = torch.compile(stylenorm.functional.instance_norm, fullgraph=True, backend=_backend())
        outputs.append(fn(x, weight=wrong.clone().requires_grad_(grad)).detach())
    _close(outputs[0], outputs[1])


def test_grad_transform_of_losses():
    """torch.func.grad of every loss w.r.t. its input equals autograd's gradient."""
    model = LossModel()
    x, _, _ = _loss_inputs()
    for loss in (model.gram, model.mean_std, model.mmd, model.mmd_gaussian):
        xr = x.clone().requires_grad_()
        loss(xr).backward()
        _close(torch.func.grad(loss)(x), xr.grad)


# ------------------------------------------------------------------------------------------------
# Factory kwargs, meta device, copying and serialization


def _constructors() -> list[tuple[str, Callable[..., nn.Module]]]:
    cases: list[tuple[str, Callable[..., nn.Module]]] = [
        (
            name,
            functools.partial(getattr(stylenorm, name), 3, affine=True, track_running_stats=True),
        )
        for name in DROP_INS
    ]
    cases += [
        ("SyncBatchNorm", functools.partial(stylenorm.SyncBatchNorm, 3)),
        ("ConditionalInstanceNorm2d", functools.partial(stylenorm.ConditionalInstanceNorm2d, 3, 4)),
        ("StyleAdaIN", functools.partial(stylenorm.StyleAdaIN, 5, 3)),
    ]
    return cases


@pytest.mark.parametrize(("name", "make"), _constructors(), ids=[n for n, _ in _constructors()])
def test_factory_kwargs_and_meta_device(name: str, make):
    """device=/dtype= place every parameter and buffer; a module built on the meta device,
    materialized with to_empty and reset_parameters, equals one built on the CPU."""
    double = make(device="cpu", dtype=torch.float64)
    for key, value in double.state_dict().items():
        assert value.device.type == "cpu", key
        assert value.dtype == (torch.long if key.endswith("num_batches_tracked") else torch.float64)
    meta = make(device="meta")
    assert all(t.is_meta for t in meta.state_dict().values())
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    if hasattr(meta, "reset_running_stats"):
        meta.reset_running_stats()
    reference = make()
    for key, value in reference.state_dict().items():
        if key == "affine.weight":  # random (Linear's init): check its range only
            bound = 1 / reference.style_dim**0.5
            assert meta.state_dict()[key].abs().max() <= bound
            continue
        torch.testing.assert_close(meta.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_meta_device_forward_shapes():
    """Layers and losses run on meta tensors (shape inference without memory)."""
    x = torch.empty(4, 3, 6, 6, device="meta")
    for module, args in [
        (stylenorm.BatchNorm2d(3, device="meta"), (x,)),
        (stylenorm.InstanceNorm2d(3, affine=True, device="meta"), (x,)),
        (stylenorm.ConditionalInstanceNorm2d(3, 4, device="meta"), (x, 1)),
        (stylenorm.AdaIN(), (x, torch.empty(1, 3, 5, 5, device="meta"))),
        (stylenorm.StyleAdaIN(5, 3, device="meta"), (x, torch.empty(4, 5, device="meta"))),
    ]:
        assert module(*args).shape == x.shape
    target = torch.empty(1, 3, 5, 5, device="meta")
    for loss in (stylenorm.GramLoss(target), stylenorm.MeanStdLoss(target)):
        assert loss(x).shape == () and loss(x).is_meta


def _every_module() -> list[tuple[str, Callable[[], tuple[nn.Module, tuple[Any, ...]]]]]:
    def loss(cls: type[nn.Module], **options: Any) -> Callable[..., tuple[nn.Module, tuple]]:
        def make(seed: int = 3) -> tuple[nn.Module, tuple]:
            target = 1 + torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(seed))
            return cls(target, **options), (_style_inputs(0)[0],)

        return make

    x = _style_inputs(0)[0]
    return [
        *_every_layer(),
        ("GramLoss", loss(stylenorm.GramLoss, persistent=True)),
        ("MeanStdLoss", loss(stylenorm.MeanStdLoss, persistent=True)),
        ("MMDLoss", loss(stylenorm.MMDLoss, kernel="gaussian", persistent=True)),
        ("StyleLoss", lambda: (LossModel().style, ({"a": x, "b": _loss_inputs()[1]},))),
    ]


@pytest.mark.parametrize(("name", "make"), _every_module(), ids=[n for n, _ in _every_module()])
def test_copy_pickle_and_save(name: str, make):
    """copy.deepcopy, pickle and torch.save/torch.load of the whole module, and torch.save +
    torch.load(weights_only=True) of the state_dict into a fresh module, keep the outputs."""
    module, args = make()
    module = _randomize(module)
    if any(b is not None for b in module.buffers()) and isinstance(
        module, nn.modules.batchnorm._NormBase
    ):
        module(*args)  # non-trivial running statistics
    module.eval()
    expected = module(*args)
    _close(copy.deepcopy(module)(*args), expected, 0.0)
    _close(pickle.loads(pickle.dumps(module))(*args), expected, 0.0)
    whole = io.BytesIO()
    torch.save(module, whole)
    whole.seek(0)
    _close(torch.load(whole, weights_only=False)(*args), expected, 0.0)
    state = io.BytesIO()
    torch.save(module.state_dict(), state)
    state.seek(0)
    persistent = getattr(module, "persistent", False)
    # A persistent loss is rebuilt from another target: loading the state brings the cached one.
    fresh = (make(seed=4) if persistent else make())[0].eval()
    if persistent:
        assert not torch.equal(fresh(*args), expected)
    fresh.load_state_dict(torch.load(state, weights_only=True))
    _close(fresh(*args), expected, 0.0)
