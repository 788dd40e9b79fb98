"""hellaswag.py on CPU without network: hand-made files in the official format, a tiny random GPT
scored against a one-example-at-a-time reference, batching, fixed shapes, two processes,
train_gpt.py's hella lines, downloads, and every bad input's message."""

import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hellaswag
import train_gpt
from prepare import EOT_TOKEN, UserError, gpt2_encoding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK_SIZE = 64


def example(ind, activity, ctx_a, ctx_b, endings, label=None, split="val"):
    """A row with the official file's fields
    (ctx is ctx_a and ctx_b joined, as in the released data)."""
    row = {
        "ind": ind,
        "activity_label": activity,
        "ctx_a": ctx_a,
        "ctx_b": ctx_b,
        "ctx": f"{ctx_a} {ctx_b}".strip(),
        "split": split,
        "split_type": "indomain",
        "endings": endings,
        "source_id": f"handmade~{ind}",
    }
    if label is not None:
        row["label"] = label
    return row


LONG_CONTEXT = " ".join(
    ["She measures the board twice, marks it with a pencil, and checks the angle again."] * 6
)
LONG_ENDING = " ".join(
    ["then he sands every edge of the frame until it is smooth to the touch"] * 6
)

EXAMPLES = [
    example(
        11,
        "Making a sandwich",
        "A man lays two slices of bread on a cutting board.",
        "he",
        [
            "spreads butter on one slice and adds cheese.",
            "throws the bread into the river.",
            "begins to sing loudly at the ceiling.",
            "paints the board bright blue.",
        ],
        0,
    ),
    example(
        27,
        "Walking the dog",
        "A woman clips a leash onto a small brown dog.",
        "they",
        [
            "fly over the mountains in a balloon.",
            "walk out the front door and down the street.",
            "read a newspaper together at the table.",
            "disappear into a cloud of smoke.",
        ],
        1,
    ),
    example(
        35,
        "Washing a car",
        "A boy sprays water over the roof of a red car.",
        "the boy",
        [
            "eats the hose.",
            "scrubs the doors with a soapy sponge and rinses them.",
            "drives the car into the ocean.",
            "sits on the roof and sleeps.",
        ],
        1,
    ),
    example(
        48,
        "Playing the piano",
        "A girl sits down at a piano in a quiet room.",
        "she",
        [
            "places her fingers on the keys and plays a slow melody.",
            "lifts the piano over her head.",
            "pours milk into the piano.",
            "turns the piano into a boat.",
        ],
        0,
    ),
    example(
        52,
        "Shoveling snow",
        "Snow covers the driveway in front of a house.",
        "a man",
        [
            "waters the snow with a garden hose.",
            "paints the snow green.",
            "pushes a shovel along the driveway, clearing a path.",
            "plants flowers in the snow.",
        ],
        2,
    ),
    example(
        64,
        "Woodworking",
        LONG_CONTEXT,
        "She",
        [
            "cuts along the line with a hand saw.",
            "eats the pencil.",
            "throws the board out of the window.",
            "folds the board in half.",
        ],
        0,
    ),
    example(
        71,
        "Brushing teeth",
        "A child squeezes toothpaste onto a brush.",
        "the child",
        [
            "brushes the dog instead.",
            "puts the brush in the oven.",
            "climbs onto the roof.",
            "brushes each tooth in small circles and spits into the sink.",
        ],
        3,
    ),
    example(
        83,
        "Sanding",
        "A carpenter holds a square wooden frame.",
        "",
        [LONG_ENDING, "drops it.", "eats it.", "paints it."],
        0,
    ),
    example(
        90,
        "Making tea",
        "A kettle whistles on the stove.",
        "a woman",
        [
            "pours the hot water over a tea bag in a cup.",
            "puts the kettle in the freezer.",
            "drinks the kettle.",
            "throws the cup at the wall.",
        ],
        0,
    ),
    example(
        104,
        "Riding a bike",
        "A teenager wheels a bicycle out of the garage.",
        "he",
        [
            "swims across the driveway.",
            "bakes the bicycle into a pie.",
            "buries the bike in the yard.",
            "climbs on, pushes the pedals, and rides away.",
        ],
        3,
    ),
    example(
        117,
        "Juggling",
        "A performer tosses three balls into the air.",
        "he",
        [
            "catches each ball and throws it again in a steady loop.",
            "turns into a bird.",
            "eats all the balls.",
            "falls asleep mid air.",
        ],
        0,
    ),
    example(
        123,
        "Raking leaves",
        "Leaves cover a green lawn in autumn.",
        "two kids",
        [
            "glue the leaves back on the trees.",
            "rake the leaves into a tall pile and jump in it.",
            "cook the leaves for dinner.",
            "mail the leaves to a friend.",
        ],
        1,
    ),
    example(
        131,
        "Fishing",
        "An old man casts a line from the end of a wooden dock.",
        "",
        [
            "He waits quietly as the float bobs on the water.",
            "He",
            "The dock flies away.",
            "The fish hand him a sandwich.",
        ],
        0,
    ),
]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def tiny_gpt(seed=0):
    """A small random GPT whose choices differ from example to example (a wide embedding init makes
    the logits decisive instead of near-uniform)."""
    torch.manual_seed(seed)
    model = train_gpt.GPT(
        train_gpt.GPTConfig(block_size=BLOCK_SIZE, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)
    )
    torch.nn.init.normal_(model.transformer.wte.weight, std=1.0)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_gpt()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl", EXAMPLES)


