"""Ahead-of-time compilation of every Triton kernel for the H100/H200 (sm_90), without a GPU.

The correctness tests run the kernels in triton's interpreter, which never calls the compiler: a
constexpr misuse, a tl.dot shape or type the hardware lacks, a bad pointer cast, a layout
conversion the backend cannot lower, registers spilled to local memory or a tile that needs more
shared memory than a block may have would all pass there and fail (or crawl) on the GPU. Here each
kernel goes through triton's real pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas -> cubin) for
``GPUTarget("cuda", 90, 64)``, for the GPU autotune configs its launches keep and every operand
dtype, with argument types and integer specializations taken from a realistic launch, and the
cubin's resources are checked: no spill to local memory, at most 255 registers per thread, at most
227 KiB of shared memory per block (sm_90's opt-in limit, which triton enforces at load time).

A triton imported under TRITON_INTERPRET=1 (conftest.py sets it without CUDA) cannot compile: its
own library functions (tl.cdiv, the reduction combiners) are interpreter functions. So the
compiling happens in a worker process started with the interpreter off (``--serve``), where the
kernel modules are what they are on a GPU, GPU autotune configs included; the tests send it one
kernel at a time and check its report.

The default run compiles, per GEMM kernel and dtype, the smallest and the largest tile, and every
optimizer and Hutchinson variant; the ``slow`` test compiles every config of every variant (its
table is shown when one fails). ``python tests/test_cuda_compile.py`` prints that table without pytest.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import pytest

pytest.importorskip("triton")
from fastmask.backend import interpreter_on  # noqa: E402
from fastmask.kernels import _config  # noqa: E402

SM90 = ("cuda", 90, 64)  # GPUTarget(backend, arch, warp size)
SM90_MAX_SHARED_BYTES = 227 * 1024  # cudaDevAttrMaxSharedMemoryPerBlockOptin on H100 and H200
MAX_REGISTERS = 255
WORKER_TIMEOUT_S = 300  # one kernel; the slowest seen compiles in 4 s
# Operand dtype (triton's name) and tl.dot input precision of each GEMM variant.
GEMM_DTYPES = {"fp32-ieee": ("fp32", "ieee"), "fp32-tf32": ("fp32", "tf32"), "bf16": ("bf16", "ieee"),
               "fp16": ("fp16", "ieee")}


# --------------------------------------------------------------------------------------------
# Realistic launches: the arguments each launcher passes, for one typical shape per kernel.
# Pointers are written as triton type strings ("*fp32"), integers as values (specialized below as
# the JIT specializes them), floats as floats, constexprs by name.
# --------------------------------------------------------------------------------------------

def _strides(shape):
    """Contiguous strides of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _broadcast(strides):
    """Strides of a [1, ...] operand shared by the K models (the launchers pass 0 for the K stride)."""
    return (0,) + tuple(strides[1:])


# A ResNet-18 CIFAR stage-1 conv (64 -> 64 channels, 3x3, stride 1, padding 1, 32x32 images, batch
# 128) on a stack of K = 2 models; the interpolated forward evaluates K = 30 alphas on one input.
CONV = dict(N=128, C=64, H=32, W=32, O=64, OH=32, OW=32, R=3, S=3,
            stride_h=1, stride_w=1, pad_h=1, pad_w=1, dil_h=1, dil_w=1)


