"""The tiny pretraining config shared by the tests that need a real (if tiny) trained model:
2 layers, d=32, a 300-token BPE on Macbeth, a third of an epoch (a few seconds on 2 cores)."""

from stride_jax.recipes import ArchConfig, CorpusConfig, OptimConfig, PretrainConfig

TINY = PretrainConfig(
    arch=ArchConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                    intermediate_size=64),
    corpus=CorpusConfig(plays=("macbeth",), seq_len=32, vocab_size=300, heldout_fraction=0.05),
    optim=OptimConfig(batch_size=16, epochs=0.3, warmup_steps=3, learning_rate=1e-2),
    sample_tokens=2)


def random_rows(n: int, seq: int, vocab: int, seed: int, prefix: str = "r"):
    """``n`` rows of ``seq`` uniform random tokens, every next token scored (synthetic data)."""
    import numpy as np

    from stride_jax.data import TokenizedSet
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (n, seq)).astype(np.int32)
    mask = np.ones_like(ids)
    loss = mask.copy()
    loss[:, -1] = 0
    names = [f"{prefix}{i}" for i in range(n)]
    return TokenizedSet(names, ids, mask, loss, names)


def write_pairs(directory, res) -> None:
    """``train.jsonl`` (120 rows of the tiny corpus, 30 characters each) and ``queries.jsonl``
    (3 held-out prompt/completion queries) in ``directory``, from a ``pretrain`` result."""
    from stride_jax.tokenizer import row_texts
    from stride_jax.data import Document, write_jsonl
    texts = row_texts(res.corpus.train.subset(range(120)), res.tokenizer)
    write_jsonl([Document(id=f"d{i}", text=t[:30]) for i, t in enumerate(texts)],
                directory / "train.jsonl")
    qs = row_texts(res.corpus.heldout.subset(range(3)), res.tokenizer)
    write_jsonl([Document(id=f"q{i}", prompt=t[:10], text=t[10:30]) for i, t in enumerate(qs)],
                directory / "queries.jsonl")