@pytest.fixture(scope="module")
def short_file(tmp_path_factory):
    """5 examples whose rows all fit in 32 tokens."""
    return write_jsonl(tmp_path_factory.mktemp("hellaswag") / "short.jsonl", EXAMPLES[:5])


@pytest.fixture(scope="module")
def unbatched(model, data_file):
    return hellaswag.score(model, data_file, BLOCK_SIZE, batch_size=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    path = str(tmp_path_factory.mktemp("ckpt") / "model_00007.pt")
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config), "step": 7}, path)
    return path


@torch.no_grad()
def reference_losses(model, examples, block_size=BLOCK_SIZE):
    """The straightforward computation: one example at a time, each ending its own unpadded forward
    pass. Returns (summed, mean) ending cross-entropies, each (len(examples), 4)."""
    enc = gpt2_encoding()
    sums, means = np.zeros((len(examples), 4)), np.zeros((len(examples), 4))
    for i, ex in enumerate(examples):
        ctx = enc.encode_ordinary(ex["ctx"]) or [EOT_TOKEN]  # an empty context reads <|endoftext|>
        for j, ending in enumerate(ex["endings"]):
            end = enc.encode_ordinary(" " + ending)
            if (
                len(end) >= block_size
            ):  # an ending that fills the block: its start, after one context token
                c, end = ctx[-1:], end[: block_size - 1]
            else:  # the oldest context tokens go
                c = ctx[max(0, len(ctx) + len(end) - block_size) :]
            tokens = torch.tensor([c + end])
            logits = model(tokens)[0][
                0, :, :50257
            ].float()  # (T, 50257): padded-vocab logits never count
            losses = F.cross_entropy(logits[len(c) - 1 : -1], tokens[0, len(c) :], reduction="none")
            sums[i, j], means[i, j] = losses.sum().item(), losses.mean().item()
    return sums, means


# -----------------------------------------------------------------------------
# data files


def test_load_keeps_every_field(data_file):
    assert hellaswag.load_examples(data_file) == EXAMPLES
    assert hellaswag.load_examples(data_file, limit=3) == EXAMPLES[:3]


def test_find_data_is_local_only(tmp_path):
    assert hellaswag.DEFAULT_DATA_DIR == os.path.join(ROOT, "hellaswag")
    assert hellaswag.find_data("val", str(tmp_path)) is None
    write_jsonl(tmp_path / "hellaswag_train.jsonl", EXAMPLES[:2])
    assert hellaswag.find_data("train", str(tmp_path)) == str(tmp_path / "hellaswag_train.jsonl")
    assert hellaswag.find_data("val", str(tmp_path)) is None