def conv_forward_args(dtype, precision, interpolate):
    c = CONV
    K = 30 if interpolate else 2
    w_strides = _strides((K, c["O"], c["C"], c["R"], c["S"]))
    x_strides = _strides((K, c["N"], c["C"], c["H"], c["W"]))
    if interpolate:
        w_strides, x_strides = _broadcast(w_strides), _broadcast(x_strides)
    t = "*" + dtype
    return dict(
        x_ptr=t, w_ptr=t, m_ptr="*i1", bias_ptr=t, y_ptr=t, w_b_ptr=t, bias_b_ptr=t,
        alpha_ptr="*fp32" if interpolate else t, **c, K_MODELS=K, N_BUCKET=c["N"],
        **dict(zip(("sxk", "sxn", "sxc", "sxh", "sxw"), x_strides)),
        **dict(zip(("swk", "swo", "swc", "swr", "sws"), w_strides)),
        **dict(zip(("smk", "smo", "smc", "smr", "sms"), w_strides)),
        sbk=0 if interpolate else c["O"], sbo=1,
        **dict(zip(("syk", "syn", "syo", "syh", "syw"), _strides((K, c["N"], c["O"], c["OH"], c["OW"])))),
        HAS_BIAS=True, INTERPOLATE=interpolate, UPCAST=False, PRECISION=precision,
    )


def conv_grad_input_args(dtype, precision):
    c = CONV
    K = 2
    t = "*" + dtype
    w_strides = _strides((K, c["O"], c["C"], c["R"], c["S"]))
    return dict(
        gy_ptr=t, w_ptr=t, m_ptr="*i1", gx_ptr=t, **c, K_MODELS=K, N_BUCKET=c["N"],
        **dict(zip(("sgk", "sgn", "sgo", "sgh", "sgw"), _strides((K, c["N"], c["O"], c["OH"], c["OW"])))),
        **dict(zip(("swk", "swo", "swc", "swr", "sws"), w_strides)),
        **dict(zip(("smk", "smo", "smc", "smr", "sms"), w_strides)),
        **dict(zip(("sxk", "sxn", "sxc", "sxh", "sxw"), _strides((K, c["N"], c["C"], c["H"], c["W"])))),
        UPCAST=False, PRECISION=precision,
    )


