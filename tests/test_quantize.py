"""Weight-only int8 on CPU (``quantize="int8"``): the kernel against the dequantized F.linear, the quantizer's
error bound, an int8 engine against the float32 one and against a float32 engine that holds the same dequantized
weights, adapters on it against PEFT, bad arguments, and the command-line flags.

Tolerances, measured on the default model (SmolLM2-135M-Instruct, float32 activations) with margin:

- int8 vs float32 weights is quantization error: max logit difference 1.93 on chat prompts (logits span about
  +-40), 2.06 with a random LoRA; asserted <= 3. Greedy replies agree token for token on the prompts below
  (7 to 40 tokens measured, the whole replies); other prompts diverge after 6 to 28 tokens at near ties.
- int8 vs a float32 engine or PEFT model whose projection weights are the dequantized int8 ones is float32
  rounding: 0 on the prefill path (the same GEMM), 5.3e-5 on the GEMV path, 7.6e-5 through PEFT; asserted
  <= 5e-4.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import alora
from alora_kernels import cpu_gemv
from peft_helpers import make_adapter, peft_logits

needs_kernel = pytest.mark.skipif(not cpu_gemv.available(torch.int8),
                                  reason="the int8 GEMV kernel does not run here (no AVX-512 or no compiler)")

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (1, 1), (5, 17), (37, 45), (7, 1000), (23, 8)]
ROWS = [1, 3, 8, 16, 17, 40]  # up to 16: the GEMV; more: dequantized tiles and a GEMM
QUANT_TOL = 3.0   # int8 vs float32 weights, logits
ROUND_TOL = 5e-4  # int8 vs the same dequantized weights in float32, logits
AGREEING_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Name a famous painter."]
INVOCATION_TEXT = "<|im_start|>judge\n"


def _inputs(M: int, N: int, K: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    q, scales = cpu_gemv.quantize_int8(torch.randn(N, K, generator=g) / K**0.5)
    b = torch.randn(N, generator=g) if bias else None
    return x, q, scales, b


def _dequantize_projections(engine: alora.Engine) -> None:
    """Give a float32 engine's projections and LM head the dequantized int8 weights an int8 engine computes
    with (the head untied from the embedding table, which stays float32 in both)."""
    model = engine.model
    for module in model.projections().values():
        module.weight.data = cpu_gemv.dequantize_int8(*cpu_gemv.quantize_int8(module.weight))
    model.lm_head_weight = torch.nn.Parameter(cpu_gemv.dequantize_int8(*cpu_gemv.quantize_int8(model.lm_head_weight)),
                                              requires_grad=False)


# ---- quantizer and kernel ----------------------------------------------------------------------------------

def test_quantize_round_trip_is_within_half_a_step():
    W = torch.randn(300, 257) * torch.logspace(-3, 1, 300).unsqueeze(1)  # rows of very different ranges
    W[7] = 0
    q, scales = cpu_gemv.quantize_int8(W)
    assert q.dtype == torch.int8 and q.shape == W.shape and q.is_contiguous()
    assert scales.dtype == torch.float32 and scales.shape == (300,)
    assert q.abs().max() <= 127 and (q.abs().amax(1)[scales > 0] == 127).all()  # each row uses its full range
    assert scales[7] == 0 and (q[7] == 0).all()
    err = (W - cpu_gemv.dequantize_int8(q, scales)).abs()
    assert (err <= scales.unsqueeze(1) / 2 * (1 + 1e-5)).all()


@needs_kernel
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("N,K", SHAPES)
def test_kernel_matches_the_dequantized_f_linear(N, K, bias):
    for M in ROWS:
        x, q, scales, b = _inputs(M, N, K, bias, seed=M)
        y = cpu_gemv.linear_int8(x, q, scales, b)
        assert y.shape == (M, N) and y.dtype == torch.float32
        W = cpu_gemv.dequantize_int8(q, scales).double()
        ref = F.linear(x.double(), W, None if b is None else b.double())
        mag = F.linear(x.double().abs(), W.abs(), None if b is None else b.double().abs())
        # float32 sums of K products, the scale and the bias: a few more roundings than K
        assert ((y.double() - ref).abs() <= (K + 3) * 2.0**-24 * mag).all(), (M, N, K)


@needs_kernel
def test_bfloat16_activations_and_batch_independent_rows():
    x, q, scales, b = _inputs(16, 960, 576, bias=True)
    full = cpu_gemv.linear_int8(x, q, scales, b)
    for M in (1, 5, 8):  # a row's result does not depend on the other rows of its batch
        assert torch.equal(cpu_gemv.linear_int8(x[:M], q, scales, b), full[:M])
    for M in (3, 20):
        xb, bb = x[:M].bfloat16(), b.bfloat16()
        y = cpu_gemv.linear_int8(xb, q, scales, bb)
        ref = F.linear(xb.float(), cpu_gemv.dequantize_int8(q, scales), bb.float())
        assert y.dtype == torch.bfloat16  # computed in float32, rounded once: at most one bf16 step off
        assert ((y.float() - ref).abs() <= 2.0**-7 * ref.abs() + 1e-4).all()


@needs_kernel
def test_kernel_refuses_bad_operands():
    x, q, scales, _ = _inputs(2, 8, 16, bias=False)
    for args, match in [((x[:, :15], q, scales), "x must be"), ((x, q.float(), scales), "qweight must be"),
                        ((x, q, scales[:7]), "scales must be"), ((x, q.t(), scales), "qweight must be")]:
        with pytest.raises(RuntimeError, match=match):
            cpu_gemv.linear_int8(*args)


def test_without_the_extension_linear_int8_is_the_dequantized_f_linear(tmp_path):
    """A real failed build (a compiler that does not exist, an empty cache folder), in a fresh process."""
    code = ("import warnings, torch, torch.nn.functional as F\n"
            "from alora_kernels import cpu_gemv\n"
            "warnings.simplefilter('ignore')\n"
            "x, b = torch.randn(3, 40), torch.randn(24)\n"
            "q, s = cpu_gemv.quantize_int8(torch.randn(24, 40))\n"
            "y = cpu_gemv.linear_int8(x, q, s, b)\n"
            "assert not cpu_gemv.available(torch.int8)\n"
            "assert torch.equal(y, F.linear(x, cpu_gemv.dequantize_int8(q, s), b))\n"
            "yb = cpu_gemv.linear_int8(x.bfloat16(), q, s, b.bfloat16())\n"
            "assert yb.dtype == torch.bfloat16\n")
    env = {**os.environ, "ALORA_CACHE": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_add_lora_is_the_torch_paths_adapter_update():
    """What an int8 layer adds to its base: exactly what mixed_lora_linear's torch path adds to its own."""
    from alora_kernels import add_lora, mixed_lora_linear

    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(7, 48, generator=g), torch.randn(40, 48, generator=g), torch.randn(40, generator=g)
    A, B = torch.randn(3, 4, 48, generator=g), torch.randn(3, 40, 4, generator=g)
    scale = torch.tensor([0.5, 2.0, 1.0])
    slot = torch.tensor([-1, 2, 2, 0, -1, 2, 1], dtype=torch.int32)  # slot 2 in two runs: gathered
    expected = mixed_lora_linear(x, W, b, A, B, scale, slot, backend="torch")
    assert torch.equal(add_lora(cpu_gemv.linear(x, W, b), x, A, B, scale, slot), expected)
    with pytest.raises(ValueError, match="y \\[T, N\\]"):
        add_lora(torch.zeros(6, 40), x, A, B, scale, slot)
    with pytest.raises(ValueError, match="slot 3 out of range"):
        add_lora(F.linear(x, W, b), x, A, B, scale, slot, runs={3: [(0, 1)]})


