"""Data: tokenizers, offline datasets and stateless batching (see `datasets` for the splits)."""

from demask.data.batching import batch_indices, get_batch, step_seed
from demask.data.datasets import (
    DATASETS,
    DEFAULT_TEXT_SEQ_LEN,
    DOC_SEPARATOR,
    SequenceDataset,
    digits_images,
    digits_labels,
    get_dataset,
    stdlib_files,
)
from demask.data.synthetic import shift_chain, shift_chain_entropy_rate
from demask.data.tokenizers import (
    TOKENIZERS,
    ByteTokenizer,
    GreyLevelTokenizer,
    Tokenizer,
    get_tokenizer,
)

__all__ = [
    "DATASETS",
    "DEFAULT_TEXT_SEQ_LEN",
    "DOC_SEPARATOR",
    "TOKENIZERS",
    "ByteTokenizer",
    "GreyLevelTokenizer",
    "SequenceDataset",
    "Tokenizer",
    "batch_indices",
    "digits_images",
    "digits_labels",
    "get_batch",
    "get_dataset",
    "get_tokenizer",
    "shift_chain",
    "shift_chain_entropy_rate",
    "step_seed",
    "stdlib_files",
]