def conv_grad_weight_args(dtype, precision):
    c = CONV
    K = 2
    t = "*" + dtype
    split = 14  # what conv_grad_weight picks for this shape on a GPU
    pixels = c["N"] * c["OH"] * c["OW"]
    return dict(
        gy_ptr=t, x_ptr=t, m_ptr="*i1", gw_ptr="*fp32", **c, K_MODELS=K, N_BUCKET=c["N"], SPLIT=split,
        SPLIT_LEN=-(-pixels // split),
        **dict(zip(("sgk", "sgn", "sgo", "sgh", "sgw"), _strides((K, c["N"], c["O"], c["OH"], c["OW"])))),
        **dict(zip(("sxk", "sxn", "sxc", "sxh", "sxw"), _strides((K, c["N"], c["C"], c["H"], c["W"])))),
        **dict(zip(("smk", "smo", "smc", "smr", "sms"), _strides((K, c["O"], c["C"], c["R"], c["S"])))),
        UPCAST=False, PRECISION=precision,
    )


# LeNet-300-100's first layer (784 -> 300) on a stack of K = 2 models, batch 128; the interpolated
# forward evaluates K = 30 alphas on one input.
LINEAR = dict(batch=128, fan_in=784, fan_out=300)


def _bmm_args(dtype, precision, M, N, K, a, b, c, bmask=None, bias=None, cmask=None, interpolate=False):
    """masked_bmm_kernel's arguments; a, b, c, bmask, cmask are (batch, rows, cols) strides, bias
    (batch, col) strides, None where the operand is absent (the launcher passes C and zero strides)."""
    t = "*" + dtype
    return dict(
        a_ptr=t, b_ptr=t, bmask_ptr="*i1" if bmask else t, bias_ptr=t, cmask_ptr="*i1" if cmask else t, c_ptr=t,
        b2_ptr=t, bias2_ptr=t, alpha_ptr="*fp32" if interpolate else t, M=M, N=N, K=K,
        M_BUCKET=1 << (M - 1).bit_length(), K_BUCKET=1 << (K - 1).bit_length(), BATCH=30 if interpolate else 2,
        **dict(zip(("stride_ab", "stride_am", "stride_ak"), a)),
        **dict(zip(("stride_bb", "stride_bk", "stride_bn"), b)),
        **dict(zip(("stride_bmb", "stride_bmk", "stride_bmn"), bmask or (0, 0, 0))),
        **dict(zip(("stride_biasb", "stride_biasn"), bias or (0, 0))),
        **dict(zip(("stride_cmb", "stride_cmm", "stride_cmn"), cmask or (0, 0, 0))),
        **dict(zip(("stride_cb", "stride_cm", "stride_cn"), c)),
        HAS_BMASK=bmask is not None, HAS_BIAS=bias is not None, HAS_CMASK=cmask is not None,
        INTERPOLATE=interpolate, UPCAST=False, PRECISION=precision,
    )


def linear_forward_args(dtype, precision, interpolate):
    """y = x @ (w * m)^T + b: B is w^T through strides (K-contiguous)."""
    M, fan_in, fan_out = LINEAR["batch"], LINEAR["fan_in"], LINEAR["fan_out"]
    K = 30 if interpolate else 2
    x = _strides((K, M, fan_in))
    w = _strides((K, fan_out, fan_in))
    w_t = (w[0], w[2], w[1])
    bias = (fan_out, 1)
    if interpolate:
        x, w_t, bias = _broadcast(x), _broadcast(w_t), (0, 1)
    return _bmm_args(dtype, precision, M, fan_out, fan_in, a=x, b=w_t, c=_strides((K, M, fan_out)), bmask=w_t,
                     bias=bias, interpolate=interpolate)


def linear_grad_input_args(dtype, precision):
    """gx = gy @ (w * m)."""
    M, fan_in, fan_out = LINEAR["batch"], LINEAR["fan_in"], LINEAR["fan_out"]
    w = _strides((2, fan_out, fan_in))
    return _bmm_args(dtype, precision, M, fan_in, fan_out, a=_strides((2, M, fan_out)), b=w,
                     c=_strides((2, M, fan_in)), bmask=w)


def linear_grad_weight_args(dtype, precision):
    """gw = (gy^T @ x) * m: A is gy^T through strides (M-contiguous), the mask in the epilogue."""
    M, fan_in, fan_out = LINEAR["batch"], LINEAR["fan_in"], LINEAR["fan_out"]
    gy = _strides((2, M, fan_out))
    w = _strides((2, fan_out, fan_in))
    return _bmm_args(dtype, precision, fan_out, fan_in, M, a=(gy[0], gy[2], gy[1]), b=_strides((2, M, fan_in)),
                     c=w, cmask=w)


# name -> (kernel module, kernel, args(dtype, precision)). The first four are also the default run's.
GEMM_KERNELS = {
    "conv_forward_interpolated": ("masked_conv", "conv_forward_kernel",
                                  lambda d, p: conv_forward_args(d, p, interpolate=True)),
    "conv_grad_input": ("masked_conv", "conv_grad_input_kernel", conv_grad_input_args),
    "conv_grad_weight": ("masked_conv", "conv_grad_weight_kernel", conv_grad_weight_args),
    "linear_forward_interpolated": ("masked_matmul", "masked_bmm_kernel",
                                    lambda d, p: linear_forward_args(d, p, interpolate=True)),
    "conv_forward": ("masked_conv", "conv_forward_kernel", lambda d, p: conv_forward_args(d, p, interpolate=False)),
    "linear_forward": ("masked_matmul", "masked_bmm_kernel", lambda d, p: linear_forward_args(d, p, interpolate=False)),
    "linear_grad_input": ("masked_matmul", "masked_bmm_kernel", linear_grad_input_args),
    "linear_grad_weight": ("masked_matmul", "masked_bmm_kernel", linear_grad_weight_args),
}
DEFAULT_GEMM_KERNELS = list(GEMM_KERNELS)[:4]


def gpu_shapes(dtype_name: str) -> list:
    """The autotune candidates a launch of this dtype keeps on a GPU (see _config.prune_matmul_configs)."""
    return _config.FMA_SHAPES if dtype_name == "fp32-ieee" else _config.TENSOR_CORE_SHAPES


def _tile_size(shape):
    m, n, k, _, _ = shape
    return m * n * k


def _config_name(shape) -> str:
    return ",".join(str(v) for v in shape)


def one_shape(dtype_name: str) -> tuple:
    """The config FASTMASK_AUTOTUNE=one launches for this dtype (``make gpu-session``'s)."""
    return _config.ONE_FMA_SHAPE if dtype_name == "fp32-ieee" else _config.ONE_TENSOR_CORE_SHAPE


# The default run: the smallest and the largest tile of each dtype's list and the one that
# FASTMASK_AUTOTUNE=one launches, for each default kernel.
DEFAULT_GEMM_CASES = [
    pytest.param(name, shape, dtype_name, id=f"{name}-{_config_name(shape)}-{dtype_name}")
    for name in DEFAULT_GEMM_KERNELS for dtype_name in GEMM_DTYPES
    for shape in dict.fromkeys((min(gpu_shapes(dtype_name), key=_tile_size), max(gpu_shapes(dtype_name),
                                                                                 key=_tile_size),
                                one_shape(dtype_name)))
]


def sgd_args(momentum, nesterov, aligned):
    return dict(tensor_table="*i64", block_table="*i64", block_base=7, lr=0.05, weight_decay=5e-4, momentum=0.9,
                buf_decay=0.9, grad_scale=1.0, HAS_MOMENTUM=momentum, NESTEROV=nesterov, ALIGNED=aligned)


def adamw_args(aligned):
    return dict(tensor_table="*i64", block_table="*i64", block_base=7, weight_scale=0.99, lerp_weight=0.1,
                beta2=0.999, one_minus_beta2=0.001, bias_correction2_sqrt=0.3, eps=1e-8, neg_step_size=-1e-3,
                ALIGNED=aligned)


# name -> (kernel module, kernel, args, num_warps); the BLOCK constexprs are added from the modules.
ELEMENTWISE_KERNELS = {
    **{f"sgd_{name}_{'aligned' if aligned else 'unaligned'}": ("masked_optim", "_masked_sgd_kernel",
                                                              sgd_args(momentum, nesterov, aligned), 4)
       for name, momentum, nesterov in (("plain", False, False), ("momentum", True, False), ("nesterov", True, True))
       for aligned in (True, False)},
    **{f"adamw_{'aligned' if aligned else 'unaligned'}": ("masked_optim", "_masked_adamw_kernel",
                                                         adamw_args(aligned), 4)
       for aligned in (True, False)},
    **{f"rademacher_{dtype}_{'mask' if has_mask else 'dense'}": (
        "hutchinson", "rademacher_kernel",
        dict(out_ptr="*" + dtype, mask_ptr="*u8" if has_mask else "*" + dtype, seed=1234, first_probe=0,
             n=11_689_512, HAS_MASK=has_mask), 4)
       for dtype in ("fp32", "bf16") for has_mask in (True, False)},
    "welford_update": ("hutchinson", "welford_update_kernel",
                       dict(z_ptr="*fp32", hz_ptr="*fp32", mean_ptr="*fp32", m2_ptr="*fp32", new_mean_ptr="*fp32",
                            new_m2_ptr="*fp32", probe_sums_ptr="*fp32", n=11_689_512, num_probes=10,
                            weight_batch=0.5, weight_cross=5.0), 4),
}


# --------------------------------------------------------------------------------------------
# Compiling one kernel for sm_90 and reading its resources (in the worker: interpreter off).
# --------------------------------------------------------------------------------------------

@dataclass
class CompileReport:
    kernel: str
    config: str
    dtype: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    seconds: float

    def problems(self) -> list[str]:
        found = []
        if self.spill_stores or self.spill_loads:
            found.append(f"spills {self.spill_stores} B stored / {self.spill_loads} B loaded per thread")
        if self.registers > MAX_REGISTERS:
            found.append(f"{self.registers} registers > {MAX_REGISTERS}")
        if self.shared > SM90_MAX_SHARED_BYTES:
            found.append(f"{self.shared} B of shared memory > {SM90_MAX_SHARED_BYTES}")
        return found

    def row(self) -> str:
        return (f"| {self.kernel} | {self.config} | {self.dtype} | {self.registers} | "
                f"{self.spill_stores}/{self.spill_loads} | {self.shared} | {self.seconds:.1f} |")


TABLE_HEADER = ("| kernel | config (M,N,K,stages,warps) | dtype | regs | spill st/ld B | smem B | compile s |\n"
                "| --- | --- | --- | --- | --- | --- | --- |")


def specialize(fn, args: dict):
    """(signature, constexprs, attrs) for ``triton.compile``, the way the JIT specializes a launch:
    tensors are 16-byte aligned (the caching allocator's), an integer equal to 1 becomes a constant
    and one divisible by 16 carries that divisibility (unless the parameter is do_not_specialize)."""
    signature, constexprs, attrs = {}, {}, {}
    divisible = [["tt.divisibility", 16]]
    names = [param.name for param in fn.params]
    if set(names) != set(args):
        raise ValueError(f"{fn.__name__}: arguments {sorted(set(names) ^ set(args))} do not match its parameters")
    for i, param in enumerate(fn.params):
        value = args[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, str):
            signature[param.name], attrs[(i,)] = value, divisible
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        elif value == 1 and not param.do_not_specialize:
            signature[param.name], constexprs[param.name] = "constexpr", 1
        else:
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = divisible
    return signature, constexprs, attrs


def _ptxas_bytes(log: str, what: str) -> int:
    found = re.search(rf"(\d+) bytes {what}", log)
    return int(found.group(1)) if found else 0


def compile_for_sm90(kernel, args: dict, num_warps: int, num_stages: int, name: str, config: str,
                     dtype: str) -> CompileReport:
    """Compile ``kernel`` (a JITFunction, or an Autotuner around one) to a cubin for sm_90 and read
    its registers and spills from ptxas's report, its shared memory from triton's metadata."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):  # unwrap the Autotuner
        fn = fn.fn
    signature, constexprs, attrs = specialize(fn, args)
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas's report here
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget(*SM90),
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
    seconds = time.perf_counter() - start
    if not compiled.asm.get("cubin"):
        raise AssertionError(f"{name}: no cubin")
    if not re.search(r"^\.target\s+sm_90a?\b", compiled.asm["ptx"], re.M):
        raise AssertionError(f"{name}: the PTX is not for sm_90")
    ptxas_log = log.getvalue()
    registers = re.search(r"Used (\d+) registers", ptxas_log)
    if not registers:
        raise AssertionError(f"{name}: no ptxas report in the compiler's output:\n{ptxas_log}")
    return CompileReport(kernel=name, config=config, dtype=dtype, registers=int(registers.group(1)),
                         spill_stores=_ptxas_bytes(ptxas_log, "spill stores"),
                         spill_loads=_ptxas_bytes(ptxas_log, "spill loads"),
                         shared=compiled.metadata.shared, seconds=seconds)


def _kernel_modules():
    """The kernel modules, imported with the interpreter off (the worker's)."""
    import importlib

    assert not interpreter_on(), "the kernels must be imported with TRITON_INTERPRET off"
    return {name: importlib.import_module(f"fastmask.kernels.{name}")
            for name in ("masked_conv", "masked_matmul", "masked_optim", "hutchinson")}


def compile_gemm(modules, name: str, shape, dtype_name: str) -> CompileReport:
    module, kernel_name, make_args = GEMM_KERNELS[name]
    m, n, k, stages, warps = shape
    args = dict(make_args(*GEMM_DTYPES[dtype_name]), BLOCK_M=m, BLOCK_N=n, BLOCK_K=k)
    return compile_for_sm90(getattr(modules[module], kernel_name), args, warps, stages, name, _config_name(shape),
                            dtype_name)


def compile_elementwise(modules, name: str) -> CompileReport:
    module, kernel_name, args, warps = ELEMENTWISE_KERNELS[name]
    block = modules[module].block_size() if module == "masked_optim" else modules[module].BLOCK
    return compile_for_sm90(getattr(modules[module], kernel_name), dict(args, BLOCK=block), warps, 1, name,
                            f"BLOCK={block},-,{warps}", args.get("out_ptr", "*fp32")[1:])


def autotune_setup(modules) -> dict:
    """What the GPU autotuners hold: per GEMM kernel, its configs and the ones a launch of each dtype
    keeps after the early prune; the optimizer's block size."""
    import torch

    torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    setup = {"optimizer_block": modules["masked_optim"].block_size(), "kernels": {}}
    for module, kernel_name, _ in GEMM_KERNELS.values():
        kernel = getattr(modules[module], kernel_name)
        kept = {}
        for dtype_name, (dtype, precision) in GEMM_DTYPES.items():
            first_operand = {"a": torch.empty(0, dtype=torch_dtypes[dtype])}
            kept[dtype_name] = [_config._shape(c) for c in kernel.early_config_prune(kernel.configs, first_operand,
                                                                                    PRECISION=precision)]
        setup["kernels"][kernel_name] = {"configs": [_config._shape(c) for c in kernel.configs], "kept": kept}
    return setup


def full_sweep(modules):
    """Every GEMM kernel variant x every config its dtype keeps x dtype, then every elementwise kernel."""
    for name in GEMM_KERNELS:
        for dtype_name in GEMM_DTYPES:
            for shape in gpu_shapes(dtype_name):
                yield compile_gemm(modules, name, shape, dtype_name)
    for name in ELEMENTWISE_KERNELS:
        yield compile_elementwise(modules, name)


@contextlib.contextmanager
def compiler_environment():
    """A private triton cache, compiling every time (so ptxas runs and reports), ptxas's report printed."""
    with tempfile.TemporaryDirectory() as cache:
        os.environ.update(TRITON_CACHE_DIR=cache, TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1",
                          # triton 3.9 warns while this is unset; 1 is every version's default so far.
                          TRITON_DEFAULT_FP_FUSION="1")
        yield


def serve():
    """The worker: one JSON request per line on stdin, one JSON reply per line on the real stdout
    (file descriptor 1 itself is pointed at stderr, so nothing else can garble the replies)."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    with compiler_environment():
        modules = _kernel_modules()
        for line in sys.stdin:
            request = json.loads(line)
            try:
                if request["op"] == "setup":
                    reply = autotune_setup(modules)
                elif request["op"] == "gemm":
                    reply = asdict(compile_gemm(modules, request["name"], tuple(request["shape"]), request["dtype"]))
                else:
                    reply = asdict(compile_elementwise(modules, request["name"]))
            except Exception:  # the test shows it
                reply = {"error": traceback.format_exc()}
            replies.write(json.dumps(reply) + "\n")
            replies.flush()


# --------------------------------------------------------------------------------------------
# Tests (in the pytest process, interpreter on or off; compiling is the worker's)
# --------------------------------------------------------------------------------------------

class Worker:
    """The compiling process, started with TRITON_INTERPRET off."""

    def __init__(self):
        env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        self.process = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], WORKER_TIMEOUT_S)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the compile worker gave no reply to {request} (exit code {self.process.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            pytest.fail(f"{request}:\n{reply['error']}", pytrace=False)
        return reply

    def report(self, **request) -> CompileReport:
        return CompileReport(**self.ask(**request))

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def worker():
    started = Worker()
    yield started
    started.close()


def _check(report: CompileReport):
    problems = report.problems()
    assert not problems, f"{report.kernel} [{report.config}] {report.dtype}: " + "; ".join(problems)


def test_gpu_autotuners_keep_the_configs_of_each_dtype(worker):
    """On a GPU each GEMM kernel holds both config lists and a launch keeps its dtype's; the
    optimizer's block is the GPU one, not the interpreter's."""
    setup = worker.ask(op="setup")
    all_shapes = [list(shape) for shape in _config.TENSOR_CORE_SHAPES + _config.FMA_SHAPES]
    assert len({tuple(shape) for shape in all_shapes}) == len(all_shapes)
    for kernel_name, tuner in setup["kernels"].items():
        assert tuner["configs"] == all_shapes, kernel_name
        for dtype_name in GEMM_DTYPES:
            assert tuner["kept"][dtype_name] == [list(shape) for shape in gpu_shapes(dtype_name)], (kernel_name,
                                                                                                   dtype_name)
    assert setup["optimizer_block"] == 2048


def test_one_config_of_each_kind_is_a_checked_candidate():
    """FASTMASK_AUTOTUNE=one launches a config of the lists compiled here, each dtype its own kind's."""
    for dtype_name in GEMM_DTYPES:
        assert one_shape(dtype_name) in gpu_shapes(dtype_name), dtype_name


def test_specialize_as_the_jit_does():
    """Integers equal to 1 become constants, multiples of 16 carry divisibility, do_not_specialize
    parameters get neither, tensors are aligned; a misspelled argument is refused."""
    params = [SimpleNamespace(name=name, is_constexpr=name == "BLOCK", do_not_specialize=name == "base")
              for name in ("x_ptr", "one", "sixteen", "odd", "base", "big", "scale", "BLOCK")]
    fn = SimpleNamespace(__name__="kernel", params=params)
    args = dict(x_ptr="*bf16", one=1, sixteen=32, odd=17, base=16, big=2**33, scale=0.5, BLOCK=64)
    signature, constexprs, attrs = specialize(fn, args)
    assert signature == dict(x_ptr="*bf16", one="constexpr", sixteen="i32", odd="i32", base="i32", big="i64",
                             scale="fp32", BLOCK="constexpr")
    assert constexprs == dict(one=1, BLOCK=64)
    assert set(attrs) == {(0,), (2,), (5,)}
    with pytest.raises(ValueError, match="do not match"):
        specialize(fn, dict(args, blok=64))


@pytest.mark.parametrize("name, shape, dtype_name", DEFAULT_GEMM_CASES)
def test_gemm_kernel_compiles_for_sm90(worker, name, shape, dtype_name):
    _check(worker.report(op="gemm", name=name, shape=shape, dtype=dtype_name))


@pytest.mark.parametrize("name", list(ELEMENTWISE_KERNELS))
def test_elementwise_kernel_compiles_for_sm90(worker, name):
    _check(worker.report(op="elementwise", name=name))


@pytest.mark.slow
def test_every_config_compiles_for_sm90(worker):
    requests = [dict(op="gemm", name=name, shape=shape, dtype=dtype_name)
                for name in GEMM_KERNELS for dtype_name in GEMM_DTYPES for shape in gpu_shapes(dtype_name)]
    requests += [dict(op="elementwise", name=name) for name in ELEMENTWISE_KERNELS]
    reports = [worker.report(**request) for request in requests]
    problems = [f"{r.kernel} [{r.config}] {r.dtype}: " + "; ".join(r.problems()) for r in reports if r.problems()]
    # The table is shown only when a kernel fails (`python tests/test_cuda_compile.py` prints it on demand).
    assert not problems, "\n".join(problems) + "\n\n" + TABLE_HEADER + "\n" + "\n".join(r.row() for r in reports)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:  # the whole table, one row as each kernel compiles
        os.environ.pop("TRITON_INTERPRET", None)
        with compiler_environment():
            loaded = _kernel_modules()
            print(TABLE_HEADER)
            for result in full_sweep(loaded):
                print(result.row() + ("  <- " + "; ".join(result.problems()) if result.problems() else ""),
                      flush=True)
