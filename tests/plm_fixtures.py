"""A tiny random BERT and its tokenizer, written locally (no download): a stand-in PLM for tests."""
from __future__ import annotations

from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tiny_bert(folder: Path, words: list[str], *, seed: int = 0, hidden: int = 24, layers: int = 3) -> Path:
    """A BertModel (``layers`` blocks, ``hidden`` wide, random weights from ``seed``) and a
    BertTokenizer over ``words``, saved as a Hugging Face model folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + sorted(set(words))) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(vocab=str(vocab))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(SPECIAL) + len(set(words)), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
