"""Attribute a Hugging Face model directory (config.json, model.safetensors, tokenizer.json)
to JSONL training documents, writing what ``stride-jax attribute`` writes, plus the report.

    python examples/hf_model.py MODEL_DIR TRAIN.jsonl QUERIES.jsonl OUT_DIR [key=value ...]

TRAIN.jsonl: ``{"id", "text"}`` lines (cut into rows of the model's context, at most 64 tokens);
QUERIES.jsonl: ``{"id", "text"}`` or ``{"id", "prompt", "completion"}`` (only the completion is
scored).
"""

import argparse

from stride_jax import (AttributeConfig, Attribution, Attributor, from_hf, load_tokenizer,
                        read_documents, tokenize_documents, with_overrides)


def main(model_dir: str, train_path: str, queries_path: str, out: str,
         overrides: tuple[str, ...] = ()) -> Attribution:
    model = from_hf(model_dir)                          # strict: unknown settings are errors
    tokenizer = load_tokenizer(model_dir)
    seq_len = min(model.config.max_position_embeddings, 64)
    train = tokenize_documents(read_documents(train_path), tokenizer, seq_len, mode="chunk")
    queries = tokenize_documents(read_documents(queries_path), tokenizer, seq_len,
                                 mode="document")
    config = with_overrides(AttributeConfig(), *overrides)
    att = Attributor(model, train, config, workdir=out)   # a rerun reuses every finished stage
    result = att.attribute(queries)
    att.write(result, queries, tokenizer=tokenizer, report=True)
    for q, qid in enumerate(result.query_ids):
        pro, _ = result.top(q, 1)
        best = f"{result.train_ids[pro[0][0]]} ({pro[0][1]:+.2e})" if pro else "none"
        print(f"query {qid}: top proponent {best}")
    print(f"scores, topk.jsonl, tokens.json and report.html are in {out}")
    return Attribution.load(out)                        # the run, reopened from disk


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("model_dir", "train", "queries", "out"):
        p.add_argument(name)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="attribution config")
    a = p.parse_args()
    main(a.model_dir, a.train, a.queries, a.out, tuple(a.overrides))
