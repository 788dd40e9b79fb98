"""train_gpt.py on CPU: the model, the data loader,
the training loop, checkpoints, resume, DDP and errors."""

import copy
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt
from prepare import sha256_of
from train_gpt import GPT, GPTConfig, ShardLoader, TorchOps, TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_gpt.py")

# A small model and batch that run a training step on CPU in well under a second.
SMALL = [
    "--model",
    "tiny",
    "--n_embd",
    "32",
    "--n_head",
    "2",
    "--device",
    "cpu",
    "--batch_size",
    "2",
    "--block_size",
    "32",
    "--total_batch_size",
    "128",
    "--val_steps",
    "1",
    "--hellaswag_every",
    "0",
    "--sample_every",
    "0",
    "--warmup_steps",
    "2",
    "--max_lr",
    "1e-3",
]


def make_shards(folder, n_train=2, train_tokens=6000, val_tokens=3000, seed=0):
    """A val shard and n_train train shards of a repeating random pattern (learnable, like text)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, 50257, 700)
    np.save(
        os.path.join(folder, "tok_val_000000.npy"), np.resize(pattern, val_tokens).astype(np.uint16)
    )
    for i in range(1, n_train + 1):
        tokens = np.resize(np.roll(pattern, 37 * i), train_tokens).astype(np.uint16)
        np.save(os.path.join(folder, f"tok_train_{i:06d}.npy"), tokens)
    return str(folder)


def read_log(log_dir, stream=None):
    with open(os.path.join(log_dir, "log.txt")) as f:
        lines = [line.split() for line in f if line.strip()]
    return [(int(s), k, v) for s, k, v in lines if stream is None or k == stream]


def run_script(args, env=None, timeout=300, launcher=None):
    cmd = (launcher or [sys.executable]) + [SCRIPT] + args
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def start_script(args, launcher=None, output=subprocess.PIPE):
    """train_gpt.py started in the background, as run_script runs it."""
    cmd = (launcher or [sys.executable]) + [SCRIPT] + args
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=output, stderr=output, text=True, env=env)


def wait_for_steps(log_dir, steps, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(os.path.join(log_dir, "log.txt")):
            if len(read_log(log_dir, "train")) >= steps:
                return
        time.sleep(0.05)
    raise AssertionError(f"{log_dir} did not reach {steps} steps")


@pytest.fixture
def data_dir(tmp_path):
    return make_shards(tmp_path / "data")


# -----------------------------------------------------------------------------
# model


def test_d12_parameter_count():
    model = GPT(GPTConfig(vocab_size=50257))
    assert model.num_params() == 124_439_808
    assert model.lm_head.weight is model.transformer.wte.weight


def test_presets_and_shapes():
    for name, expect in [("d24", (24, 16, 1024)), ("d36", (36, 20, 1280)), ("d48", (48, 25, 1600))]:
        mc = train_gpt.model_config(TrainConfig(model=name))
        assert (mc.n_layer, mc.n_head, mc.n_embd, mc.block_size, mc.vocab_size) == (
            *expect,
            1024,
            50304,
        )
    mc = train_gpt.model_config(TrainConfig(model="tiny", n_layer=3, block_size=16))
    assert (mc.n_layer, mc.block_size) == (3, 16)
    torch.manual_seed(0)
    model = GPT(mc)
    idx = torch.randint(0, 50257, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 50304) and loss is None
    logits, loss = model(idx, torch.randint(0, 50257, (3, 16)))
    assert loss.shape == () and abs(loss.item() - math.log(50304)) < 0.5  # near-uniform at init
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_init_statistics():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, vocab_size=50304, block_size=64))
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 1e-3
    scaled = 0.02 * (2 * 8) ** -0.5
    assert abs(model.transformer.h[0].attn.c_proj.weight.std().item() - scaled) < 5e-4
    assert abs(model.transformer.h[0].mlp.c_proj.weight.std().item() - scaled) < 5e-4
    assert model.transformer.h[0].mlp.c_fc.bias.abs().max().item() == 0


def randomized_hf_model(tmp_path, **overrides):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, **overrides)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with (
        torch.no_grad()
    ):  # every weight random, biases and LayerNorm gains included, so nothing hides
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 and p.numel() == 64 else 0.0))
    hf.save_pretrained(tmp_path)
    return hf


def test_logits_match_transformers(tmp_path):
    hf = randomized_hf_model(tmp_path)
    model = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 50257, (2, 100))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4


def test_from_pretrained_bin_and_hub_layout(tmp_path):
    hf = randomized_hf_model(tmp_path / "a")
    # the layout of OpenAI's checkpoint on the hub: no "transformer." prefix, the causal-mask
    # buffers, no lm_head (tied), pytorch_model.bin instead of safetensors
    sd = {
        k.removeprefix("transformer."): v
        for k, v in hf.state_dict().items()
        if k != "lm_head.weight"
    }
    sd["h.0.attn.bias"] = torch.ones(1, 1, 128, 128)
    os.makedirs(tmp_path / "b")
    torch.save(sd, tmp_path / "b" / "pytorch_model.bin")
    with open(tmp_path / "a" / "config.json") as f:
        config = json.load(f)
    with open(tmp_path / "b" / "config.json", "w") as f:
        json.dump(config, f)
    model = GPT.from_pretrained(str(tmp_path / "b")).eval()
    idx = torch.randint(0, 50257, (1, 50))
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(train_gpt.UserError, match="neither a folder nor one of"):
        GPT.from_pretrained("gpt5")
    with pytest.raises(
        train_gpt.UserError, match="is not a Hugging Face GPT-2 folder .*config.json"
    ):
        GPT.from_pretrained(str(tmp_path))
    with open(tmp_path / "config.json", "w") as f:
        json.dump(
            {"n_layer": 1, "n_head": 1, "n_embd": 8, "vocab_size": 50257, "n_positions": 8}, f
        )
    with pytest.raises(
        train_gpt.UserError, match="is not a Hugging Face GPT-2 folder .*pytorch_model.bin"
    ):
        GPT.from_pretrained(str(tmp_path))
    torch.save({"wte.weight": torch.zeros(50257, 8)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(train_gpt.UserError, match="do not fit a GPT-2 model: .*Missing key"):
        GPT.from_pretrained(str(tmp_path))


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=4, n_embd=128))
    x = torch.randint(0, 50257, (2, 33))
    optimizer = model.configure_optimizer(0.0, 3e-3, "cpu")
    for _ in range(100):
        _, loss = model(x[:, :-1], x[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_weight_decay_groups():
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))
    optimizer = model.configure_optimizer(0.1, 1e-3, "cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(
        p.dim() == 1 for p in no_decay["params"]
    )
    ids = {id(p) for p in decay["params"]} | {id(p) for p in no_decay["params"]}
    assert ids == {
        id(p) for p in model.parameters()
    }  # every parameter exactly once (wte/lm_head tied)
    assert len(decay["params"]) == 2 + 2 * 4  # wte, wpe, and per block c_attn, c_proj, c_fc, c_proj
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))
    assert model.configure_optimizers(TrainConfig(), "cpu")[1] is None  # adamw: AdamW alone
    adamw, muon = model.configure_optimizers(TrainConfig(optimizer="muon"), "cpu")
    in_muon = muon.param_groups[0]["params"]
    in_adamw = [p for group in adamw.param_groups for p in group["params"]]
    ids = sorted(id(p) for p in in_muon + in_adamw)
    assert ids == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    matrices = [p for p in model.transformer.h.parameters() if p.dim() == 2]
    assert [id(p) for p in in_muon] == [id(p) for p in matrices] and len(matrices) == 2 * 4
    decay, no_decay = adamw.param_groups  # no 2-D block matrix left: the embeddings, then 1-D
    embeddings = [model.transformer.wte.weight, model.transformer.wpe.weight]  # wte is the head
    assert [id(p) for p in decay["params"]] == [id(p) for p in embeddings]
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert adamw.defaults["lr"] == 6e-4 and adamw.defaults["betas"] == (0.9, 0.95)
    group = muon.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.01, 0.95, True)
    assert group["weight_decay"] == 0.1 and group["adjust_lr_fn"] == "match_rms_adamw"


def test_learning_rate_schedule():
    cfg = TrainConfig(max_lr=6e-4, min_lr=6e-5, warmup_steps=10, max_steps=110)

    def lr(step):
        return train_gpt.learning_rate(step, cfg)

    assert lr(0) == pytest.approx(6e-5)  # (0 + 1) / 10 of the peak
    assert lr(4) == pytest.approx(3e-4)
    assert lr(9) == pytest.approx(6e-4)
    assert lr(10) == pytest.approx(6e-4)
    assert lr(60) == pytest.approx(6e-5 + 0.5 * (6e-4 - 6e-5))  # half-way through the cosine
    assert lr(110) == pytest.approx(6e-5)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 110))


def test_torch_ops_match_plain_pytorch():
    torch.manual_seed(0)
    ops, B, T, H, D = TorchOps(), 2, 7, 3, 8
    qkv = torch.randn(B, T, 3 * H * D)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
    att = (q @ k.transpose(-2, -1)) / math.sqrt(D)
    att = att.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)
    expected = (att @ v).transpose(1, 2).reshape(B, T, H * D)
    torch.testing.assert_close(ops.attention(qkv, H), expected, atol=1e-6, rtol=1e-5)
    x = torch.randn(4, 8)
    tanh_gelu = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    fc = torch.nn.Linear(8, 8)
    torch.testing.assert_close(F.gelu(x, approximate="tanh"), tanh_gelu, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ops.linear_gelu(x, fc), F.gelu(fc(x), approximate="tanh"))
    ln = torch.nn.LayerNorm(8)
    r, h = ops.add_layer_norm(x, x, ln)
    torch.testing.assert_close(r, 2 * x)
    torch.testing.assert_close(h, ln(2 * x))


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 48, 97, 4096])
def test_chunked_loss_equals_cross_entropy(arcana, padding, chunk_rows):
    import csrc

    torch.manual_seed(chunk_rows)
    h = torch.randn(4, 50, 32, requires_grad=True)
    weight = (torch.randn(3000, 32) * 0.5).requires_grad_()
    targets = torch.randint(0, 3000, (4, 50))
    if padding:
        targets[0, :7] = -1
        targets[3, -11:] = -1
    expected = F.cross_entropy((h @ weight.t()).view(-1, 3000), targets.view(-1), ignore_index=-1)
    expected_grads = torch.autograd.grad(expected, (h, weight))
    loss = csrc.chunked_lm_head_loss(h, weight, targets, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(loss, (h, weight))
    assert abs(loss.item() - expected.item()) <= 1e-6 * abs(expected.item())
    for g, e in zip(grads, expected_grads):
        assert (g - e).abs().max().item() < 1e-6
    with torch.no_grad():  # evaluation: no gradient work, same loss
        assert (
            csrc.chunked_lm_head_loss(h, weight, targets, chunk_rows=chunk_rows).item()
            == loss.item()
        )


def test_chunked_loss_op_registration(arcana):
    import csrc

    torch.manual_seed(0)
    h = torch.randn(2, 9, 8, requires_grad=True)
    weight = torch.randn(100, 8, requires_grad=True)
    targets = torch.randint(0, 100, (2, 9))
    targets[1, 2] = -1
    torch.library.opcheck(csrc.lm_head_loss_op, (h, weight, targets, 5, True, False))
    torch.library.opcheck(
        csrc.lm_head_loss_op, (h.detach(), weight.detach(), targets, 5, False, False)
    )


def test_model_with_chunked_loss_trains_like_torch_path(arcana):
    import csrc

    class ChunkedOps(TorchOps):
        def lm_head_loss(self, h, weight, targets):
            return None, csrc.chunked_lm_head_loss(h, weight, targets, chunk_rows=40)

    torch.manual_seed(0)
    reference = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
    chunked = GPT(reference.config, ChunkedOps())
    chunked.load_state_dict(reference.state_dict())
    x, y = torch.randint(0, 50257, (3, 32)), torch.randint(0, 50257, (3, 32))
    logits, loss_ref = reference(x, y)
    none, loss = chunked(x, y)
    assert logits.shape == (3, 32, 50304) and none is None
    assert abs(loss.item() - loss_ref.item()) <= 1e-6 * loss_ref.item()
    loss_ref.backward()
    loss.backward()
    for (name, a), b in zip(reference.named_parameters(), chunked.parameters()):
        assert (a.grad - b.grad).abs().max().item() < 1e-6, name
    compiled = torch.compile(chunked, fullgraph=True)
    assert abs(compiled(x, y)[1].item() - loss_ref.item()) <= 1e-5 * loss_ref.item()


def test_kernels_cuda_without_gpu_is_refused():
    with pytest.raises(train_gpt.UserError, match="--kernels cuda needs a CUDA device"):
        train_gpt.select_ops("cuda", "cpu")
    assert train_gpt.select_ops("auto", "cpu").name == "torch"
    assert train_gpt.select_ops("torch", "cuda").name == "torch"


# -----------------------------------------------------------------------------
# data


def arange_shards(folder, lengths):
    """Train shards of consecutive token ids, shard i starting at 1000 * i:
    a row is known by its first token."""
    os.makedirs(folder, exist_ok=True)
    for i, n in enumerate(lengths):
        np.save(folder / f"a_train_{i:06d}.npy", np.arange(1000 * i, 1000 * i + n, dtype=np.uint16))
    return train_gpt.find_shards(str(folder), "train")


def stream_starts(lengths, T, orders):
    """The first tokens of the stream's rows, by the rule written out: (n - 1) // T rows of T + 1
    tokens per shard, row k at token k * T, shards in each epoch's order."""
    return [
        1000 * i + k * T for order in orders for i in order for k in range((lengths[i] - 1) // T)
    ]


def read_steps(shards, B, T, W, steps, rows_per_step, state=None, **kwargs):
    """The first tokens of the rows each step reads, W processes of micro-batch B, in
    (micro-step, rank) order."""
    loaders = [ShardLoader(shards, B, T, rank, W, **kwargs) for rank in range(W)]
    for loader in loaders:
        loader.load_state_dict(state or loader.state_dict())
    out = []
    for _ in range(steps):
        step = []
        for _ in range(rows_per_step // (B * W)):
            for x, y in [loader.next_batch() for loader in loaders]:
                assert x.shape == y.shape == (B, T)
                assert torch.equal(x, x[:, :1] + torch.arange(T)) and torch.equal(y, x + 1)
                step += x[:, 0].tolist()
        out.append(step)
    assert all(loader.state_dict() == loaders[0].state_dict() for loader in loaders)
    return out, loaders[0].state_dict()


def test_loader_ranks_read_disjoint_rows_and_wrap(tmp_path):
    shards = arange_shards(tmp_path / "d", [1000, 500])  # 99 rows of 10 (+1) tokens, then 49
    B, T, W = 2, 10, 3
    assert ShardLoader(shards, B, T, 0, W).state_dict() == {"epoch": 0, "index": 0, "row": 0}
    loaders = [ShardLoader(shards, B, T, rank, W) for rank in range(W)]
    starts = stream_starts([1000, 500], T, [[0, 1]] * 2)
    for m in range(30):  # 180 rows: through both shards (148 rows) and on into the second epoch
        for rank, loader in enumerate(loaders):
            x, y = loader.next_batch()
            assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the next tokens
            first = (m * W + rank) * B  # rank r reads the B rows at r * B of the micro-step's B * W
            assert x[:, 0].tolist() == starts[first : first + B]
            assert torch.equal(x, x[:, :1] + torch.arange(T)) and torch.equal(y, x + 1)
    # micro-step 16 reads rows 96..101:
    # rank 1's batch is the last row of shard 1 and the first of shard 2
    assert starts[98:100] == [980, 1000] and starts[148] == 0
    assert loaders[0].state_dict() == {"epoch": 1, "index": 0, "row": 180 - 148}
    assert ShardLoader(shards, B, T).capacity == (99 + 49) * T


def test_loader_reads_the_same_rows_per_step_for_any_process_count(tmp_path):
    # shards smaller than a step of 16 rows of 8 tokens,
    # one of exactly one row, one too short for any
    lengths = [40, 9, 150, 5, 77, 100, 41]
    shards = arange_shards(tmp_path / "d", lengths)
    T, R, steps = 8, 16, 12  # 49 rows per pass: the 12 steps wrap around 3.9 times, mid-step
    for shuffle in (False, True):
        loader = ShardLoader(shards, 1, T, shuffle=shuffle, seed=3)
        starts = stream_starts(lengths, T, [loader.order(e) for e in range(6)])
        want = [starts[s * R : (s + 1) * R] for s in range(steps)]
        for W, B in [(1, 16), (1, 1), (1, 4), (2, 8), (2, 1), (2, 4), (4, 4), (4, 2), (4, 1)]:
            got, _ = read_steps(shards, B, T, W, steps, R, shuffle=shuffle, seed=3)
            assert got == want, (W, B, shuffle)


def test_loader_state_continues_at_another_process_count(tmp_path):
    lengths = [40, 150, 77, 100, 33]
    shards = arange_shards(tmp_path / "d", lengths)
    T, R = 8, 16
    want, _ = read_steps(shards, 16, T, 1, 9, R, shuffle=True, seed=1)
    for (W1, B1), (W2, B2) in [((2, 2), (4, 1)), ((4, 4), (1, 2)), ((1, 16), (2, 8))]:
        first, state = read_steps(shards, B1, T, W1, 4, R, shuffle=True, seed=1)
        saved = copy.deepcopy(state)
        rest, _ = read_steps(shards, B2, T, W2, 5, R, saved, shuffle=True, seed=1)
        assert first + rest == want, (W1, B1, W2, B2)
    # an older checkpoint's token offset (a multiple of T) continues at the same row
    old = {"epoch": 0, "index": 1, "pos": 3 * T}
    assert (
        read_steps(shards, 2, T, 2, 1, R, old)[0]
        == read_steps(shards, 2, T, 2, 1, R, {"epoch": 0, "index": 1, "row": 3})[0]
    )
    assert read_steps(shards, 2, T, 2, 1, R, old)[0][0][0] == 1000 + 3 * T


def test_loader_state_round_trip_and_shuffle(tmp_path):
    folder = tmp_path / "d"
    os.makedirs(folder)
    for i in range(4):
        np.save(
            folder / f"a_train_{i:06d}.npy", np.arange(i * 1000, i * 1000 + 500, dtype=np.uint16)
        )
    shards = train_gpt.find_shards(str(folder), "train")
    a = ShardLoader(shards, 2, 8, shuffle=True, seed=5)
    for _ in range(37):
        a.next_batch()
    b = ShardLoader(shards, 2, 8, shuffle=True, seed=5)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for _ in range(150):  # 300 rows: on through the 248 of a pass, into the next epoch's order
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    orders = [ShardLoader(shards, 2, 8, shuffle=True, seed=5).order(e) for e in range(3)]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders) and len({tuple(o) for o in orders}) > 1
    assert (
        ShardLoader(shards, 2, 8, shuffle=True, seed=6).order(0) != orders[0]
        or ShardLoader(shards, 2, 8, shuffle=True, seed=6).order(1) != orders[1]
    )


def test_loader_errors(tmp_path):
    for folder in (tmp_path / "missing", tmp_path):
        with pytest.raises(
            train_gpt.UserError, match="has no \\*_train_\\*.npy shards; run `python prepare.py"
        ):
            train_gpt.find_shards(str(folder), "train")
    np.save(tmp_path / "x_train_000001.npy", np.zeros(8, dtype=np.uint16))
    with pytest.raises(train_gpt.UserError, match="shorter than one row of block_size \\+ 1 = 9"):
        ShardLoader(train_gpt.find_shards(str(tmp_path), "train"), 2, 8)
    # a state past the shards, or past the rows of its shard:
    # another --data_dir than the checkpoint's
    np.save(tmp_path / "x_train_000001.npy", np.zeros(81, dtype=np.uint16))  # 10 rows
    loader = ShardLoader(train_gpt.find_shards(str(tmp_path), "train"), 2, 8)
    for state in ({"epoch": 0, "index": 1, "row": 0}, {"epoch": 0, "index": 0, "row": 11}):
        with pytest.raises(train_gpt.UserError, match="resume with the --data_dir it was trained"):
            loader.load_state_dict(state)
    # ids GPT-2's tokenizer cannot produce, deep in a shard:
    # found at start, with the shard and the offset
    for name, dtype, bad in [
        ("x_train_000002.npy", np.uint16, 50257),
        ("x_train_000003.npy", np.int32, -3),
    ]:
        tokens = np.zeros(5000, dtype=dtype)
        tokens[4321] = bad
        np.save(tmp_path / name, tokens)
        with pytest.raises(
            train_gpt.UserError, match=f"{name} holds token id {bad} at offset 4321"
        ):
            ShardLoader([str(tmp_path / name)], 2, 8)


def test_corrupt_shard_is_named(tmp_path):
    good = tmp_path / "x_train_000001.npy"
    np.save(good, np.arange(5000, dtype=np.uint16))
    data = good.read_bytes()
    bad = tmp_path / "x_train_000002.npy"
    bad.write_bytes(data[: len(data) // 2])  # truncated mid-array
    with pytest.raises(train_gpt.UserError, match="x_train_000002.npy is corrupt or truncated"):
        ShardLoader(train_gpt.find_shards(str(tmp_path), "train"), 2, 8)
    bad.write_bytes(b"not a numpy file at all")
    with pytest.raises(train_gpt.UserError, match="x_train_000002.npy is corrupt or truncated"):
        ShardLoader(train_gpt.find_shards(str(tmp_path), "train"), 2, 8)


# -----------------------------------------------------------------------------
# training loop


def test_accumulation_equals_larger_batch(data_dir):
    torch.manual_seed(0)
    model_a = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
    model_b = copy.deepcopy(model_a)
    shards = train_gpt.find_shards(data_dir, "train")
    amp = train_gpt.autocast_context("cpu", torch.float32)
    loss_a = train_gpt.forward_backward(model_a, None, ShardLoader(shards, 4, 32), 1, "cpu", amp)
    loss_b = train_gpt.forward_backward(model_b, None, ShardLoader(shards, 2, 32), 2, "cpu", amp)
    assert abs(loss_a.item() - loss_b.item()) < 1e-6
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert (pa.grad - pb.grad).abs().max().item() < 1e-6, name


def test_training_run_logs_and_checkpoints(data_dir, tmp_path):
    log_dir = str(tmp_path / "log")
    code = train_gpt.main(
        SMALL
        + [
            "--data_dir",
            data_dir,
            "--log_dir",
            log_dir,
            "--max_steps",
            "6",
            "--val_every",
            "3",
            "--checkpoint_every",
            "2",
            "--keep_checkpoints",
            "2",
        ]
    )
    assert code == 0
    log = read_log(log_dir)
    assert [s for s, k, _ in log if k == "train"] == list(range(6))
    assert [s for s, k, _ in log if k == "val"] == [
        0,
        3,
        6,
    ]  # before training, after 3 and after 6 steps
    assert all(len(v.split(".")[1]) == (6 if k == "train" else 4) for _, k, v in log)
    train_losses = [float(v) for _, k, v in log if k == "train"]
    assert train_losses[-1] < train_losses[0]
    assert sorted(os.listdir(log_dir)) == [
        ".train_gpt.lock",
        "log.txt",
        "model_00004.pt",
        "model_00004.pt.sha256",
        "model_00006.pt",
        "model_00006.pt.sha256",
        "run.json",
    ]
    digest, name = open(os.path.join(log_dir, "model_00006.pt.sha256")).read().split()
    assert name == "model_00006.pt" and digest == sha256_of(os.path.join(log_dir, name))
    with open(os.path.join(log_dir, "run.json")) as f:
        meta = json.load(f)
    assert (
        meta["tokens_per_step"] == 128
        and meta["config"]["max_steps"] == 6
        and meta["world_size"] == 1
    )
    assert meta["versions"]["torch"] == torch.__version__
    ckpt = train_gpt.load_checkpoint(os.path.join(log_dir, "model_00006.pt"))
    assert (
        ckpt["step"] == 6
        and ckpt["model_config"]["n_embd"] == 32
        and ckpt["config"]["max_steps"] == 6
    )
    assert ckpt["val_loss"] == pytest.approx(
        float([v for s, k, v in log if k == "val"][-1]), abs=1e-4
    )
    assert {"model", "optimizer", "train_loader", "scaler", "world_size"} <= set(ckpt)
    model, _ = train_gpt.model_from_checkpoint(os.path.join(log_dir, "model_00006.pt"))
    assert all("_orig_mod" not in k for k in ckpt["model"])
    assert model.config.n_embd == 32


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_reproduces_uninterrupted_run(data_dir, tmp_path, optimizer):
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    args = SMALL + [
        "--optimizer",
        optimizer,
        "--data_dir",
        data_dir,
        "--max_steps",
        "7",
        "--val_every",
        "2",
        "--checkpoint_every",
        "3",
        "--keep_checkpoints",
        "0",
        "--shuffle",
    ]
    assert train_gpt.main(args + ["--log_dir", full]) == 0
    # a run that died after its step-3 checkpoint, having logged a few lines past it
    os.makedirs(resumed)
    with (
        open(os.path.join(full, "model_00003.pt"), "rb") as f,
        open(os.path.join(resumed, "model_00003.pt"), "wb") as g,
    ):
        g.write(f.read())
    with open(os.path.join(full, "log.txt")) as f:
        lines = f.readlines()
    with open(os.path.join(resumed, "log.txt"), "w") as f:
        f.writelines(
            line for line in lines if int(line.split()[0]) <= 4
        )  # logged past the checkpoint
        f.write("5 tra")  # and a partial line from the kill
    assert train_gpt.main(args + ["--log_dir", resumed, "--resume", "auto"]) == 0
    with open(os.path.join(full, "log.txt")) as f, open(os.path.join(resumed, "log.txt")) as g:
        assert g.read() == f.read()  # bitwise: same train lines, nothing duplicated, nothing lost
    # resuming a finished run does nothing
    assert train_gpt.main(args + ["--log_dir", resumed, "--resume", "auto"]) == 0
    assert len(read_log(resumed, "train")) == 7


def test_muon_checkpoints_both_optimizers_on_one_schedule(data_dir, tmp_path, capsys):
    log_dir = str(tmp_path / "log")
    args = SMALL + ["--data_dir", data_dir, "--log_dir", log_dir, "--val_every", "0"]
    muon = ["--optimizer", "muon", "--muon_lr", "0.03", "--max_steps", "3"]
    assert train_gpt.main(args + muon) == 0
    out = capsys.readouterr().out
    assert "optimizer: Muon, lr 0.03, momentum 0.95, for the blocks' 8 matrices (" in out
    assert "; AdamW, lr 0.001, weight decay 0.1 for the rest" in out
    ckpt = train_gpt.load_checkpoint(os.path.join(log_dir, "model_00003.pt"))
    cfg = TrainConfig(**ckpt["config"])
    assert cfg.optimizer == "muon" and len(ckpt["muon"]["state"]) == 8
    assert all(set(s) == {"momentum_buffer"} for s in ckpt["muon"]["state"].values())
    assert all("exp_avg" in s for s in ckpt["optimizer"]["state"].values())
    adamw_lr = train_gpt.learning_rate(2, cfg)  # the lr of the last step, 2; muon's: x 0.03/1e-3
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [adamw_lr, adamw_lr]
    assert ckpt["muon"]["param_groups"][0]["lr"] == pytest.approx(adamw_lr * 30, rel=1e-12)
    # a run keeps its optimizer; a checkpoint from before --optimizer resumes as AdamW's
    resume = ["--resume", "auto", "--max_steps", "4"]
    assert train_gpt.main(args + resume + ["--optimizer", "adamw"]) == 2
    assert "--optimizer adamw differs from muon in " in capsys.readouterr().err
    old_dir = str(tmp_path / "old")
    old = ["--data_dir", data_dir, "--log_dir", old_dir, "--val_every", "0"]
    assert train_gpt.main(SMALL + old + ["--max_steps", "2"]) == 0
    path = os.path.join(old_dir, "model_00002.pt")
    ckpt = train_gpt.load_checkpoint(path)
    for name in ("optimizer", "muon_lr", "muon_momentum"):
        del ckpt["config"][name]
    train_gpt.save_checkpoint(path, ckpt)
    assert train_gpt.main(old + resume + ["--optimizer", "muon"]) == 2
    assert "--optimizer muon differs from adamw in " in capsys.readouterr().err
    assert train_gpt.main(old + resume) == 0
    assert len(read_log(old_dir, "train")) == 4


def test_sigterm_checkpoints_and_resume_matches(data_dir, tmp_path):
    full, interrupted = str(tmp_path / "full"), str(tmp_path / "interrupted")
    args = SMALL + [
        "--data_dir",
        data_dir,
        "--max_steps",
        "12",
        "--val_every",
        "4",
        "--checkpoint_every",
        "0",
    ]
    # every part runs with the same thread count:
    # float sums on CPU are bitwise reproducible only then
    assert run_script(args + ["--log_dir", full]).returncode == 0
    proc = start_script(args + ["--log_dir", interrupted])
    wait_for_steps(interrupted, 2, timeout=120)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "finishing this step" in err
    checkpoints = train_gpt.list_checkpoints(interrupted)
    assert len(checkpoints) == 1
    stopped_at = checkpoints[0][0]
    assert 2 <= stopped_at < 12 and len(read_log(interrupted, "train")) == stopped_at
    assert run_script(args + ["--log_dir", interrupted, "--resume", "auto"]).returncode == 0
    with open(os.path.join(full, "log.txt")) as f, open(os.path.join(interrupted, "log.txt")) as g:
        assert g.read() == f.read()


def test_half_written_checkpoint_is_ignored(data_dir, tmp_path, capsys):
    log_dir = str(tmp_path / "log")
    args = SMALL + ["--data_dir", data_dir, "--log_dir", log_dir, "--val_every", "0"]
    assert (
        train_gpt.main(
            args + ["--max_steps", "2", "--checkpoint_every", "1", "--keep_checkpoints", "0"]
        )
        == 0
    )
    with open(os.path.join(log_dir, "model_00002.pt"), "rb") as f:
        data = f.read()
    with open(os.path.join(log_dir, "model_00009.pt"), "wb") as f:
        f.write(data[: len(data) // 3])  # a copy cut short, under a valid name
    with open(os.path.join(log_dir, "model_00010.pt.tmp"), "wb") as f:
        f.write(data[:100])  # an atomic write a kill interrupted
    path, ckpt = train_gpt.resolve_resume(TrainConfig(resume="auto", log_dir=log_dir))
    assert path.endswith("model_00002.pt") and ckpt["step"] == 2
    assert "model_00009.pt does not load" in capsys.readouterr().err
    assert train_gpt.main(args + ["--max_steps", "4", "--resume", "auto"]) == 0
    assert [s for s, _, _ in read_log(log_dir, "train")] == [0, 1, 2, 3]
    assert not glob.glob(os.path.join(log_dir, "*.tmp"))  # the stale temp file is gone
    aside = glob.glob(
        os.path.join(log_dir, "set_aside_*", "*")
    )  # the damaged newer checkpoint: moved, not lost
    assert sorted(os.path.basename(p) for p in aside) == [
        "log.txt",
        "model_00009.pt",
        "run.json",
    ]  # the log and run.json: copies


def test_non_finite_loss_stops_without_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    log_dir = str(tmp_path / "log")
    args = SMALL + [
        "--data_dir",
        data_dir,
        "--log_dir",
        log_dir,
        "--val_every",
        "0",
        "--checkpoint_every",
        "2",
        "--keep_checkpoints",
        "0",
    ]
    forward = GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] > 6:  # micro-steps of steps 0-2 are fine; step 3 diverges
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    assert train_gpt.main(args + ["--max_steps", "8"]) == 1
    err = capsys.readouterr().err
    assert "step 3: loss nan" in err and "model_00002.pt" in err
    assert [p for _, p in train_gpt.list_checkpoints(log_dir)] == [
        os.path.join(log_dir, "model_00002.pt")
    ]
    ckpt = train_gpt.load_checkpoint(os.path.join(log_dir, "model_00002.pt"))
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert [s for s, _, _ in read_log(log_dir, "train")] == [0, 1, 2]


# Two processes sum each step's gradient in another order than one (2 micro-batches each, then the
# all-reduce, against 4 accumulated): AdamW's losses match to 1e-6. Muon's Newton-Schulz iteration
# runs in bfloat16, which turns such rounding into larger differences: measured on CPU with torch
# 2.14, one process with it differs from one with a float32 iteration by up to 1e-4 in these
# losses (val lines are rounded to 1e-4) and 2.6e-3 in the weights. Two processes may differ from
# one by twice that; they differ by 1e-4 and 1.4e-3.
@pytest.mark.parametrize(
    "optimizer, loss_tolerance, weight_tolerance",
    [
        ("adamw", 2e-5, 1e-5),
        ("muon", 2e-4, 5.2e-3),
    ],
)
def test_two_process_torchrun_matches_one_process(
    data_dir, tmp_path, optimizer, loss_tolerance, weight_tolerance
):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = SMALL + [
        "--data_dir",
        data_dir,
        "--total_batch_size",
        "256",
        "--optimizer",
        optimizer,
        "--max_steps",
        "4",
        "--val_every",
        "2",
        "--checkpoint_every",
        "0",
    ]
    single = run_script(args + ["--log_dir", one])
    assert single.returncode == 0, single.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    multi = run_script(args + ["--log_dir", two], launcher=launcher)
    assert multi.returncode == 0, multi.stderr
    assert "= 2 x 32 x 2 process(es) x 2 accumulation steps" in multi.stdout
    a, b = read_log(one), read_log(two)
    assert [(s, k) for s, k, _ in a] == [(s, k) for s, k, _ in b]
    for (_, _, va), (_, _, vb) in zip(a, b):
        assert abs(float(va) - float(vb)) < loss_tolerance
    ckpt_a = train_gpt.load_checkpoint(os.path.join(one, "model_00004.pt"))["model"]
    ckpt_b = train_gpt.load_checkpoint(os.path.join(two, "model_00004.pt"))["model"]
    assert max((ckpt_a[k] - ckpt_b[k]).abs().max().item() for k in ckpt_a) < weight_tolerance


def test_compile_with_eval_and_sampling(data_dir, tmp_path, monkeypatch):
    # sampling only needs encode/decode; the real tokenizer is tested with prepare.py
    class FakeEncoding:
        def encode_ordinary(self, text):
            return [ord(c) for c in text]

        def decode(self, tokens):
            return " ".join(map(str, tokens))

    monkeypatch.setattr(train_gpt, "gpt2_encoding", lambda: FakeEncoding())
    log_dir = str(tmp_path / "log")
    args = SMALL + [
        "--data_dir",
        data_dir,
        "--log_dir",
        log_dir,
        "--max_steps",
        "2",
        "--val_every",
        "1",
        "--sample_every",
        "1",
        "--num_samples",
        "2",
        "--sample_length",
        "4",
        "--compile",
    ]
    assert train_gpt.main(args) == 0
    log = read_log(log_dir)
    assert [(s, k) for s, k, _ in log] == [
        (0, "val"),
        (0, "train"),
        (1, "val"),
        (1, "train"),
        (2, "val"),
    ]


def test_missing_tokenizer_turns_sampling_off(data_dir, tmp_path, monkeypatch, capsys):
    def unavailable():
        raise train_gpt.UserError("cannot load the GPT-2 tokenizer (test)")

    monkeypatch.setattr(train_gpt, "gpt2_encoding", unavailable)
    log_dir = str(tmp_path / "log")
    args = SMALL + [
        "--data_dir",
        data_dir,
        "--log_dir",
        log_dir,
        "--max_steps",
        "2",
        "--val_every",
        "0",
    ]
    assert train_gpt.main(args + ["--sample_every", "1"]) == 0
    assert (
        "cannot load the GPT-2 tokenizer (test); sampling is off for this run"
        in capsys.readouterr().err
    )
    assert len(read_log(log_dir, "train")) == 2
    code = train_gpt.main(
        ["--resume", "auto", "--log_dir", log_dir, "--sample", "Hi", "--device", "cpu"]
    )
    assert code == 2 and "error: cannot load the GPT-2 tokenizer (test)" in capsys.readouterr().err


def test_sample_from_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    class FakeEncoding:
        def encode_ordinary(self, text):
            return [ord(c) for c in text]

        def decode(self, tokens):
            return "|".join(map(str, tokens))

    monkeypatch.setattr(train_gpt, "gpt2_encoding", lambda: FakeEncoding())
    log_dir = str(tmp_path / "log")
    assert (
        train_gpt.main(
            SMALL
            + ["--data_dir", data_dir, "--log_dir", log_dir, "--max_steps", "1", "--val_every", "0"]
        )
        == 0
    )
    capsys.readouterr()
    code = train_gpt.main(
        [
            "--resume",
            os.path.join(log_dir, "model_00001.pt"),
            "--sample",
            "Hi",
            "--num_samples",
            "3",
            "--sample_length",
            "5",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    samples = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sample ")]
    assert len(samples) == 3 and all(
        s.split(": ", 1)[1].strip("'").startswith("72|105|") for s in samples
    )
    assert all(len(s.split("|")) == 7 for s in samples)  # 2 prompt tokens + 5 new ones
    code = train_gpt.main(
        [
            "--resume",
            os.path.join(log_dir, "model_00001.pt"),
            "--sample",
            "Hi",
            "--block_size",
            "64",
            "--device",
            "cpu",
        ]
    )
    assert (
        code == 2 and "has a different model: block_size=32 (flags: 64)" in capsys.readouterr().err
    )
    assert train_gpt.main(["--sample", "Hi", "--log_dir", str(tmp_path / "none")]) == 2
    assert "--sample needs a checkpoint" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# errors a user can cause


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--total_batch_size", "100"],
            "--total_batch_size 100 is not a multiple of batch_size * block_size * "
            "processes = 2 * 32 * 1 = 64",
        ),
        (["--total_batch_size", "0"], "--total_batch_size 0 must be at least 1"),
        (["--max_steps", "-1"], "--max_steps -1 must be at least 1"),
        (["--val_steps", "0"], "--val_steps 0 must be at least 1"),
        (["--warmup_steps", "-2"], "--warmup_steps -2 must not be negative"),
        (["--n_head", "3"], "--n_embd 32 is not divisible by --n_head 3"),
        (["--device", "tpu"], "unknown --device 'tpu'"),
        (["--device", "cuda:7"], "--device cuda:7"),
        (["--vocab_size", "1000"], "--vocab_size 1000 is smaller than GPT-2's 50257"),
        (["--min_lr", "1"], "--min_lr 1.0 is above --max_lr"),
        (["--max_lr", "0", "--min_lr", "0"], "--max_lr 0.0 must be positive"),
        (["--muon_lr", "-0.02"], "--muon_lr -0.02 must be positive"),
        (["--muon_momentum", "1"], "--muon_momentum 1.0 must be at least 0 and below 1"),
    ],
)
def test_bad_configuration_is_refused(data_dir, tmp_path, capsys, extra, message):
    log_dir = str(tmp_path / "log")
    assert (
        train_gpt.main(
            SMALL + ["--data_dir", data_dir, "--log_dir", log_dir, "--max_steps", "1"] + extra
        )
        == 2
    )
    assert message in capsys.readouterr().err
    assert not os.path.exists(os.path.join(log_dir, "log.txt"))  # refused before any work


def test_unknown_model_and_help(capsys):
    result = run_script(["--model", "d13"])
    assert result.returncode == 2 and "invalid choice: 'd13'" in result.stderr
    with pytest.raises(SystemExit) as raised:
        train_gpt.main(["--optimizer", "sgd"])
    assert raised.value.code == 2
    assert "error: argument --optimizer: invalid choice: 'sgd'" in capsys.readouterr().err
    result = run_script(["--help"])
    assert result.returncode == 0
    for flag in [
        "--data_dir",
        "--log_dir",
        "--model",
        "--batch_size",
        "--block_size",
        "--total_batch_size",
        "--max_steps",
        "--warmup_steps",
        "--max_lr",
        "--min_lr",
        "--weight_decay",
        "--optimizer",
        "--muon_lr",
        "--muon_momentum",
        "--grad_clip",
        "--val_every",
        "--val_steps",
        "--hellaswag_every",
        "--sample_every",
        "--checkpoint_every",
        "--keep_checkpoints",
        "--resume",
        "--device",
        "--dtype",
        "--compile",
        "--kernels",
        "--seed",
        "--shuffle",
        "--n_layer",
        "--n_head",
        "--n_embd",
        "--vocab_size",
    ]:
        assert flag in result.stdout
    assert "tokens per optimizer step" in result.stdout  # field comments are the help text


def test_a_file_as_log_dir(data_dir, tmp_path, capsys):
    (tmp_path / "log").write_text("not a folder")
    assert (
        train_gpt.main(
            SMALL + ["--data_dir", data_dir, "--log_dir", str(tmp_path / "log"), "--max_steps", "1"]
        )
        == 2
    )
    assert "is a file, not a folder; choose another --log_dir" in capsys.readouterr().err


def test_missing_and_empty_data_dir(tmp_path, capsys):
    args = SMALL + ["--log_dir", str(tmp_path / "log"), "--max_steps", "1"]
    assert train_gpt.main(args + ["--data_dir", str(tmp_path / "nope")]) == 2
    assert "nope has no *_train_*.npy shards; run `python prepare.py" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    assert train_gpt.main(args + ["--data_dir", str(tmp_path / "empty")]) == 2
    assert "empty has no *_train_*.npy shards; run `python prepare.py" in capsys.readouterr().err


def test_checkpoint_from_another_model_and_reused_log_dir(data_dir, tmp_path, capsys):
    log_dir = str(tmp_path / "log")
    args = SMALL + [
        "--data_dir",
        data_dir,
        "--log_dir",
        log_dir,
        "--max_steps",
        "1",
        "--val_every",
        "0",
    ]
    assert train_gpt.main(args) == 0
    capsys.readouterr()
    assert train_gpt.main(args) == 2  # a fresh run would overwrite the first one
    assert "already holds a run" in capsys.readouterr().err
    assert train_gpt.main(args + ["--resume", "auto", "--n_layer", "3"]) == 2
    assert "model_00001.pt has a different model: n_layer=2 (flags: 3)" in capsys.readouterr().err
    assert train_gpt.main(args + ["--resume", os.path.join(log_dir, "missing.pt")]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err
    assert train_gpt.main(args + ["--resume", log_dir]) == 2
    assert "is a folder but not a sharded checkpoint" in capsys.readouterr().err
    # --resume auto with only a damaged checkpoint starts over,
    # and moves the old log and checkpoint aside
    with open(os.path.join(log_dir, "model_00001.pt"), "r+b") as f:
        f.truncate(1000)
    assert train_gpt.main(args + ["--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert (
        "no valid checkpoint" in out
        and "moved the old log and the checkpoints that do not load to" in out
    )
    aside = glob.glob(os.path.join(log_dir, "set_aside_*"))
    assert len(aside) == 1
    assert sorted(os.listdir(aside[0])) == [
        "log.txt",
        "model_00001.pt",
        "model_00001.pt.sha256",
        "run.json",
    ]
    with open(os.path.join(log_dir, "log.txt")) as f, open(os.path.join(aside[0], "log.txt")) as g:
        new, old = f.read(), g.read()
    assert new == old and new.startswith("0 train ")  # the same deterministic run, logged again


# -----------------------------------------------------------------------------
# histories, data and disks: nothing lost, nothing silently wrong


def test_an_older_checkpoint_is_continued_only_as_a_branch(data_dir, tmp_path, capsys):
    log_dir = str(tmp_path / "log")
    args = SMALL + [
        "--data_dir",
        data_dir,
        "--val_every",
        "0",
        "--checkpoint_every",
        "2",
        "--keep_checkpoints",
        "2",
    ]
    assert train_gpt.main(args + ["--log_dir", log_dir, "--max_steps", "6"]) == 0
    old = os.path.join(log_dir, "model_00004.pt")
    capsys.readouterr()
    assert train_gpt.main(args + ["--log_dir", log_dir, "--max_steps", "8", "--resume", old]) == 2
    err = capsys.readouterr().err
    assert (
        "model_00004.pt is at step 4, but" in err
        and "(model_00006.pt)" in err
        and "--branch" in err
    )
    assert (
        train_gpt.main(
            args + ["--log_dir", log_dir, "--max_steps", "8", "--resume", old, "--branch"]
        )
        == 0
    )
    aside = glob.glob(os.path.join(log_dir, "set_aside_*"))
    assert len(aside) == 1 and sorted(os.listdir(aside[0])) == [
        "log.txt",
        "model_00006.pt",
        "model_00006.pt.sha256",
        "run.json",
    ]  # moved, not deleted
    assert [s for s, _, _ in read_log(aside[0], "train")] == list(
        range(6)
    )  # the abandoned history, whole
    assert [s for s, _, _ in read_log(log_dir, "train")] == list(
        range(8)
    )  # the branch, each step once
    assert [s for s, _ in train_gpt.list_checkpoints(log_dir)] == [
        8,
        6,
    ]  # the branch's own, rotated
    # another run's folder is refused;
    # an empty one continues the run, with its log up to the checkpoint
    other, fresh = str(tmp_path / "other"), str(tmp_path / "fresh")
    assert train_gpt.main(args + ["--log_dir", other, "--max_steps", "1"]) == 0
    newest = os.path.join(log_dir, "model_00008.pt")
    assert train_gpt.main(args + ["--log_dir", other, "--max_steps", "10", "--resume", newest]) == 2
    assert "--log_dir " + other + " holds another run" in capsys.readouterr().err
    assert train_gpt.main(args + ["--log_dir", fresh, "--max_steps", "10", "--resume", newest]) == 0
    assert [s for s, _, _ in read_log(fresh, "train")] == list(range(10))
    assert read_log(fresh)[:9] == read_log(log_dir)[:9]


def test_stopping_on_an_evaluation_step_keeps_its_points(data_dir, tmp_path, monkeypatch):
    full, stopped = str(tmp_path / "full"), str(tmp_path / "stopped")
    args = SMALL + [
        "--data_dir",
        data_dir,
        "--max_steps",
        "6",
        "--val_every",
        "4",
        "--checkpoint_every",
        "0",
    ]
    assert train_gpt.main(args + ["--log_dir", full]) == 0
    forward, calls = GPT.forward, {"n": 0}

    def signalled(
        self, idx, targets=None
    ):  # SIGTERM during step 3, the one the step-4 evaluation follows
        if self.training:
            calls["n"] += 1
            if calls["n"] == 7:
                os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, idx, targets)

    monkeypatch.setattr(GPT, "forward", signalled)
    assert train_gpt.main(args + ["--log_dir", stopped]) == 0
    assert [s for s, _ in train_gpt.list_checkpoints(stopped)] == [4]
    assert (4, "val") in [(s, k) for s, k, _ in read_log(stopped)]
    monkeypatch.setattr(GPT, "forward", forward)
    assert train_gpt.main(args + ["--log_dir", stopped, "--resume", "auto"]) == 0
    assert read_log(stopped) == read_log(full)


def test_data_problems_are_named_at_start(tmp_path, capsys):
    small = make_shards(tmp_path / "small", train_tokens=600)  # 9 steps of 128 tokens per pass
    log_dir = str(tmp_path / "log")
    args = SMALL + [
        "--data_dir",
        small,
        "--log_dir",
        log_dir,
        "--val_every",
        "0",
        "--checkpoint_every",
        "5",
        "--keep_checkpoints",
        "0",
    ]
    shards = [
        {"name": name, "split": "val" if "_val_" in name else "train"}
        for name in sorted(os.listdir(small))
    ]
    with open(os.path.join(small, "manifest.json"), "w") as f:
        json.dump({"settings": {}, "shards": shards, "complete": False}, f)
    assert train_gpt.main(args + ["--max_steps", "12"]) == 0
    err = capsys.readouterr().err
    assert (
        "manifest.json says prepare.py has not finished: "
        "the run trains on the shards written so far" in err
    )
    assert "it wraps around the data 1.3 times" in err
    os.remove(
        os.path.join(small, "tok_train_000002.npy")
    )  # the checkpoint at step 5 reads the second shard
    resume = ["--max_steps", "14", "--resume", os.path.join(log_dir, "model_00005.pt"), "--branch"]
    assert train_gpt.main(args + resume) == 2
    assert "tok_train_000002.npy is missing; run prepare.py again" in capsys.readouterr().err
    with open(os.path.join(small, "manifest.json"), "w") as f:
        kept = [s for s in shards if s["name"] != "tok_train_000002.npy"]
        json.dump({"settings": {}, "shards": kept, "complete": False}, f)
    assert train_gpt.main(args + resume) == 2
    assert "reading shard 2 of its data, but" in capsys.readouterr().err
    assert not glob.glob(os.path.join(log_dir, "set_aside_*"))  # refused before anything moved
    with open(os.path.join(small, "manifest.json"), "w") as f:
        f.write('{"complete": true,\n "shards": [}\n')
    assert train_gpt.main(args + ["--max_steps", "14", "--resume", "auto"]) == 2
    assert "manifest.json:2 is not a manifest prepare.py can read" in capsys.readouterr().err


def test_an_empty_log_is_no_run_and_a_finished_run_has_nothing_to_train(data_dir, tmp_path, capsys):
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    (log_dir / "log.txt").write_text("")  # e.g. left by a run stopped before its first step
    args = SMALL + [
        "--data_dir",
        data_dir,
        "--log_dir",
        str(log_dir),
        "--max_steps",
        "1",
        "--val_every",
        "0",
    ]
    assert train_gpt.main(args) == 0
    assert not glob.glob(str(log_dir / "set_aside_*")) and "moved" not in capsys.readouterr().out
    with open(log_dir / "log.txt") as f:
        logged = f.read()
    assert train_gpt.main(args + ["--resume", "auto"]) == 0
    assert "nothing to train" in capsys.readouterr().out
    with open(log_dir / "log.txt") as f:
        assert f.read() == logged


def test_a_failed_checkpoint_write_is_one_line(data_dir, tmp_path):
    log_dir = str(tmp_path / "log")
    preexec = (
        "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))"
    )  # files of at most 1 MB: a full disk
    script = (
        f"{preexec}; import runpy, sys; sys.argv = [{SCRIPT!r}] + sys.argv[1:]; "
        f"runpy.run_path({SCRIPT!r}, run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script]
        + SMALL
        + ["--data_dir", data_dir, "--log_dir", log_dir, "--max_steps", "2", "--val_every", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot write checkpoint ")
    assert "free some disk space" in proc.stderr
    assert sorted(os.listdir(log_dir)) == [
        ".train_gpt.lock",
        "log.txt",
        "run.json",
    ]  # no partial checkpoint, no temp file


def test_export_to_transformers_and_back(data_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    log_dir, hf_dir = str(tmp_path / "log"), str(tmp_path / "hf")
    assert (
        train_gpt.main(SMALL + ["--data_dir", data_dir, "--log_dir", log_dir, "--max_steps", "2"])
        == 0
    )
    assert train_gpt.main(["--resume", "auto", "--log_dir", log_dir, "--export", hf_dir]) == 0
    ours, ckpt = train_gpt.model_from_checkpoint(os.path.join(log_dir, "model_00002.pt"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        expected = ours.eval()(idx)[0][..., :50257]  # the padding rows are not exported
        assert (hf(idx).logits - expected).abs().max().item() < 1e-4
        back = GPT.from_pretrained(hf_dir).eval()
        assert back.config.vocab_size == 50257 and torch.equal(back(idx)[0], expected)
    assert transformers.AutoTokenizer.from_pretrained(hf_dir)("Hello world")["input_ids"] == [
        15496,
        995,
    ]
    assert train_gpt.main(["--log_dir", str(tmp_path / "none"), "--export", hf_dir]) == 2


def test_init_from_a_local_gpt2_folder(data_dir, tmp_path, capsys):
    hf = randomized_hf_model(tmp_path / "gpt2")
    log_dir = str(tmp_path / "log")
    args = [
        "--data_dir",
        data_dir,
        "--log_dir",
        log_dir,
        "--device",
        "cpu",
        "--batch_size",
        "2",
        "--block_size",
        "32",
        "--total_batch_size",
        "128",
        "--val_steps",
        "1",
        "--hellaswag_every",
        "0",
        "--sample_every",
        "0",
        "--max_steps",
        "1",
        "--init_from",
        str(tmp_path / "gpt2"),
    ]
    assert train_gpt.main(args) == 0
    assert "model: " + str(tmp_path / "gpt2") in capsys.readouterr().out
    val = np.load(os.path.join(data_dir, "tok_val_000000.npy")).astype(np.int64)
    batches = [
        torch.from_numpy(val[i * 64 : i * 64 + 65]) for i in range(2)
    ]  # val_steps x accumulation windows
    with torch.no_grad():
        losses = [
            F.cross_entropy(hf(b[:-1].view(2, 32)).logits.view(-1, 50257), b[1:]) for b in batches
        ]
    assert abs(float(read_log(log_dir, "val")[0][2]) - sum(losses).item() / 2) < 1e-4
    muon_dir = str(tmp_path / "muon")  # fine-tuning with Muon: the same start, another step
    muon = ["--log_dir", muon_dir, "--optimizer", "muon", "--warmup_steps", "0"]
    assert train_gpt.main(args + muon) == 0
    assert read_log(muon_dir, "val")[0] == read_log(log_dir, "val")[0]
    assert read_log(muon_dir, "val")[1] != read_log(log_dir, "val")[1]
    for extra, message in [
        (["--resume", "auto"], "--init_from starts a run from pretrained weights and --resume"),
        (["--n_layer", "3"], "has a different model: n_layer=2 (flags: 3)"),
        (["--block_size", "256"], "--block_size 256 is longer than"),
    ]:
        assert train_gpt.main(args + ["--log_dir", str(tmp_path / "x")] + extra) == 2
        assert message in capsys.readouterr().err
    os.makedirs(tmp_path / "other")
    with open(tmp_path / "other" / "config.json", "w") as f:
        json.dump({"model_type": "llama", "hidden_size": 64}, f)
    for name, message in [
        ("nope", "'nope' is neither a folder nor one of gpt2"),
        (str(tmp_path / "other"), "is not a Hugging Face GPT-2 folder"),
    ]:
        assert train_gpt.main(args[:-1] + [name, "--log_dir", str(tmp_path / "y")]) == 2
        assert message in capsys.readouterr().err


def test_runs_are_bitwise_equal_on_a_loaded_machine(data_dir, tmp_path):
    """The same flags give the same losses to the last bit on CPU with the same thread count, while
    another process keeps every core busy."""
    burner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import torch\nwhile True: torch.randn(500, 500) @ torch.randn(500, 500)",
        ]
    )
    try:
        args = SMALL + ["--data_dir", data_dir, "--max_steps", "8", "--val_every", "4"]
        logs = []
        for name in ("a", "b"):
            assert (
                run_script(
                    args + ["--log_dir", str(tmp_path / name)], env={"OMP_NUM_THREADS": "2"}
                ).returncode
                == 0
            )
            logs.append(read_log(str(tmp_path / name)))
        assert logs[0] == logs[1]
    finally:
        burner.kill()
