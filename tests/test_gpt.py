"""The small GPT (chapters 3.3 and 5.1): its blocks, its pipeline split, its loss and sampling;
and its corpus: the shipped Shakespeare, the character tokenizer, the batches."""
import fnmatch
import functools
import math
import pathlib
import tomllib

import pytest
import torch
import torch.nn.functional as F

from nanopar import models, text
from nanopar.launch import run
from nanopar.model_split import split
from nanopar.pipeline import pipeline_step
from nanopar.training import seeded

TINY = models.GPTConfig.tiny()
BUILD = functools.partial(seeded, functools.partial(models.gpt, TINY))


def tokens(batch=3, t=TINY.block_size, seed=0):
    return torch.randint(0, TINY.vocab_size, (batch, t), generator=torch.Generator().manual_seed(seed))


def test_blocks_are_named_and_typed_for_pipeline_and_tensor_parallelism():
    model = BUILD()
    assert [n for n, _ in model.named_children()] == ["embed", "h0", "h1", "head"]
    assert [type(m) for m in model] == [models.Embeddings, models.Block, models.Block, models.Head]
    assert type(model.h0.attn) is models.CausalSelfAttention and type(model.h0.mlp) is models.MLP
    assert model.h0.mlp.fc.out_features == 4 * TINY.n_embd
    assert model.embed.wte.weight.data_ptr() != model.head.lm_head.weight.data_ptr()  # not tied


def test_logits_shape_and_causality():
    model, x = BUILD(), tokens()
    out = model(x)
    assert out.shape == (3, TINY.block_size, TINY.vocab_size)
    changed = x.clone()
    changed[:, 20] = (changed[:, 20] + 1) % TINY.vocab_size
    out2 = model(changed)
    torch.testing.assert_close(out2[:, :20], out[:, :20])  # the past does not see the future
    assert not torch.allclose(out2[:, 20:], out[:, 20:])