def test_download_is_atomic_and_ensure_data_downloads_once(tmp_path, monkeypatch, capsys):
    source = tmp_path / "source"
    source.mkdir()
    write_jsonl(
        source / "hellaswag_test.jsonl",
        [example(1, "a", "b", "c", ["w", "x", "y", "z"], split="test")],
    )
    monkeypatch.setattr(hellaswag, "URL", "file://" + str(source / "hellaswag_{split}.jsonl"))
    cache = tmp_path / "cache"
    path = hellaswag.ensure_data("test", str(cache))
    assert path == str(cache / "hellaswag_test.jsonl") == hellaswag.find_data("test", str(cache))
    assert (
        os.listdir(cache) == ["hellaswag_test.jsonl"]
        and "downloading HellaSwag test" in capsys.readouterr().err
    )
    (source / "hellaswag_test.jsonl").unlink()
    assert hellaswag.ensure_data("test", str(cache)) == path  # the local copy: no second download
    assert capsys.readouterr().err == ""

    (source / "hellaswag_val.jsonl").write_text(
        '{"ind": 1, "ctx": "cut off in the midd'
    )  # a broken transfer
    with pytest.raises(
        UserError, match=r"could not download .*:1: not a line of JSON text \(Unterminated string"
    ):
        hellaswag.download("val", str(cache))
    assert os.listdir(cache) == ["hellaswag_test.jsonl"]


def test_download_without_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(hellaswag, "URL", "http://127.0.0.1:9/hellaswag_{split}.jsonl")
    for fetch in (hellaswag.download, hellaswag.ensure_data):
        with pytest.raises(UserError) as e:
            fetch("val", str(tmp_path))
        assert (
            (
                "could not download http://127.0.0.1:9/hellaswag_val.jsonl "
                f"to {tmp_path / 'hellaswag_val.jsonl'}"
            )
            in str(e.value)
            and "fix the network" in str(e.value)
            and "--file" in str(e.value)
        )
        assert os.listdir(tmp_path) == []

    (tmp_path / "a_file").write_text("")
    with pytest.raises(
        UserError, match=r"could not download .* to .*a_file/sub/hellaswag_val\.jsonl.*--data_dir"
    ):
        hellaswag.download("val", str(tmp_path / "a_file" / "sub"))


@pytest.mark.parametrize(
    "line, message",
    [
        (
            '{"ind": 5, "ctx": "x", "endings": ["a", "b", "c", "d"], "label": 0',
            r"bad\.jsonl:3: not a line of JSON",
        ),
        (
            b'{"ind": 5, "ctx": "caf\xe9", "endings": ["a", "b", "c", "d"]}',
            r"bad\.jsonl:3: not a line of JSON",
        ),
        (
            '{"ind": 5, "ctx": "x", "endings": ["a", "b", "c", "d"], "label": 4}',
            r"bad\.jsonl:3: example ind=5 has label 4",
        ),
        (
            '{"ind": 5, "ctx": "x", "endings": ["a", "b", "c", "d"], "label": -1}',
            r"ind=5 has label -1",
        ),
        (
            '{"ind": 5, "ctx": "x", "endings": ["a", "b", "c", "d"], "label": "2"}',
            r"ind=5 has label '2'",
        ),
        (
            '{"ind": 6, "ctx": "x", "endings": ["a", "b", "c"], "label": 0}',
            r'bad\.jsonl:3: example ind=6 has endings \["a", "b", "c"\]; '
            r"every example has a list of 4 strings",
        ),
        (
            '{"ind": 6, "ctx": "x", "endings": ["a", "b", "c", 4], "label": 0}',
            r"ind=6 has endings \[",
        ),
        ('{"ind": 7, "ctx": "x", "label": 0}', r"ind=7 has endings null"),
        ('{"ind": 8, "endings": ["a", "b", "c", "d"], "label": 0}', r"ind=8 has no 'ctx' string"),
        ("[1, 2, 3]", r"bad\.jsonl:3: a JSON list, not an example"),
    ],
)
def test_bad_rows_name_file_line_and_ind(tmp_path, model, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b"\n".join(
            [
                json.dumps(EXAMPLES[0]).encode(),
                b"",
                line if isinstance(line, bytes) else line.encode(),
            ]
        )
    )  # line 2 is blank: skipped
    with pytest.raises(UserError, match=message):
        hellaswag.load_examples(str(path))
    with pytest.raises(UserError, match=message):
        hellaswag.score(model, str(path), BLOCK_SIZE)