# ---- the int8 engine ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def int8_engine(default_dir):
    return alora.Engine.from_pretrained(default_dir, device="cpu", dtype="float32", quantize="int8")


@pytest.fixture(scope="module")
def dequantized_engine(default_dir):
    """A float32 engine computing with the int8 engine's weights, dequantized."""
    eng = alora.Engine.from_pretrained(default_dir, device="cpu", dtype="float32")
    _dequantize_projections(eng)
    return eng


@pytest.fixture()
def fresh(int8_engine, dequantized_engine):
    yield int8_engine, dequantized_engine
    for eng in (int8_engine, dequantized_engine):
        for name in list(eng.adapters):
            eng.unload_adapter(name)


def _prompt(engine, text: str) -> list[int]:
    return list(engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                     add_generation_prompt=True, return_dict=True)["input_ids"])


def test_projections_hold_int8_and_the_rest_keeps_the_dtype(int8_engine):
    model = int8_engine.model
    for name, module in model.projections().items():
        assert module.weight is None and module.qweight.dtype == torch.int8, name
        assert module.scales.dtype == torch.float32 and module.scales.shape == (module.out_features,)
    assert model.lm_head_qweight.dtype == torch.int8 and model.lm_head_scales.shape == (model.config.vocab_size,)
    assert model.embed_tokens.weight.dtype == model.lm_head_weight.dtype == torch.float32  # the tied table
    assert int8_engine.dtype == torch.float32


def test_int8_engine_computes_with_its_dequantized_weights(int8_engine, dequantized_engine):
    """Prefill (a GEMM on dequantized tiles) and a short prompt (the GEMV) both: float32 rounding only."""
    long_ids = _prompt(int8_engine, "Tell me about the sea.")
    short_ids = long_ids[-9:]
    assert len(long_ids) > cpu_gemv.MAX_ROWS >= len(short_ids)
    for ids in (long_ids, short_ids):
        diff = (int8_engine.forward_logits(ids) - dequantized_engine.forward_logits(ids)).abs().max().item()
        assert diff <= ROUND_TOL, len(ids)