def test_fused_qkv_is_head_major_so_slices_of_whole_heads_are_smaller_attentions():
    # Two heads' rows of qkv (and the matching columns of proj) make a 2-head attention whose
    # output, plus that of the other two heads, is the whole layer's output (before proj's bias).
    attn = BUILD().h0.attn
    x = torch.randn(2, 7, TINY.n_embd)
    rows = 3 * TINY.n_embd // 2
    halves = []
    for i in range(2):
        part = models.CausalSelfAttention(TINY, 0.02)
        part.qkv = torch.nn.Linear(TINY.n_embd, rows)
        part.proj = torch.nn.Linear(TINY.n_embd // 2, TINY.n_embd, bias=False)
        with torch.no_grad():
            part.qkv.weight.copy_(attn.qkv.weight[i * rows:(i + 1) * rows])
            part.qkv.bias.copy_(attn.qkv.bias[i * rows:(i + 1) * rows])
            part.proj.weight.copy_(attn.proj.weight[:, i * TINY.n_embd // 2:(i + 1) * TINY.n_embd // 2])
        halves.append(part(x))
    torch.testing.assert_close(halves[0] + halves[1] + attn.proj.bias, attn(x))


def test_init_is_seeded_and_follows_gpt2():
    config = models.GPTConfig(n_layer=8, n_embd=256, n_head=4)
    a, b = seeded(functools.partial(models.gpt, config)), seeded(functools.partial(models.gpt, config))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert abs(a.h0.mlp.fc.weight.std().item() - 0.02) < 0.001
    assert abs(a.h0.mlp.proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.0005  # residual projection
    assert abs(a.embed.wte.weight.std().item() - 0.02) < 0.002
    assert not a.h0.attn.qkv.bias.any() and a.h0.ln1.weight.eq(1).all()


def test_presets():
    with torch.device("meta"):  # counts parameters without allocating 400 MB
        big = models.gpt(models.GPTConfig.gpt_100m())
    assert 95e6 < sum(p.numel() for p in big.parameters()) < 105e6
    assert len(list(big.children())) == 16
    tiny = models.GPTConfig.tiny(vocab_size=30)
    assert (tiny.vocab_size, tiny.n_layer, tiny.n_embd, tiny.block_size) == (30, 2, 64, 32)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_embd": 100, "n_head": 3}, "multiple of n_head"),
    ({"n_layer": 0}, "positive integers"),
    ({"vocab_size": 65.0}, "positive integers"),
    ({"n_head": True}, "positive integers"),
])
def test_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.GPTConfig(**kwargs)


def test_a_sequence_longer_than_the_context_is_a_clear_error():
    with pytest.raises(ValueError, match="block_size"):
        BUILD()(tokens(t=TINY.block_size + 1))


def test_loss_is_the_mean_cross_entropy_over_all_positions():
    logits, y = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    expected = torch.stack([F.cross_entropy(logits[b, t:t + 1], y[b, t:t + 1]) for b in range(2) for t in range(5)])
    torch.testing.assert_close(models.gpt_loss(logits, y), expected.mean())


def test_split_at_block_boundaries_equals_the_whole_model():
    x, y = tokens(), tokens(seed=1)
    whole = BUILD()
    models.gpt_loss(whole(x), y).backward()
    first, second = split(BUILD(), [2])
    assert [n for n, _ in second.named_children()] == ["h1", "head"]
    out = second(first(x))
    torch.testing.assert_close(out, whole(x))
    models.gpt_loss(out, y).backward()
    for (name, p), q in zip(first.named_parameters(), whole.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_pipelined_gpt_gradients_equal_one_process():
    x, y = tokens(4), tokens(4, seed=1)
    whole = BUILD()
    loss = models.gpt_loss(whole(x), y)
    loss.backward()
    per_rank = run(pipeline_step, 2, BUILD, ["h1"], x, y, "1f1b", 2, kwargs={"loss_fn": models.gpt_loss},
                   backend="gloo", timeout=120)
    expected = {n: p.grad for n, p in whole.named_parameters()}
    got = {**per_rank[0]["grads"], **per_rank[1]["grads"]}
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)
    assert per_rank[1]["loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_generate_is_reproducible_and_crops_to_the_context():
    model, prompt = BUILD(), tokens(2, t=TINY.block_size)  # already a full context: every step crops
    a = models.generate(model, prompt, 5, generator=torch.Generator().manual_seed(3))
    b = models.generate(model, prompt, 5, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, TINY.block_size + 5) and torch.equal(a, b) and torch.equal(a[:, :-5], prompt)
    # A very low temperature is greedy: each new token is the argmax of the cropped context's logits.
    cold = models.generate(model, prompt, 1, temperature=1e-6)
    assert torch.equal(cold[:, -1], model(prompt).argmax(-1)[:, -1])


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        models.generate(BUILD(), tokens(1), 1, temperature=0)
    with pytest.raises(TypeError, match="whole GPT"):
        models.generate(split(BUILD(), [2])[1], tokens(1), 1)


def test_the_corpus_is_three_plays_of_plain_text():
    corpus = text.load_corpus()
    assert 250_000 < len(corpus) < 350_000 and corpus.isascii()
    assert corpus.startswith("THE TEMPEST")
    assert corpus.index("MACBETH\n\nby William Shakespeare") < corpus.index("A MIDSUMMER NIGHT'S DREAM")
    assert all(line == line.rstrip() for line in corpus.splitlines())


def test_the_corpus_ships_as_package_data():
    # An installed (not editable) package holds only the data files pyproject.toml names.
    root = pathlib.Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["nanopar"]
    package = root / "src" / "nanopar"
    shipped = {f.relative_to(package).as_posix() for f in (package / "data").rglob("*") if f.is_file()}
    assert {"data/shakespeare/shakespeare.txt", "data/shakespeare/README.md"} <= shipped
    for name in shipped:
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name


def test_tokenizer_round_trip_and_vocabulary():
    corpus = text.load_corpus()
    tok = text.CharTokenizer(corpus)
    assert tok.vocab_size == len(set(corpus)) == 73 and tok.chars == sorted(tok.chars)
    ids = tok.encode(corpus[:1000])
    assert ids.dtype == torch.long and tok.decode(ids) == corpus[:1000] == tok.decode(ids.tolist())
    assert tok.encode("ab").tolist() == [tok.chars.index("a"), tok.chars.index("b")]


def test_tokenizer_errors_name_the_problem():
    tok = text.CharTokenizer("abc")
    with pytest.raises(ValueError, match=r"\['z'\]"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="non-empty"):
        text.CharTokenizer("")


def test_train_val_split_keeps_the_order_and_holds_out_the_end():
    tokens = torch.arange(100)
    train, val = text.train_val_split(tokens, 0.2)
    assert torch.equal(train, tokens[:80]) and torch.equal(val, tokens[80:])
    for bad in (0, 1, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            text.train_val_split(tokens, bad)
    with pytest.raises(ValueError, match="too few"):
        text.train_val_split(torch.arange(3), 0.1)


def test_batches_are_windows_with_next_token_targets_and_seeded():
    tokens = torch.arange(1000) * 7  # each value tells its position
    x, y = text.get_batch(tokens, 5, 16, torch.Generator().manual_seed(0))
    x2, y2 = text.get_batch(tokens, 5, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 16) and torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(y, x + 7)  # the next token of every position
    assert torch.equal(x.diff(dim=1), torch.full((5, 15), 7))  # contiguous windows
    assert len(set(x[:, 0].tolist())) > 1  # different windows in one batch
    last, _ = text.get_batch(tokens[:17], 3, 16, torch.Generator())  # the only window that fits
    assert torch.equal(last, tokens[:16].expand(3, 16))


def test_a_block_longer_than_the_data_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 17 tokens"):
        text.get_batch(torch.arange(16), 2, 16, torch.Generator())
    with pytest.raises(ValueError, match="batch"):
        text.get_batch(torch.arange(100), 0, 16, torch.Generator())