def test_empty_file_and_unlabelled_rows(tmp_path, model):
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(UserError, match="holds no examples"):
        hellaswag.score(model, empty, BLOCK_SIZE)
    with pytest.raises(UserError, match="nowhere.jsonl does not exist"):
        hellaswag.score(model, str(tmp_path / "nowhere.jsonl"), BLOCK_SIZE)
    test_rows = [{k: v for k, v in ex.items() if k != "label"} for ex in EXAMPLES[:3]]
    path = write_jsonl(tmp_path / "hellaswag_test.jsonl", test_rows)
    assert hellaswag.load_examples(path) == test_rows  # loading needs no label
    with pytest.raises(UserError, match=r"hellaswag_test\.jsonl:1: example ind=11 has no label"):
        hellaswag.score(model, path, BLOCK_SIZE)


# -----------------------------------------------------------------------------
# rendering


def test_render_is_context_then_space_ending_in_one_padded_array(tmp_path, data_file):
    enc = gpt2_encoding()
    data = hellaswag.render_file(data_file, 1024)  # a block that holds every row
    longest = 0
    for i, ex in enumerate(EXAMPLES):
        ctx = enc.encode_ordinary(ex["ctx"]) or [EOT_TOKEN]  # an empty context reads <|endoftext|>
        for j, ending in enumerate(ex["endings"]):
            row = ctx + enc.encode_ordinary(" " + ending)
            assert (
                data.tokens[i, j, : len(row)].tolist() == row
                and not data.tokens[i, j, len(row) :].any()
            )
            assert (data.starts[i, j], data.lengths[i, j]) == (len(ctx), len(row))
            longest = max(longest, len(row))
    assert data.tokens.shape == (13, 4, -(-longest // 32) * 32) and data.tokens.dtype == np.int32
    assert data.labels.tolist() == [ex["label"] for ex in EXAMPLES] and not data.truncated.any()

    assert hellaswag.render_file(data_file, 1024) is data  # from memory while the file is unchanged
    copy = write_jsonl(tmp_path / "copy.jsonl", EXAMPLES)
    assert hellaswag.render_file(copy, 1024).labels.tolist() == data.labels.tolist()
    write_jsonl(copy, EXAMPLES[:2])
    assert len(hellaswag.render_file(copy, 1024).labels) == 2  # rewritten: read again


def test_render_truncates_from_the_left_and_keeps_endings_whole(data_file):
    enc = gpt2_encoding()
    data = hellaswag.render_file(data_file, BLOCK_SIZE)
    assert data.tokens.shape[2] == BLOCK_SIZE and data.truncated.tolist() == [
        i in (5, 7) for i in range(13)
    ]
    ctx = enc.encode_ordinary(EXAMPLES[5]["ctx"])  # a context longer than the block
    for j, ending in enumerate(EXAMPLES[5]["endings"]):
        end, start = enc.encode_ordinary(" " + ending), data.starts[5, j]
        assert data.lengths[5, j] == BLOCK_SIZE and data.tokens[5, j, start:].tolist() == end
        assert data.tokens[5, j, :start].tolist() == ctx[-start:]
    long_end = enc.encode_ordinary(" " + LONG_ENDING)  # an ending longer than the block
    assert len(long_end) > BLOCK_SIZE and data.starts[7, 0] == 1
    assert (
        data.tokens[7, 0].tolist()
        == enc.encode_ordinary(EXAMPLES[7]["ctx"])[-1:] + long_end[: BLOCK_SIZE - 1]
    )


# -----------------------------------------------------------------------------
# scoring


def test_scores_equal_one_example_at_a_time(model, data_file, unbatched):
    sums, means = reference_losses(model, EXAMPLES)
    s = unbatched
    np.testing.assert_allclose(s.sum_loss, sums, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(s.mean_loss, means, rtol=1e-5, atol=1e-5)
    labels = np.array([ex["label"] for ex in EXAMPLES])
    pred, pred_norm = s.sum_loss.argmin(1), s.mean_loss.argmin(1)
    assert (
        pred.tolist() == sums.argmin(1).tolist() and pred_norm.tolist() == means.argmin(1).tolist()
    )
    assert (
        len(set(pred_norm.tolist())) > 1 and len(set(pred.tolist())) > 1
    )  # the data tells endings apart
    assert (s.correct_norm, s.correct, s.total) == (
        (pred_norm == labels).sum(),
        (pred == labels).sum(),
        13,
    )
    assert s.truncated == 2  # the long context and the long ending
    default = hellaswag.score(model, data_file, BLOCK_SIZE)
    assert (default.correct_norm, default.correct, default.total) == (
        s.correct_norm,
        s.correct,
        s.total,
    )


def test_batched_equals_unbatched(model, data_file, unbatched):
    one = unbatched
    for batch_size in (3, 5, 20):  # 13 examples: none of these divides them
        s = hellaswag.score(model, data_file, BLOCK_SIZE, batch_size=batch_size)
        np.testing.assert_allclose(s.sum_loss, one.sum_loss, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(s.mean_loss, one.mean_loss, rtol=1e-6, atol=1e-5)
        assert (s.correct_norm, s.correct, s.total, s.truncated) == (
            one.correct_norm,
            one.correct,
            one.total,
            one.truncated,
        )
    limited = hellaswag.score(model, data_file, BLOCK_SIZE, batch_size=3, limit=5)
    assert limited.total == 5 and np.array_equal(limited.indices, np.arange(5))
    np.testing.assert_allclose(limited.sum_loss, one.sum_loss[:5], rtol=1e-6, atol=1e-5)
    for flag in ("batch_size", "limit"):
        with pytest.raises(UserError, match=f"--{flag} 0 must be at least 1"):
            hellaswag.score(model, data_file, BLOCK_SIZE, **{flag: 0})


def test_padded_vocabulary_is_never_scored(short_file):
    model = tiny_gpt()
    before = hellaswag.score(model, short_file, BLOCK_SIZE, batch_size=5)
    with torch.no_grad():
        model.lm_head.weight[50257:] = 10.0  # huge logits for the padding ids
    after = hellaswag.score(model, short_file, BLOCK_SIZE, batch_size=5)
    np.testing.assert_allclose(after.sum_loss, before.sum_loss, rtol=1e-6)


class Recorder(torch.nn.Module):
    """A DDP-like wrapper (the model under .module) that records every input shape."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.shapes = []

    def forward(self, idx):
        self.shapes.append(tuple(idx.shape))
        return self.module(idx)


def test_one_fixed_shape_through_wrappers_and_rng_untouched(
    model, data_file, short_file, unbatched
):
    wrapped = Recorder(model)
    state = torch.get_rng_state()
    s = hellaswag.score(wrapped, data_file, BLOCK_SIZE, batch_size=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert (s.correct_norm, s.correct) == (unbatched.correct_norm, unbatched.correct)
    assert s.length == BLOCK_SIZE  # the long example fills the block
    assert wrapped.shapes == [(20, BLOCK_SIZE)] * 3  # 13 examples: 5 + 5 + 3 real, 2 dummy

    wrapped.shapes.clear()
    s = hellaswag.score(wrapped, short_file, BLOCK_SIZE, batch_size=2)
    assert (
        s.length == 32 and wrapped.shapes == [(8, 32)] * 3
    )  # longest row < 32: one multiple of 32
    plain = hellaswag.score(
        lambda idx: model(idx), short_file, BLOCK_SIZE
    )  # any callable: block_size is given
    assert (plain.correct_norm, plain.correct, plain.total) == (s.correct_norm, s.correct, s.total)


def test_compiled_model_compiles_once(model, short_file):
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend)
    counts = [
        (s.correct_norm, s.correct, s.total)
        for s in (
            hellaswag.score(m, short_file, BLOCK_SIZE, batch_size=2)
            for m in (compiled, compiled, model)
        )
    ]
    assert counts[0] == counts[1] == counts[2]  # 2 + 2 + 1 examples, twice: one compilation
    assert len(compiles) == 1
    torch._dynamo.reset()


def test_a_process_with_no_examples_runs_as_many_forward_passes(short_file):
    # world_size larger than the file: the ranks past its end score nothing and contribute zero
    # counts, but run the forward passes of the others (under --fsdp each one is a collective)
    data = hellaswag.render_file(short_file, BLOCK_SIZE)
    wrapped = Recorder(tiny_gpt())
    summed, mean = hellaswag._ending_losses(wrapped, data, np.arange(7, 5, 8), "cpu", 2, 1)
    assert summed.shape == mean.shape == (0, 4)
    assert len(wrapped.shapes) == 1 and wrapped.shapes[0][0] == 8  # 2 examples of dummy rows


def test_world_size_needs_distributed(model, data_file):
    with pytest.raises(UserError, match="torch.distributed"):
        hellaswag.score(model, data_file, BLOCK_SIZE, "cpu", 1, 2)


DISTRIBUTED_SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
sys.path.insert(0, {root!r})
import hellaswag, train_gpt
from prepare import UserError

dist.init_process_group("gloo")
rank, world_size = dist.get_rank(), dist.get_world_size()
hellaswag.URL = {url!r}  # the 5 short examples stand in for the official val file
path = hellaswag.ensure_data("val", {cache!r}, rank == 0, True)  # rank 0 downloads, rank 1 waits for it
hellaswag.URL = "file:///nowhere/hellaswag_{{split}}.jsonl"
try:
    hellaswag.ensure_data("train", {cache!r}, rank == 0, True)
    missing = None
except UserError as e:
    missing = str(e)
model, _ = train_gpt.model_from_checkpoint({checkpoint!r})
model = DDP(model, broadcast_buffers=False).eval()  # as train_gpt.py wraps it
state = torch.get_rng_state()
# 5 examples, batch 2: rank 0 scores 3 in 2 forward passes, rank 1 scores 2 in 1
s = hellaswag.score(model, path, {block_size}, "cpu", rank, world_size, batch_size=2)
assert torch.equal(state, torch.get_rng_state())
with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as f:
    json.dump({{"path": path, "missing": missing, "counts": [s.correct_norm, s.correct, s.total, s.truncated],
               "indices": s.indices.tolist(), "sum_loss": s.sum_loss.tolist()}}, f)
del model
train_gpt.end_distributed()
"""  # noqa: E501 (the script's own lines, kept as they run)


def test_two_processes_give_the_same_totals(tmp_path, model, checkpoint, short_file):
    script, cache = tmp_path / "score.py", tmp_path / "cache"
    script.write_text(
        DISTRIBUTED_SCRIPT.format(
            root=ROOT,
            url="file://" + short_file,
            cache=str(cache),
            checkpoint=checkpoint,
            block_size=BLOCK_SIZE,
            out=str(tmp_path),
        )
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["path"] for r in ranks] == [str(cache / "hellaswag_val.jsonl")] * 2
    assert proc.stderr.count("downloading HellaSwag val") == 1 and os.listdir(cache) == [
        "hellaswag_val.jsonl"
    ]
    assert "could not download file:///nowhere/hellaswag_train.jsonl" in ranks[0]["missing"]
    assert "the master process could not download it" in ranks[1]["missing"]
    one = hellaswag.score(model, short_file, BLOCK_SIZE, batch_size=5)
    for r in ranks:
        assert r["counts"] == [one.correct_norm, one.correct, one.total, one.truncated]
    assert ranks[0]["indices"] == [0, 2, 4] and ranks[1]["indices"] == [1, 3]
    for r in ranks:
        np.testing.assert_allclose(r["sum_loss"], one.sum_loss[r["indices"]], rtol=1e-5, atol=1e-4)


# -----------------------------------------------------------------------------
# command line


def run_cli(capsys, *argv):
    code = hellaswag.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_scores_a_checkpoint(capsys, checkpoint, data_file, unbatched):
    code, out, err = run_cli(
        capsys, "--checkpoint", checkpoint, "--file", data_file, "--device", "cpu", "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    s = unbatched
    assert (
        result["examples"] == 13 and result["truncated"] == 2 and result["block_size"] == BLOCK_SIZE
    )
    assert result["acc_norm"] == s.correct_norm / 13 and result["acc"] == s.correct / 13
    assert (
        result["model"] == f"{checkpoint} (step 7)"
        and result["file"] == data_file
        and result["split"] is None
    )
    assert {
        "seconds",
        "examples_per_s",
        "load_seconds",
        "device",
        "dtype",
        "batch_size",
        "processes",
    } <= set(result)

    code, out, err = run_cli(
        capsys,
        "--checkpoint",
        checkpoint,
        "--file",
        data_file,
        "--limit",
        "4",
        "--batch_size",
        "3",
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert (
        "4 examples (0 truncated" in out
        and "acc " in out
        and "acc_norm " in out
        and "examples/s" in out
    )


def hf_directory(path, model, vocab_size=50257):
    """The tiny model in Hugging Face's GPT-2 layout, its vocabulary cut to vocab_size."""
    from safetensors.torch import save_file

    conv1d = (
        ".attn.c_attn.weight",
        ".attn.c_proj.weight",
        ".mlp.c_fc.weight",
        ".mlp.c_proj.weight",
    )
    tensors = {}
    for name, value in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to wte
        value = value[:vocab_size] if name == "transformer.wte.weight" else value
        tensors[name] = (value.t() if name.endswith(conv1d) else value).contiguous()
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    c = model.config
    (path / "config.json").write_text(
        json.dumps(
            {
                "n_positions": c.block_size,
                "vocab_size": vocab_size,
                "n_layer": c.n_layer,
                "n_head": c.n_head,
                "n_embd": c.n_embd,
                "activation_function": "gelu_new",
            }
        )
    )
    return str(path)


def test_cli_scores_a_hugging_face_directory(capsys, tmp_path, model, data_file, unbatched):
    # the unpadded 50,257-token vocabulary has the same
    # weights for every real token: the same scores
    code, out, err = run_cli(
        capsys,
        "--model_dir",
        hf_directory(tmp_path / "gpt2", model),
        "--file",
        data_file,
        "--device",
        "cpu",
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    assert (result["correct_norm"], result["correct"], result["examples"]) == (
        unbatched.correct_norm,
        unbatched.correct,
        13,
    )
    code, out, err = run_cli(
        capsys,
        "--model_dir",
        hf_directory(tmp_path / "small", model, 1000),
        "--file",
        data_file,
        "--device",
        "cpu",
    )
    assert code == 2 and "1000 tokens, fewer than GPT-2's 50257" in err


def test_cli_downloads_on_first_use(capsys, tmp_path, monkeypatch, checkpoint, data_file):
    monkeypatch.setattr(
        hellaswag, "URL", "file://" + data_file.replace("hellaswag_val", "hellaswag_{split}")
    )
    cache = tmp_path / "cache"
    code, out, err = run_cli(
        capsys,
        "--checkpoint",
        checkpoint,
        "--data_dir",
        str(cache),
        "--device",
        "cpu",
        "--limit",
        "2",
        "--json",
    )
    assert code == 0, err
    assert "downloading" in err and os.path.isfile(cache / "hellaswag_val.jsonl")
    assert (
        json.loads(out)["split"] == "val" and json.loads(out)["examples"] == 2
    )  # stdout: the JSON alone
    code, out, err = run_cli(capsys, "--download", "--data_dir", str(cache))
    assert code == 0 and out == f"{cache / 'hellaswag_val.jsonl'} is in place\n" and err == ""
    code, out, err = run_cli(capsys, "--download", "--data_dir", str(tmp_path / "other"))
    assert (
        code == 0
        and "downloading" in err
        and os.path.isfile(tmp_path / "other" / "hellaswag_val.jsonl")
    )


def test_cli_errors_are_one_line(capsys, tmp_path, monkeypatch, checkpoint, data_file):
    def error_of(*argv):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (code, out, err)
        return err

    assert "exactly one of --checkpoint" in error_of("--file", data_file)
    assert "(got --checkpoint and --model)" in error_of(
        "--checkpoint", checkpoint, "--model", "gpt2"
    )
    assert "nowhere.jsonl does not exist" in error_of(
        "--checkpoint", checkpoint, "--file", "nowhere.jsonl", "--device", "cpu"
    )
    assert "--batch_size 0 must be at least 1" in error_of(
        "--checkpoint", checkpoint, "--file", data_file, "--device", "cpu", "--batch_size", "0"
    )

    garbage = tmp_path / "model_00001.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    assert "does not load" in error_of(
        "--checkpoint", str(garbage), "--file", data_file, "--device", "cpu"
    )
    assert "does not exist" in error_of(
        "--checkpoint", str(tmp_path / "none.pt"), "--file", data_file
    )
    other = tmp_path / "model_00002.pt"
    state = tiny_gpt().state_dict()
    torch.save(
        {"model": state, "step": 2, "model_config": dict(asdict(tiny_gpt().config), n_embd=64)},
        other,
    )
    assert "does not load into a GPT (RuntimeError" in error_of(
        "--checkpoint", str(other), "--file", data_file, "--device", "cpu"
    )
    assert "config.json" in error_of(
        "--model_dir", str(tmp_path), "--file", data_file, "--device", "cpu"
    )

    monkeypatch.setattr(hellaswag, "URL", "http://127.0.0.1:9/hellaswag_{split}.jsonl")
    code, out, err = run_cli(
        capsys, "--checkpoint", checkpoint, "--data_dir", str(tmp_path / "empty")
    )
    notice, error = err.splitlines()  # what it tried, then why it failed
    assert code == 2 and notice.startswith("downloading HellaSwag val")
    assert (
        error.startswith("error: could not download")
        and str(tmp_path / "empty" / "hellaswag_val.jsonl") in error
    )

    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        EXAMPLES[:2] + ['{"ind": 9, "ctx": "x", "endings": ["a"], "label": 0}'],
    )
    assert 'bad.jsonl:3: example ind=9 has endings ["a"]' in error_of(
        "--checkpoint", checkpoint, "--file", bad, "--device", "cpu"
    )


def test_cli_process_prints_no_traceback(tmp_path, checkpoint):
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        ['{"ind": 1, "ctx": "x", "endings": ["a", "b", "c", "d"], "label": 9}'],
    )
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "hellaswag.py"),
            "--checkpoint",
            checkpoint,
            "--file",
            bad,
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr
        == f"error: {bad}:1: example ind=1 has label 9; a label is the index of the right ending: "
        f"0, 1, 2 or 3\n"
    )


# -----------------------------------------------------------------------------
# train_gpt.py


def train(tmp_path, hellaswag_dir):
    """A 2-step tiny training run with HellaSwag every step, offline: any download fails at once."""
    data = tmp_path / "shards"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.save(data / "x_val_000000.npy", rng.integers(0, 50257, 4000).astype(np.uint16))
    np.save(data / "x_train_000001.npy", rng.integers(0, 50257, 4000).astype(np.uint16))
    script = tmp_path / "offline_train.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {ROOT!r})\nimport hellaswag, train_gpt\n"
        f"hellaswag.URL = 'file:///nowhere/hellaswag_{{split}}.jsonl'\n"
        f"sys.exit(train_gpt.main(sys.argv[1:]))\n"
    )
    command = [
        sys.executable,
        str(script),
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--data_dir",
        str(data),
        "--log_dir",
        str(tmp_path / "log"),
        "--max_steps",
        "2",
        "--batch_size",
        "2",
        "--block_size",
        "64",
        "--total_batch_size",
        "128",
        "--val_every",
        "1",
        "--val_steps",
        "1",
        "--hellaswag_every",
        "1",
        "--hellaswag_dir",
        str(hellaswag_dir),
        "--sample_every",
        "0",
        "--checkpoint_every",
        "0",
    ]
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="2"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, [line.split() for line in (tmp_path / "log" / "log.txt").read_text().splitlines()]


def test_train_gpt_logs_hella_lines(tmp_path):
    folder = tmp_path / "hs"
    folder.mkdir()
    write_jsonl(folder / "hellaswag_val.jsonl", EXAMPLES[:4])
    proc, log = train(tmp_path, folder)
    hella = [line for line in log if line[1] == "hella"]
    assert hella and [h[0] for h in hella] == [line[0] for line in log if line[1] == "val"]
    assert all(float(h[2]) * 4 == round(float(h[2]) * 4) for h in hella)  # k right of 4
    assert "hella" in proc.stdout


def test_train_gpt_goes_on_without_hellaswag_data(tmp_path):
    empty = tmp_path / "hs"
    empty.mkdir()
    proc, log = train(tmp_path, empty)
    notices = [
        line for line in (proc.stdout + proc.stderr).splitlines() if "hellaswag_val.jsonl" in line
    ]
    assert len(notices) == 1 and "could not download" in notices[0], proc.stdout + proc.stderr
    assert not [line for line in log if line[1] == "hella"] and [
        line for line in log if line[1] == "val"
    ]