def test_int8_engine_is_close_to_float32_and_greedy_replies_agree(int8_engine, engine):
    for text in AGREEING_PROMPTS:
        ids = _prompt(engine, text)
        assert (int8_engine.forward_logits(ids) - engine.forward_logits(ids)).abs().max().item() <= QUANT_TOL
        ours = "".join(int8_engine.conversation().send(text, max_new_tokens=16, temperature=0.0))
        theirs = "".join(engine.conversation().send(text, max_new_tokens=16, temperature=0.0))
        assert ours == theirs, text


@pytest.mark.parametrize("kind", ["alora", "lora"])
def test_adapters_on_int8_match_peft(kind, fresh, default_dir, tmp_path):
    """Against PEFT on the float32 model (quantization error) and on the same model with dequantized
    weights (float32 rounding); an aLoRA leaves the tokens before its invocation exactly base."""
    int8_engine, dequantized_engine = fresh
    tok = int8_engine.tokenizer
    inv = tok(INVOCATION_TEXT, add_special_tokens=False)["input_ids"]
    config = dict(invocation=inv) if kind == "alora" else dict(target_modules=["q_proj", "v_proj", "gate_proj",
                                                                               "down_proj"])
    peft_model = make_adapter(default_dir, tmp_path, seed=3, **config)
    int8_engine.load_adapter(kind, tmp_path)
    msgs = [{"role": "user", "content": "Is the Earth round?"}, {"role": "assistant", "content": "Yes, roughly."}]
    history = list(tok.apply_chat_template(msgs, tokenize=True)["input_ids"])
    ids = history + inv + tok("Yes", add_special_tokens=False)["input_ids"]
    ours, base = int8_engine.forward_logits(ids, adapter=kind), int8_engine.forward_logits(ids)
    assert (ours - base).abs().max().item() > 1e-2  # the adapter changed something
    assert (ours - peft_logits(peft_model, ids)).abs().max().item() <= QUANT_TOL
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name and "lora_" not in name:
                module.weight.copy_(cpu_gemv.dequantize_int8(*cpu_gemv.quantize_int8(module.weight)))
        head = peft_model.get_output_embeddings()  # untied from the embedding table, as in _dequantize_projections
        head.weight = torch.nn.Parameter(cpu_gemv.dequantize_int8(*cpu_gemv.quantize_int8(head.weight)))
    assert (ours - peft_logits(peft_model, ids)).abs().max().item() <= ROUND_TOL
    if kind == "alora":
        assert torch.equal(ours[:len(history)], base[:len(history)])
        # decode with the adapter (one row per step: the GEMV plus the adapter's delta)
        dequantized_engine.load_adapter(kind, tmp_path)
        outputs = ["".join(eng.conversation(messages=msgs).invoke(kind, max_new_tokens=12))
                   for eng in (int8_engine, dequantized_engine)]
        assert outputs[0] == outputs[1] and outputs[0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(quantize="int4"), r"quantize must be None or one of \['int8'\], got 'int4'"),
    (dict(quantize="int8", device="cuda"), "runs on CPU only"),
])
def test_bad_quantize_arguments_raise_clear_errors(kwargs, match, default_dir):
    with pytest.raises(alora.QuantizationError, match=match) as info:
        alora.Engine.from_pretrained(default_dir, **kwargs)
    assert isinstance(info.value, alora.AloraError) and isinstance(info.value, ValueError)


# ---- command line -----------------------------------------------------------------------------------------

def test_cli_flags_parse_and_are_documented():
    from alora.cli import QUANTIZE_MODES, build_parser
    from alora.models import QUANTIZE_MODES as MODEL_MODES

    assert QUANTIZE_MODES == MODEL_MODES
    parser = build_parser()
    for command in ("chat", "ui", "serve"):
        args = parser.parse_args([command, "--quantize", "int8", "--dtype", "bfloat16"])
        assert (args.quantize, args.dtype) == ("int8", "bfloat16"), command
        assert parser.parse_args([command]).quantize is None
        out = subprocess.run([sys.executable, "-m", "alora.cli", command, "--help"], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and "--quantize {int8}" in out.stdout and "weight-only int8" in out.stdout
    with pytest.raises(SystemExit):
        parser.parse_args(["chat", "--quantize", "int4"])


def test_ray_replicas_get_dtype_and_quantize():
    pytest.importorskip("ray", reason="the Ray Serve app needs the 'ray' extra")
    from alora.serve import ray_app

    app = ray_app.app_builder({"quantize": "int8", "dtype": "bfloat16"})
    spec = app._bound_deployment.init_args[0]._bound_deployment.init_args[0]
    assert (spec.quantize, spec.dtype) == ("int8", "bfloat16")
